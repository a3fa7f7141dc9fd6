"""A run's end and a lost control plane are journaled, with real processes: `torchloom run` (2 ranks,
real torchrun, the default `alert` health policy) whose rank 1 is killed with SIGKILL journals one
`run_ended` naming exit status 1 and that rank (its signal and host), and `status` calls the rank that
did not fail finished as soon as the run ended and the killed one dead, never finished; a run
trained to completion journals exit status 0; a control
plane killed with SIGKILL while a job runs is journaled as `control_plane_restarted` by the one that
replaced it, naming the old pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    EXAMPLE,
    cli,
    finish_cli,
    home_status,
    kill_tree,
    start_cli,
    status_job,
    unbound_env,
)
from torchloom import discovery

# The control plane outlives its last job by this much: long enough to ask `status` after the run
# ended, short enough not to keep a process around for long (teardown kills it anyway).
IDLE_S = "20"


@pytest.fixture
def env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return unbound_env(
        subprocess_env,
        OMP_NUM_THREADS="1",
        TORCHLOOM_CONTROLPLANE_IDLE_S=IDLE_S,
        TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
    )


def _run(env: dict[str, str], out: Path, job: str, *, steps: int, step_sleep: float) -> Any:
    return start_cli(
        "run",
        "--job",
        job,
        "--nproc-per-node",
        "2",
        str(EXAMPLE),
        "--steps",
        str(steps),
        "--step-sleep",
        str(step_sleep),
        "--out",
        str(out),
        env=env,
    )


def _events(env: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    res = cli("journal", "--run", run_id, "--json", env=env, timeout_s=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return [e for e in json.loads(res.stdout)["entries"] if e["type"] == "event"]


def _one(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["kind"] == kind]
    assert len(found) == 1, [(e["kind"], e["attrs"]) for e in events]
    return found[0]


def _ranks(env: dict[str, str], job: str) -> dict[int, tuple[str, str]]:
    """Each rank's (state, health) as status says it now."""
    import asyncio

    reply = asyncio.run(home_status(env, job))
    assert reply is not None and reply.jobs, "the control plane no longer answers for the job"
    return {r.rank: (r.state.value, r.health) for r in reply.jobs[0].ranks}


@pytest.mark.timeout(120)
def test_a_killed_rank_ends_the_run_and_the_journal_names_it(tmp_path: Path, env: dict[str, str]) -> None:
    proc = _run(env, tmp_path / "out", "killed", steps=4000, step_sleep=0.01)
    try:
        job = status_job(env, 3, proc=proc, job="killed")
        victim = next(r for r in job["ranks"] if r["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        err = finish_cli(proc, timeout_s=60)
        # Right after the run ended, the rank that did not fail is finished; the killed one is not
        # called finished: it is reported dead (no heartbeat since it was killed).
        assert _ranks(env, "killed")[0][0] == "finished"
        deadline = time.monotonic() + 10
        while _ranks(env, "killed")[1] != ("running", "dead") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ranks(env, "killed")[1] == ("running", "dead")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 1, err[-3000:]
    ended = _one(_events(env, job["run_id"]), "run_ended")
    attrs = ended["attrs"]
    assert ended["run_id"] == job["run_id"]
    assert attrs["exit_status"] == "1", attrs
    assert attrs["failed_rank"] == "1" and attrs["failed_signal"] == "SIGKILL", attrs
    assert attrs["failed_pid"] == str(victim["pid"]) and attrs["failed_host"] == socket.gethostname(), attrs
    assert "rank 1" in ended["message"] and "SIGKILL" in ended["message"], ended["message"]


@pytest.mark.timeout(120)
def test_a_run_trained_to_completion_journals_exit_status_0(tmp_path: Path, env: dict[str, str]) -> None:
    proc = _run(env, tmp_path / "out", "clean", steps=60, step_sleep=0.0)
    try:
        err = finish_cli(proc, timeout_s=90)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    run_id = (
        next(line for line in err.splitlines() if "exited with status" in line).split(" run ")[1].split()[0]
    )
    events = _events(env, run_id)
    ended = _one(events, "run_ended")
    assert ended["attrs"]["exit_status"] == "0", ended
    assert "failed_rank" not in ended["attrs"], ended
    assert events[-1]["kind"] == "run_ended", [e["kind"] for e in events]


@pytest.mark.timeout(120)
def test_a_control_plane_killed_while_a_job_runs_is_journaled_by_its_successor(
    tmp_path: Path, tl_home: Path, env: dict[str, str]
) -> None:
    proc = _run(env, tmp_path / "out", "cpkill", steps=4000, step_sleep=0.01)
    try:
        job = status_job(env, 3, proc=proc, job="cpkill")
        old = discovery.read(tl_home / discovery.FILE_NAME)
        assert old is not None
        os.kill(old.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            new = discovery.read(tl_home / discovery.FILE_NAME)
            if new is not None and new.pid != old.pid and "cpkill" in new.jobs:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "no new control plane"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        err = finish_cli(proc, timeout_s=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    events = _events(env, job["run_id"])
    restarted = _one(events, "control_plane_restarted")
    assert restarted["attrs"]["previous_pid"] == str(old.pid), restarted
    assert restarted["attrs"]["pid"] == str(new.pid), restarted
    assert restarted["attrs"]["ended"] == "killed", restarted
    assert _one(events, "run_ended")["attrs"]["exit_status"] == "143"
