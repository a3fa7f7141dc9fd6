"""A CLI command rides through a control-plane restart, with real processes: the control plane of a
running `torchloom run` is killed with SIGKILL and a `torchloom set` started at once, while no weaver
is announced yet, waits for the control plane the job's launcher starts again and is applied on both
ranks (it used to exit 4 at once with "no weaver found: start a job")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import EXAMPLE, finish_cli, kill_tree, start_cli, status_job
from tests.integration.helpers import cli as _cli
from torchloom import discovery
from torchloom.app import runs

JOB = "cprestart"
# Printed by a command that waits for the control plane of a running job (torchloom.app.lookup).
WAITING = "waiting up to"


def _applied(out: Path, rank: int) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((out / f"rank{rank}.applied.json").read_text())
    return data


def _stderr_until(proc: subprocess.Popen[str], needle: str) -> str:
    """Read `proc`'s stderr until a line holds `needle` or the process ends (its --timeout bounds
    that); return what was read."""
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            break
    return "".join(seen)


@pytest.mark.timeout(120)
def test_set_started_right_after_the_control_plane_was_killed_waits_for_it_and_applies(
    tmp_path: Path, tl_home: Path, run_alone_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    run = start_cli(
        "run", "--job", JOB, "--nproc-per-node", "2", str(EXAMPLE), "--steps", "1000000",
        "--step-sleep", "0.01", "--out", str(out), env=run_alone_env,
    )  # fmt: skip
    setter: subprocess.Popen[str] | None = None
    try:
        status_job(run_alone_env, 5, proc=run, job=JOB)
        [lease] = runs.read_leases(tl_home)
        assert lease.pid == run.pid and lease.job == JOB
        old = json.loads((tl_home / "weaver.json").read_text())["pid"]
        # The launcher's keeper restarts a dead control plane within a quarter second; held stopped,
        # it leaves the gap open (weaver.json names a dead pid, the lease is live) for as long as the
        # command needs to start and look, whatever the machine's load.
        os.kill(run.pid, signal.SIGSTOP)
        try:
            os.kill(old, signal.SIGKILL)
            gone_by = time.monotonic() + 10
            while discovery.read(tl_home / discovery.FILE_NAME) is not None:  # its pid is dead
                assert time.monotonic() < gone_by, "the killed control plane still looks alive"
                time.sleep(0.01)
            setter = start_cli("set", "lr=0.0123", "--json", "--timeout", "25", env=run_alone_env)
            said = _stderr_until(setter, WAITING)
        finally:
            os.kill(run.pid, signal.SIGCONT)
        assert WAITING in said, f"the command did not wait (exit {setter.wait(timeout=10)}): {said}"
        stdout, rest = setter.communicate(timeout=60)
        assert setter.returncode == 0, said + rest + stdout
        assert "no weaver found" not in said + rest
        outcome = json.loads(stdout)
        assert outcome["status"] == "applied", outcome
        assert sorted(a["rank"] for a in outcome["applied"]) == [0, 1], outcome
        new = json.loads((tl_home / "weaver.json").read_text())["pid"]
        assert new != old  # it was applied through the control plane the launcher started again
        stop = _cli("stop", "--json", "--timeout", "60", env=run_alone_env, timeout_s=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        err = finish_cli(run, timeout_s=60)
        assert run.returncode == 0, err[-3000:]
        assert "the control plane is gone: starting a new one" in err
    finally:
        for proc in (setter, run):
            if proc is not None and proc.poll() is None:
                kill_tree(proc.pid)
    for rank in (0, 1):  # applied once on each rank, never twice
        decided = [d for d in _applied(out, rank) if d["command_id"] == outcome["command_id"]]
        assert [d["status"] for d in decided] == ["applied"], (rank, decided)
