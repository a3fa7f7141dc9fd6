"""Shared fixtures: a real nats-server per test (JetStream in tmp_path) enforcing torchloom's NATS roles,
and repo paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchloom.credentials import PASSWORD_SUFFIX, CredentialStore
from torchloom.nats_server import EmbeddedNats
from torchloom.private_files import private_dir, read_private, write_private

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def browser_passwords(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The browser roles' password files (name: content) of one store opened for the session: a
    password's bcrypt hash costs about 0.25 s of CPU, two per new store, and about 50 tests open one."""
    store = CredentialStore.open(tmp_path_factory.mktemp("browser-passwords") / "secrets")
    files = sorted(store.directory.glob(f"*{PASSWORD_SUFFIX}"))
    return {f.name: read_private(f, "test password file") for f in files}


@pytest.fixture
def nats_store(tmp_path: Path, browser_passwords: dict[str, str]) -> CredentialStore:
    """The NATS role credentials of the test's server (secrets 0600 in a 0700 directory): fresh nkeys,
    and the session's browser passwords (the store reads them as it would its own from a reopen)."""
    directory = private_dir(tmp_path / "nats-secrets")
    for name, text in browser_passwords.items():
        write_private(directory / name, text)
    return CredentialStore.open(directory)


@pytest.fixture
def nats_server(tmp_path: Path, nats_store: CredentialStore) -> Iterator[EmbeddedNats]:
    """A real nats-server on a free loopback port that admits only torchloom's roles, as the control
    plane runs it: clients connect with `nats_store`'s credentials (`server.credentials`), a job's
    ranks once the test granted the job (tests/integration/helpers.job_env). No WebSocket listener
    (a UI test starts its own with its page's origins). A test that needs an open server starts its
    own `EmbeddedNats` without credentials and says why. Stopped (terminate, wait, kill) after the test.
    """
    server = EmbeddedNats(tmp_path / "nats", credentials=nats_store)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated TORCHLOOM_HOME so discovery files never leak between tests or into ~."""
    home = tmp_path / "tlhome"
    home.mkdir()
    monkeypatch.setenv("TORCHLOOM_HOME", str(home))
    return home


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def subprocess_env(tl_home: Path) -> dict[str, str]:
    """Environment for child processes: this venv first on PATH, isolated home, no proxies."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TORCHLOOM_HOME"] = str(tl_home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
