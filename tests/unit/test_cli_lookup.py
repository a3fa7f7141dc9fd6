"""Unit tests of the CLI's weaver lookup while a running job's control plane restarts: with a live
lease and no weaver announced, a command waits (bounded) and says truthfully when it gives up; with no
live lease it fails at once with the help text, as before."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchloom import discovery
from torchloom.app import cli, lookup, runs
from torchloom.errors import WeaverUnavailable


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease(pid: int) -> runs.Lease:
    lease = runs.Lease(job="tiny", run_id="r1", pid=pid)
    runs.write_lease(lease)
    return lease


@pytest.fixture(autouse=True)
def _no_env_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHLOOM_GRPC", raising=False)


def test_no_live_lease_fails_at_once_with_the_help(tl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _lease(_dead_pid())  # a launcher that is gone restarts nothing
    start = time.monotonic()
    with pytest.raises(WeaverUnavailable) as caught:
        lookup.weaver_address(None, wait_s=30)
    assert time.monotonic() - start < 1.0
    assert str(caught.value) == lookup.NO_WEAVER_HELP
    assert capsys.readouterr().err == ""


def test_live_lease_waits_then_says_the_control_plane_did_not_come_back(
    tl_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lease(os.getpid())
    start = time.monotonic()
    with pytest.raises(WeaverUnavailable) as caught:
        lookup.weaver_address(None, wait_s=0.3)
    assert time.monotonic() - start >= 0.3
    message = str(caught.value)
    assert "control plane of the running job tiny" in message and "within 0.3 s" in message
    assert "the command was not sent" in message and "start a job" not in message
    assert "waiting up to 0.3 s" in capsys.readouterr().err


def test_an_address_given_is_never_waited_for(tl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _lease(os.getpid())
    assert lookup.weaver_address("127.0.0.1:7", wait_s=30) == "127.0.0.1:7"
    assert lookup.restarting_jobs("127.0.0.1:7") == []
    monkeypatch.setenv("TORCHLOOM_GRPC", "127.0.0.1:8")
    assert lookup.restarting_jobs(None) == []


async def test_the_restarted_control_plane_is_found_while_waiting(tl_home: Path) -> None:
    _lease(os.getpid())

    async def restart() -> None:
        await asyncio.sleep(0.2)
        discovery.write(discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://a:1", grpc="127.0.0.1:9"))

    found, _ = await asyncio.gather(lookup.find_weaver(None, wait_s=10), restart())
    assert found == "127.0.0.1:9"


def test_set_gives_up_after_its_timeout_with_exit_4(
    tl_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lease(os.getpid())
    start = time.monotonic()
    assert cli.main(["set", "lr=0.1", "--timeout", "0.4"]) == cli.EXIT_NO_WEAVER
    assert time.monotonic() - start >= 0.4
    err = capsys.readouterr().err
    assert "did not come back within 0.4 s; the command was not sent" in err
    assert "no weaver found" not in err


def test_status_waits_the_short_bound(
    tl_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(lookup, "RESTART_WAIT_S", 0.2)
    _lease(os.getpid())
    assert cli.main(["status"]) == cli.EXIT_NO_WEAVER
    assert "did not come back within 0.2 s" in capsys.readouterr().err
