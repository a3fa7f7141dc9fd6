"""`torchloom weaver` as a real process: embedded NATS, discovery file, status over gRPC, clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import cli, port_open, unbound_env, ws_handshake
from torchloom import bus
from torchloom.errors import NatsUnavailable


def _cli(*args: str, env: dict[str, str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=env, timeout_s=timeout_s)


@pytest.fixture
def clean_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return unbound_env(subprocess_env)


def test_weaver_serves_status_and_stops_cleanly(tl_home: Path, clean_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", "weaver"],
        env=clean_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        path = tl_home / "weaver.json"
        deadline = time.monotonic() + 30.0
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists(), f"no discovery file; weaver exited {proc.poll()}"
        info = json.loads(path.read_text())
        assert info["pid"] == proc.pid
        assert info["nats_url"].startswith("nats://127.0.0.1:")
        assert info["ws_url"].startswith("ws://127.0.0.1:")
        assert port_open(info["nats_url"])
        # The embedded server keeps its JetStream store under $TORCHLOOM_HOME/runs/<id>/.
        assert any((tl_home / "runs").iterdir())
        # It admits torchloom's roles only: no anonymous client, no page from an origin but the UI's.
        with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset"):
            asyncio.run(bus.connect(info["nats_url"], name="anonymous", connect_timeout_s=1.0))
        ws_port = int(info["ws_url"].rsplit(":", 1)[1])
        assert info["ui_port"] > 0 and info["secrets_dir"]
        assert ws_handshake(ws_port, "http://evil.example") == 403
        assert ws_handshake(ws_port, f"http://127.0.0.1:{info['ui_port']}") == 101

        # Found through the discovery file alone: no --grpc, no TORCHLOOM_GRPC.
        status = _cli("status", "--json", env=clean_env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout) == {"jobs": []}

        # No job yet: a set is rejected by the weaver (exit 2) with a reason.
        rejected = _cli("set", "lr=0.1", "--json", env=clean_env)
        assert rejected.returncode == 2, rejected.stderr
        body = json.loads(rejected.stdout)
        assert body["status"] == "rejected" and body["reason"] and body["applied"] == []

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"grpc={info['grpc']}" in out
        assert info["grpc"] in err  # printed for users on stderr too
        assert not path.exists(), "discovery file left behind"
        assert not port_open(info["nats_url"]), "embedded nats-server left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    # Once the weaver is gone, a stale file is not trusted and the CLI says how to start one.
    path.write_text(json.dumps(info))
    gone = _cli("status", env=clean_env)
    assert gone.returncode == 4
    assert "torchloom run" in gone.stderr
