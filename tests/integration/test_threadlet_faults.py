"""The bus is not on the training path: a killed nats-server leaves the job finishing cleanly, a
restarted one delivers commands published after the restart, and finish() exits 0 every time."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from tests.integration import helpers
from tests.integration.helpers import kill_tree, read_records, torchrun, until
from tests.integration.test_threadlet_commands import command
from torchloom import bus, subjects, wire
from torchloom.nats_server import EmbeddedNats

JOB = "faultjob"


@pytest.fixture
def job_env(subprocess_env: dict[str, str], nats_server: EmbeddedNats) -> dict[str, str]:
    return helpers.job_env(subprocess_env, JOB, server=nats_server)


async def wait_training(out: Path, proc: subprocess.Popen[bytes], steps: int, timeout_s: float = 60) -> None:
    def trained() -> bool:
        return all(len(read_records(out / f"rank{r}.jsonl")) >= steps for r in (0, 1))

    await until(f"both ranks at {steps} steps", trained, timeout_s=timeout_s, interval_s=0.05, proc=proc)


async def wait_consumers(server: EmbeddedNats, count: int, timeout_s: float = 30) -> None:
    """Poll the job's command stream until `count` consumers (one per rank) follow it."""
    nc = await helpers.connect(server)
    try:
        js = nc.jetstream()

        async def following() -> bool:
            return (await js.stream_info(subjects.stream_commands_of(JOB))).state.consumer_count >= count

        await until(
            f"{count} consumers on the command stream", following, timeout_s=timeout_s, interval_s=0.05
        )
    finally:
        await nc.close()


async def test_killed_nats_server_does_not_stop_training(
    tmp_path: Path, job_env: dict[str, str], nats_server: EmbeddedNats, procs: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    proc = torchrun(out, job_env, steps=300, step_sleep=0.01)
    procs.append(proc)
    await wait_training(out, proc, 30)
    nats_server.kill()
    stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
    for r in (0, 1):
        assert len(read_records(out / f"rank{r}.jsonl")) == 300
        assert json.loads((out / f"rank{r}.applied.json").read_text()) == []


async def test_command_after_server_restart_still_arrives(
    tmp_path: Path, job_env: dict[str, str], nats_server: EmbeddedNats, procs: list[subprocess.Popen[bytes]]
) -> None:
    run_id = job_env["TORCHLOOM_RUN_ID"]
    nc = await helpers.connect(nats_server)
    await bus.ensure_streams(nc.jetstream(), shared_commands=False)
    stream = await bus.ensure_job_commands(nc.jetstream(), JOB)
    await helpers.make_rank_consumers(nc, JOB)  # what the weaver does at their first heartbeat
    out = tmp_path / "out"
    # The command is published about 15 steps in and applied about 10 steps later (load 3 to 5); the
    # rest only waits for the end, so 600 steps leave a margin of seconds at 10 ms a step.
    steps = 600
    try:
        proc = torchrun(out, job_env, steps=steps, step_sleep=0.01)
        procs.append(proc)
        await wait_training(out, proc, 10)
        await wait_consumers(nats_server, 2)
    finally:
        await nc.close()

    nats_server.kill()
    # Same port and JetStream store: the stream survives; the ranks' consumers (their state is in the
    # server's memory) and waiting pull requests do not. Each rank asks again, told "no consumer"
    # until the weaver's part makes it again at the rank's next heartbeat.
    nats_server.start()
    nc = await helpers.connect(nats_server)
    try:
        await helpers.make_rank_consumers(nc, JOB)
        await nc.jetstream().publish(
            stream.subject(run_id), wire.encode(command(JOB, run_id, 1, {"lr@head": 0.004}))
        )
        published_at_step = min(len(read_records(out / f"rank{r}.jsonl")) for r in (0, 1))
        assert published_at_step < steps - 200, "the job ran out of steps before the command; raise steps"
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=180)
    finally:
        await nc.close()
    assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
    applied = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    assert [[(a["seq"], a["status"]) for a in x] for x in applied] == [[(1, "applied")]] * 2
    step = applied[0][0]["step"]
    assert applied[1][0]["step"] == step
    for r in (0, 1):
        for rec in read_records(out / f"rank{r}.jsonl"):
            want = 0.004 if rec["step"] >= step else 0.001  # type: ignore[operator]
            assert rec["lr"] == {"body": 0.001, "head": want}, rec


@pytest.mark.slow
@pytest.mark.parametrize("run", range(6))  # separate tests: the two workers share them out
def test_finish_exits_zero_every_time(tmp_path: Path, job_env: dict[str, str], run: int) -> None:
    """The gloo exit trap: without finish() about 40% of such runs abort at exit, so six runs catch its
    return 95% of the time (ten took a minute of the suite's budget for 99%)."""
    out = tmp_path / f"run{run}"
    proc = torchrun(out, job_env, steps=5, step_sleep=0.0)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
    assert proc.returncode == 0, f"run {run}: " + stdout.decode(errors="replace")[-4000:]
    assert all(len(read_records(out / f"rank{r}.jsonl")) == 5 for r in (0, 1))


def _children(pid: int, running: str) -> list[int]:
    """The pids whose parent is `pid` and whose command line contains `running` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and running in (stat.parent / "cmdline").read_text():
                kids.append(int(stat.parent.name))
        except OSError:
            continue
    return kids


async def test_ranks_end_when_their_torchrun_agent_is_killed(
    tmp_path: Path, job_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    """torchrun starts its workers in sessions of their own with no parent-death signal: with its
    agent SIGKILLed, they would train on orphaned (here for 100,000 steps). The threadlet's watch ends
    them, saying why, with EXIT_ORPHANED."""
    out = tmp_path / "out"
    proc = torchrun(out, job_env, steps=100_000, step_sleep=0.01)
    procs.append(proc)
    await wait_training(out, proc, 10)
    ranks = _children(proc.pid, "train_tiny")
    assert len(ranks) == 2, ranks
    proc.kill()  # the agent only: its workers are in sessions of their own
    proc.wait(timeout=10)
    await until("both orphaned ranks gone", lambda: not any(Path(f"/proc/{p}").exists() for p in ranks))
    assert proc.stdout is not None
    said = proc.stdout.read().decode(errors="replace")
    for r in (0, 1):
        assert f"torchloom: rank {r}: its torchrun agent (pid {proc.pid}) is gone" in said, said[-3000:]
    assert len(read_records(out / "rank0.jsonl")) < 100_000
