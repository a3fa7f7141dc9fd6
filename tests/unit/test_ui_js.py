"""The web UI's pure JS logic (node --test ui/test) and the committed build in weaver/static matching
a fresh build of ui/ (so `pip install` ships the page the sources describe)."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UI = REPO / "ui"


def _need_node_modules() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (UI / "node_modules" / "protobufjs").is_dir():
        pytest.skip("ui/node_modules missing: run `make ui-setup` (npm ci in ui/)")


def _gen() -> None:
    subprocess.run(["npm", "run", "--silent", "gen"], cwd=UI, check=True, timeout=120)


def test_ui_js_unit_tests_pass() -> None:
    _need_node_modules()
    _gen()
    proc = subprocess.run(["node", "--test", "test/"], cwd=UI, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


def test_committed_static_matches_a_fresh_build(tmp_path: Path) -> None:
    _need_node_modules()
    _gen()
    out = tmp_path / "static"
    subprocess.run(
        ["node", "build.mjs"],
        cwd=UI,
        check=True,
        timeout=120,
        env={**os.environ, "TORCHLOOM_UI_OUT": str(out)},
        capture_output=True,
    )
    committed = REPO / "weaver" / "static"
    for rel in ("index.html", "assets/app.js", "assets/app.css"):
        assert filecmp.cmp(out / rel, committed / rel, shallow=False), (
            f"weaver/static/{rel} is stale: run `make ui-build` and commit it"
        )


def test_every_health_kind_the_weaver_reports_has_a_colour() -> None:
    """The device panel marks a rank with its weaver verdict as the row's class: each non-healthy
    kind needs a rule, or a rank waiting on a dead peer looks like a healthy one."""
    from weaver.health_policy import HealthKind

    css = (UI / "src" / "app.css").read_text()
    missing = [
        k.value for k in HealthKind if k is not HealthKind.HEALTHY and f"#devices tr.{k.value} td" not in css
    ]
    assert not missing, f"ui/src/app.css has no `#devices tr.<kind> td` rule for {missing}"
