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


def test_weavers_started_on_their_own_are_found_after_the_control_plane(
    tl_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An active weaver and its standbys (`python -m weaver`) each announce themselves; a CLI with
    no flags gets every live one, the control plane's first, and moves on from one to the next."""
    monkeypatch.delenv("TORCHLOOM_GRPC", raising=False)
    mine = discovery.announce_weaver("127.0.0.1:5")
    assert discovery.resolve_grpc(None) == "127.0.0.1:5"
    dead = discovery.weavers_dir() / "1.json"
    dead.write_text(json.dumps({"pid": _dead_pid(), "grpc": "127.0.0.1:6", "started_at_s": 0.0}))
    (discovery.weavers_dir() / "2.json").write_text("{half written")
    assert discovery.live_weavers() == ["127.0.0.1:5"]
    discovery.write(discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://a:1", grpc="127.0.0.1:3"))
    assert discovery.resolve_grpc(None) == "127.0.0.1:3,127.0.0.1:5"
    assert oct(mine.stat().st_mode & 0o777) == oct(0o600)
    discovery.withdraw_weaver(mine)
    assert not mine.exists() and dead.exists()  # another process's entry is never removed here
    assert discovery.resolve_grpc(None) == "127.0.0.1:3"
