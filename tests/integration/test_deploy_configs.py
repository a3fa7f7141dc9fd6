"""Every nats-server config under deploy/ passes `nats-server -t` (the real binary's own check), with
the users block torchloom generates and throwaway TLS certificates where a config names them; none
listens beyond loopback without TLS and authentication, and none holds a secret."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from torchloom.credentials import CredentialStore
from torchloom.nats_server import find_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIGS = sorted(DEPLOY.rglob("*.conf"))
USERS_INCLUDE = "torchloom-users.conf"
TLS_DIR = "/etc/nats/tls/"


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, check=False
    )


def _certificates(directory: Path) -> None:
    """A CA and a server certificate signed by it, as the cluster configs expect."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the throwaway certificates")
    directory.mkdir(parents=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "ed25519", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=torchloom-test-ca")  # fmt: skip
    run("req", "-newkey", "ed25519", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1")  # fmt: skip


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ as an operator prepares it: the users block generated, certificates in place."""
    root = tmp_path_factory.mktemp("deploy")
    copy = root / "deploy"
    shutil.copytree(DEPLOY, copy)
    store = CredentialStore.open(root / "secrets")
    store.grant_job("train")
    (copy / USERS_INCLUDE).write_text(store.authorization_block())
    tls = root / "tls"
    _certificates(tls)
    for conf in copy.rglob("*.conf"):
        conf.write_text(conf.read_text().replace(TLS_DIR, f"{tls}/"))
    return copy


def test_the_expected_configs_exist() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in CONFIGS}
    assert {"nats-server.conf", "nats-server-auth.conf", "cluster/nats-1.conf"} <= names
    assert len([n for n in names if n.startswith("cluster/")]) == 3
    assert f"deploy/{USERS_INCLUDE}" in (REPO / ".gitignore").read_text().splitlines()  # never committed


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_config_is_valid(path: Path, deployed: Path) -> None:
    result = _check(deployed / path.relative_to(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_config_is_closed_beyond_loopback_and_holds_no_secret(path: Path) -> None:
    text = path.read_text()
    live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if re.search(r'listen:\s*"0\.0\.0\.0', live):
        assert "tls {" in live and "no_tls" not in live, f"{path.name} listens off loopback without TLS"
        assert f'include "../{USERS_INCLUDE}"' in live or f'include "{USERS_INCLUDE}"' in live
    assert "authorization" not in live or "users" not in live, "users belong in the generated include"
    assert not re.search(r"\bpassword\s*:", live), f"{path.name} holds a password"
    assert not re.search(r"\bS[UAO][A-Z2-7]{50,}", text), f"{path.name} holds an nkey seed"
    assert "allowed_origins" in live or "websocket" not in live


def test_the_unauthenticated_config_is_loopback_only() -> None:
    text = (DEPLOY / "nats-server.conf").read_text()
    listens = re.findall(r'^\s*(?:listen|http):\s*"([^"]+)"', text, flags=re.M)
    assert listens and all(addr.startswith("127.0.0.1:") for addr in listens), listens


def test_the_check_catches_a_broken_config(tmp_path: Path) -> None:
    # Guards the test itself: `-t` must fail on a config it cannot parse.
    bad = tmp_path / "bad.conf"
    bad.write_text((DEPLOY / "nats-server.conf").read_text() + "\njetstream {\n")
    assert _check(bad).returncode != 0


def test_the_auth_config_refuses_to_start_without_the_generated_users(tmp_path: Path) -> None:
    # Fail closed: an operator who forgot to generate the users gets no open server.
    alone = tmp_path / "nats-server-auth.conf"
    shutil.copy(DEPLOY / "nats-server-auth.conf", alone)
    result = _check(alone)
    assert result.returncode != 0 and USERS_INCLUDE in result.stdout + result.stderr


def test_k8s_manifest_runs_the_weaver_against_external_nats() -> None:
    text = (DEPLOY / "k8s" / "weaver.yaml").read_text()
    assert "kind: Deployment" in text and "kind: Service" in text
    assert '"weaver", "--nats"' in text and "--grpc" in text
    assert "\t" not in text  # YAML forbids tabs for indentation
