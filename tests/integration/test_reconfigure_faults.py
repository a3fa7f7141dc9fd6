"""Crash and hang paths end to end: a real `torchloom run` of a 2-rank torchrun job on CPU (weaver in
process, NATS external so the journal outlives the run); the test kills a rank with SIGKILL or makes it
stall, and checks the weaver's events, the devices view and the ranks' own records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import auth, job_events, read_all_records, run_creds, unbound_env, until
from torchloom import discovery
from torchloom.client import ControlClient
from torchloom.messages import (
    Action,
    ActionKind,
    Issuer,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StatusReply,
    SubmitRequest,
)
from torchloom.nats_server import EmbeddedNats

SCRIPT = Path(__file__).resolve().parent / "scripts" / "reconf_train.py"
JOB = "reconf"


@pytest.fixture
def run_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"))


@contextlib.asynccontextmanager
async def _torchloom_run(args: list[str], env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`torchloom run` as a child; on the way out it gets SIGTERM (forwarded to torchrun), then SIGKILL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torchloom.app.cli", "run", "--job", JOB, *args, env=env,
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _client(proc: asyncio.subprocess.Process) -> ControlClient:
    """A client of the weaver `torchloom run` started (it writes the discovery file in TORCHLOOM_HOME)."""
    info = await until("the weaver's discovery file", discovery.read, timeout_s=60, proc=proc)
    return ControlClient(info.grpc)


async def _status(client: ControlClient) -> StatusReply | None:
    try:
        async with asyncio.timeout(5):
            return await client.status(JOB)
    except Exception:  # not up yet, or the job has no heartbeat yet
        return None


async def _at_step(client: ControlClient, run_id: str | None, step: int) -> StatusReply | None:
    reply = await _status(client)
    if reply is None or not reply.jobs:
        return None
    job = reply.jobs[0]
    ranks = [r for r in job.ranks if r.alive]
    ok = len(ranks) == 2 and min(r.step for r in ranks) >= step and run_id in (None, job.run_id)
    return reply if ok else None


@pytest.mark.timeout(120)
async def test_kill_9_of_a_rank_is_detected_and_torchrun_restarts_from_the_checkpoint(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str], tl_home: Path
) -> None:
    out = tmp_path / "out"
    # The kill comes about 15 steps after step 10 (checkpoint, then 5 steps); after the restart the
    # job trains from the checkpoint to the end, so every step past the kill's margin (here about
    # 170 steps, 5 s) is only waited for.
    steps = 200
    args = [*run_creds(nats_server, JOB), "--max-restarts", "1", "--nproc-per-node", "2"]
    script = [str(SCRIPT), "--steps", str(steps), "--step-sleep", "0.02", "--out", str(out)]
    async with _torchloom_run([*args, *script], run_env) as proc:
        client = await _client(proc)
        async with client:
            reply = await until(
                "both ranks at step 10", lambda: _at_step(client, None, 10), timeout_s=60, proc=proc
            )
            base_run = reply.jobs[0].run_id
            outcome = await client.submit(
                SubmitRequest(
                    job=JOB,
                    issuer=Issuer(kind="test", identity="crash"),
                    body=Action(kind=ActionKind.CHECKPOINT),
                )
            )
            assert outcome.status is OutcomeStatus.APPLIED, outcome
            ckpt_step = int(outcome.results[0].detail["checkpoint_step"])
            # A few steps past the checkpoint, so the restart has something to redo.
            reply = await until(
                "steps after the checkpoint", lambda: _at_step(client, base_run, ckpt_step + 5), timeout_s=30
            )
            victim = next(r for r in reply.jobs[0].ranks if r.rank == 1)
            assert victim.pid > 0 and victim.pid != os.getpid()
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.time()
            async with asyncio.timeout(90):
                code = await proc.wait()
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert code == 0, err[-4000:]

    events = await job_events(nats_server.url, JOB, credentials=auth(nats_server))
    dead = [
        e for e in events if e.kind == "rank_dead" and e.run_id == base_run and e.attrs.get("rank") == "1"
    ]
    assert dead, [(e.kind, e.run_id, dict(e.attrs)) for e in events]
    assert dead[0].time_s >= killed_at
    resumed = [e for e in events if e.kind == "resumed"]
    assert [e.run_id for e in resumed] == [f"{base_run}-a1"], [(e.kind, e.run_id) for e in events]
    assert int(resumed[0].attrs["resume_step"]) == ckpt_step

    trained = 0
    for rank in (0, 1):
        recs = read_all_records(out / f"rank{rank}.jsonl")
        first = [r["step"] for r in recs if r["run"] == base_run]
        again = [r["step"] for r in recs if r["run"] == f"{base_run}-a1"]
        assert first == list(range(len(first))) and len(first) >= ckpt_step + 5
        trained = max(trained, len(first))
        # The restarted group starts exactly at the checkpoint and trains to the end.
        assert again == list(range(ckpt_step, steps)), (rank, again[:5], again[-5:])
    # The weaver counts from the last heartbeats, which can trail the last recorded step a little.
    assert 5 <= int(resumed[0].attrs["steps_lost"]) <= trained - ckpt_step


@pytest.mark.timeout(90)
async def test_a_stalled_rank_is_reported_hung_then_recovers(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str], tl_home: Path
) -> None:
    out = tmp_path / "out"
    args = [*run_creds(nats_server, JOB), "--hung-after", "1.5", "--nproc-per-node", "2"]
    # Rank 1 hangs until the test has seen it reported hung (about 2 s in, --hung-after 1.5) by status
    # and by `torchloom devices`, then is released: no fixed hang to outlast a loaded machine's lag,
    # none waited out (bounded at 60 s).
    release = tmp_path / "release"
    script = [
        str(SCRIPT), "--steps", "60", "--hang-at", "20", "--hang-s", "60", "--hang-until", str(release),
        "--out", str(out),
    ]  # fmt: skip
    async with _torchloom_run([*args, *script], run_env) as proc:
        client = await _client(proc)
        async with client:
            seen: list[tuple[int, int, str, str]] = []  # the last status's ranks, for the failure text

            async def hung_rank_1() -> bool:
                reply = await _status(client)
                if reply is None or not reply.jobs:
                    return False
                ranks = reply.jobs[0].ranks
                seen[:] = [(r.rank, r.step, r.health, r.health_reason) for r in ranks]
                return any(r.rank == 1 and r.health == "hung" for r in ranks)

            try:
                await until("rank 1 reported hung", hung_rank_1, timeout_s=60, proc=proc)
            except pytest.fail.Exception as exc:
                raise AssertionError(f"{exc}; last status (rank, step, health, reason): {seen}") from exc
            devices = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "torchloom.app.cli", "devices", "--json", env=run_env,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            raw, _ = await devices.communicate()
            rows = {d["rank"]: d for d in json.loads(raw)["devices"]}
            assert rows[1]["state"] == "hung", rows
            assert "unchanged" in rows[1]["reason"], rows
            release.touch()
            async with asyncio.timeout(60):
                code = await proc.wait()
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert code == 0, err[-4000:]
    events = await job_events(nats_server.url, JOB, credentials=auth(nats_server))
    hung = [e for e in events if e.kind == "rank_hung" and e.attrs.get("rank") == "1"]
    assert hung, [(e.kind, dict(e.attrs)) for e in events]
    recovered = [e for e in events if e.kind == "rank_recovered" and e.attrs.get("rank") == "1"]
    assert recovered and recovered[0].time_s > hung[0].time_s
    assert [r["step"] for r in read_all_records(out / "rank1.jsonl")] == list(range(60))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_weaver(server: EmbeddedNats, grpc: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """A standalone `torchloom weaver` on the external NATS, once it answers Status."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torchloom.app.cli", "weaver", *run_creds(server, JOB), "--grpc", grpc, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def answers() -> bool:
        try:
            async with asyncio.timeout(3), ControlClient(grpc) as c:
                await c.status()
        except Exception:  # not bound yet
            return False
        return True

    await until(f"a weaver at {grpc}", answers, timeout_s=60, proc=proc)
    return proc


async def _journal(client: ControlClient) -> list[Any]:
    async with asyncio.timeout(20):
        return [e async for e in client.journal(JOB)]


def _device_map(ranks: Any) -> dict[int, tuple[Any, ...]]:
    """Which device each rank runs on (identity and health, not the ever-changing load figures)."""
    return {
        r.rank: (
            r.local_rank,
            r.host,
            r.health,
            *((r.device.kind, r.device.device, r.device.healthy) if r.device else ()),
        )
        for r in ranks
    }


def _last_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return -1
    return json.loads(lines[-1])["step"] if lines else -1


@pytest.mark.timeout(120)
async def test_kill_9_of_the_weaver_mid_run_loses_nothing_and_training_goes_on(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str], tl_home: Path
) -> None:
    out = tmp_path / "out"
    grpc = f"127.0.0.1:{_free_port()}"
    weaver = await _start_weaver(nats_server, grpc, run_env)
    try:
        args = [*run_creds(nats_server, JOB), "--grpc", grpc, "--nproc-per-node", "2"]
        script = [str(SCRIPT), "--steps", "100000", "--step-sleep", "0.02", "--out", str(out)]
        async with _torchloom_run([*args, *script], run_env) as proc:
            async with ControlClient(grpc) as client:
                before = await until(
                    "both ranks at step 5", lambda: _at_step(client, None, 5), timeout_s=60, proc=proc
                )
                issuer = Issuer(kind="test", identity="weaver-restart")

                applied = await client.submit(
                    SubmitRequest(job=JOB, issuer=issuer, body=SetConfig(values={"lr": 0.005}))
                )
                assert applied.status is OutcomeStatus.APPLIED, applied
                before = await _status(client)
                assert before is not None
            weaver.kill()  # SIGKILL: no goodbye, no state saved beyond the streams
            await weaver.wait()
            stalled_at = _last_step(out / "rank0.jsonl")
            # Training does not wait for the weaver: the step moves on while it is gone.
            await until(
                "steps without a weaver",
                lambda: _last_step(out / "rank0.jsonl") >= stalled_at + 20,
                timeout_s=30,
                proc=proc,
            )
            moved = _last_step(out / "rank0.jsonl")
            weaver = await _start_weaver(nats_server, grpc, run_env)
            async with ControlClient(grpc) as client:

                async def back_with_knobs() -> StatusReply | None:
                    # Idle heartbeats carry the knob schema's hash; a new weaver knows the schema
                    # from the next full one (at most 2 s later), and reports no knobs until then.
                    reply = await _at_step(client, None, moved)
                    return reply if reply is not None and reply.jobs[0].knobs else None

                after = await until("ranks back in the new weaver", back_with_knobs, timeout_s=30, proc=proc)
                old_job, new_job = before.jobs[0], after.jobs[0]
                assert new_job.run_id == old_job.run_id and new_job.world_size == 2
                assert {r.rank: r.pid for r in new_job.ranks} == {r.rank: r.pid for r in old_job.ranks}
                assert _device_map(new_job.ranks) == _device_map(old_job.ranks)
                assert applied.command is not None
                assert dict((k.name, k.value) for k in new_job.knobs)["lr"] == 0.005
                assert new_job.last_seq >= applied.command.seq
                entries = await _journal(client)
                sets = [e for e in entries if isinstance(e, Outcome) and e.command_id == applied.command_id]
                assert [e.status for e in sets] == [OutcomeStatus.APPLIED], entries
                # The new weaver drives the job: a stop goes through and the job exits 0.
                stopped = await client.submit(
                    SubmitRequest(job=JOB, issuer=issuer, body=Action(kind=ActionKind.STOP))
                )
                assert stopped.status is OutcomeStatus.APPLIED, stopped
                assert stopped.command is not None and stopped.command.seq == applied.command.seq + 1
            async with asyncio.timeout(60):
                code = await proc.wait()
            err = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert code == 0, err[-4000:]
        assert "reusing weaver" in err, err[-2000:]
    finally:
        if weaver.returncode is None:
            weaver.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await weaver.wait()
            except TimeoutError:
                weaver.kill()
                await weaver.wait()
