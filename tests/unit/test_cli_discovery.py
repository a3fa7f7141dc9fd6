"""Unit tests of weaver discovery: --grpc, then TORCHLOOM_GRPC, then a live discovery file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchloom import discovery


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_explicit_beats_env_beats_file(tl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    discovery.write(discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://a:1", grpc="127.0.0.1:3"))
    monkeypatch.setenv("TORCHLOOM_GRPC", "127.0.0.1:2")
    assert discovery.resolve_grpc("127.0.0.1:1") == "127.0.0.1:1"
    assert discovery.resolve_grpc(None) == "127.0.0.1:2"
    monkeypatch.delenv("TORCHLOOM_GRPC")
    assert discovery.resolve_grpc(None) == "127.0.0.1:3"


def test_file_of_dead_pid_is_ignored(tl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHLOOM_GRPC", raising=False)
    discovery.write(discovery.WeaverInfo(pid=_dead_pid(), nats_url="nats://a:1", grpc="127.0.0.1:3"))
    assert discovery.read() is None
    assert discovery.resolve_grpc(None) is None


def test_missing_or_corrupt_file_means_none(tl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHLOOM_GRPC", raising=False)
    assert discovery.resolve_grpc(None) is None
    (tl_home / "weaver.json").write_text("{not json")
    assert discovery.read() is None
    (tl_home / "weaver.json").write_text(json.dumps({"pid": os.getpid()}))
    assert discovery.read() is None


def test_file_round_trip_has_the_documented_keys(tl_home: Path) -> None:
    info = discovery.WeaverInfo(
        pid=os.getpid(), nats_url="nats://a:1", grpc="127.0.0.1:3", ws_url="ws://a:2", jobs=("demo",)
    )
    path = discovery.write(info)
    assert path == tl_home / "weaver.json"
    keys = set(json.loads(path.read_text()))
    assert {"pid", "nats_url", "ws_url", "grpc", "jobs", "started_at_s", "store_dir", "secrets_dir"} <= keys
    assert discovery.read() == info


def test_remove_only_removes_our_own_file(tl_home: Path) -> None:
    discovery.write(discovery.WeaverInfo(pid=os.getpid() + 1, nats_url="n", grpc="h:1"))
    discovery.remove()
    assert discovery.discovery_path().exists()
    discovery.remove(pid=os.getpid() + 1)
    assert not discovery.discovery_path().exists()


def test_bad_env_address_is_a_clear_error(tl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLOOM_GRPC", "localhost")
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        discovery.resolve_grpc(None)


def test_home_defaults_to_dot_torchloom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHLOOM_HOME", raising=False)
    assert discovery.home() == Path.home() / ".torchloom"
