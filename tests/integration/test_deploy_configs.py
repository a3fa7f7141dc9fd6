"""Every nats-server config under deploy/ passes `nats-server -t` (the real binary's own check)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from torchloom.nats_server import find_binary

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "deploy").rglob("*.conf"))


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, check=False
    )


def test_the_expected_configs_exist() -> None:
    names = {p.relative_to(REPO / "deploy").as_posix() for p in CONFIGS}
    assert {"nats-server.conf", "nats-server-auth.conf", "cluster/nats-1.conf"} <= names
    assert len([n for n in names if n.startswith("cluster/")]) == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "deploy").as_posix())
def test_config_is_valid(path: Path) -> None:
    result = _check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_the_check_catches_a_broken_config(tmp_path: Path) -> None:
    # Guards the test itself: `-t` must fail on a config it cannot parse.
    bad = tmp_path / "bad.conf"
    bad.write_text((REPO / "deploy" / "nats-server.conf").read_text() + "\njetstream {\n")
    assert _check(bad).returncode != 0


def test_k8s_manifest_runs_the_weaver_against_external_nats() -> None:
    text = (REPO / "deploy" / "k8s" / "weaver.yaml").read_text()
    assert "kind: Deployment" in text and "kind: Service" in text
    assert '"weaver", "--nats"' in text and "--grpc" in text
    assert "\t" not in text  # YAML forbids tabs for indentation
