"""Shared fixtures: a real nats-server per test (JetStream in tmp_path), and repo paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchloom.nats_server import EmbeddedNats

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A real nats-server on a free loopback port, stopped (terminate, wait, kill) after the test."""
    server = EmbeddedNats(tmp_path / "nats")
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
