"""A real 2-rank torchrun job of examples/train_tiny.py follows commands published into JetStream:
both ranks decide each command at the same step, lr changes exactly from that step, acks arrive."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import nats
import pytest

from tests.integration import helpers
from tests.integration.helpers import read_records, torchrun
from torchloom import bus, subjects, wire
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    Heartbeat,
    Issuer,
    RankState,
    SetConfig,
)
from torchloom.nats_server import EmbeddedNats

JOB = "tinyjob"


@pytest.fixture
def job_env(subprocess_env: dict[str, str], nats_server: EmbeddedNats) -> dict[str, str]:
    return helpers.job_env(subprocess_env, JOB, server=nats_server)


def command(job: str, run_id: str, seq: int, what: dict[str, object] | ActionKind) -> Command:
    """A command as the weaver would publish it (signed): a config change (a dict) or an action."""
    body = Action(kind=what) if isinstance(what, ActionKind) else SetConfig(values=what)  # type: ignore[arg-type]
    return helpers.signed(
        Command(
            command_id=f"c{seq}",
            job=job,
            run_id=run_id,
            seq=seq,
            issuer=Issuer(kind="cli", identity="test"),
            issued_at_s=time.time(),
            body=body,
        )
    )


async def test_commands_decided_at_same_step_on_both_ranks(
    tmp_path: Path,
    job_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    run_id = job_env["TORCHLOOM_RUN_ID"]
    out = tmp_path / "out"
    nc = await helpers.connect(nats_server)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, shared_commands=False)
        stream = await bus.ensure_job_commands(js, JOB)  # what the job's registration does
        await helpers.make_rank_consumers(nc, JOB)  # what the weaver does at their first heartbeat
        acks: list[Ack] = []
        heartbeats: list[Heartbeat] = []

        all_acks = asyncio.Event()

        async def on_ack(msg: nats.aio.msg.Msg) -> None:
            acks.append(wire.decode_ack(msg.data))
            if len({(a.seq, a.rank) for a in acks}) >= 4:
                all_acks.set()

        async def on_hb(msg: nats.aio.msg.Msg) -> None:
            heartbeats.append(wire.decode_heartbeat(msg.data))

        await nc.subscribe(subjects.acks(JOB), cb=on_ack)
        await nc.subscribe(subjects.heartbeats_of(JOB), cb=on_hb)

        # Published at step 20 and decided a few steps later: the other steps are margin for a loaded
        # machine, then only waited for (about 13 ms a step).
        proc = torchrun(out, job_env, steps=150, step_sleep=0.01)
        procs.append(proc)

        # Publish once both ranks are training (their records grow), so the change lands mid-run.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(read_records(out / f"rank{r}.jsonl")) >= 20 for r in (0, 1)):
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            await asyncio.sleep(0.05)
        else:
            pytest.fail("ranks did not start training within 60 s")

        subject = stream.subject(run_id)  # where the weaver publishes (a weaver-only subject)
        await js.publish(subject, wire.encode(command(JOB, run_id, 1, {"lr": 0.005})))
        await js.publish(subject, wire.encode(command(JOB, run_id, 2, {"momentum": 0.5})))

        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
        async with asyncio.timeout(30):
            await all_acks.wait()
    finally:
        await nc.close()

    applied = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    for rank_applied in applied:
        assert [(a["seq"], a["kind"], a["status"]) for a in rank_applied] == [
            (1, "set", "applied"),
            (2, "set", "rejected"),
        ]
    # Same step on every rank, for every command.
    assert applied[0][0]["step"] == applied[1][0]["step"]
    assert applied[0][1]["step"] == applied[1][1]["step"]
    assert applied[0][0]["values"] == {"lr": 0.005}
    assert all("unknown knob 'momentum'" in a[1]["reason"] for a in applied)

    apply_step = applied[0][0]["step"]
    for r in (0, 1):
        records = read_records(out / f"rank{r}.jsonl")
        assert len(records) == 150
        for rec in records:
            want = 0.005 if rec["step"] >= apply_step else 0.001  # type: ignore[operator]
            assert rec["lr"] == {"body": want, "head": want}, rec

    got = {(a.seq, a.rank): a for a in acks}
    assert set(got) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert got[1, 0].status is AckStatus.APPLIED and got[1, 1].status is AckStatus.APPLIED
    assert got[2, 0].status is AckStatus.REJECTED and got[2, 1].status is AckStatus.REJECTED
    assert {got[1, r].step for r in (0, 1)} == {apply_step}
    assert all(got[s, r].received_at_s <= got[s, r].decided_at_s for s in (1, 2) for r in (0, 1))

    # Heartbeats reported the knob schema with both named groups, and the job finished cleanly.
    lr_specs = [k for hb in heartbeats for k in hb.knobs if k.name == "lr"]
    assert lr_specs and lr_specs[-1].groups == ("body", "head")
    assert {hb.rank for hb in heartbeats} == {0, 1}
    assert {hb.state.value for hb in heartbeats if hb.rank == 0} >= {"running", "finished"}


async def test_pause_holds_every_rank_and_commands_while_paused_apply_at_the_same_step(
    tmp_path: Path,
    job_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    run_id = job_env["TORCHLOOM_RUN_ID"]
    out = tmp_path / "out"
    nc = await helpers.connect(nats_server)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, shared_commands=False)
        stream = await bus.ensure_job_commands(js, JOB)  # what the job's registration does
        await helpers.make_rank_consumers(nc, JOB)  # what the weaver does at their first heartbeat
        paused = asyncio.Event()
        paused_ranks: set[int] = set()

        async def on_hb(msg: nats.aio.msg.Msg) -> None:
            hb = wire.decode_heartbeat(msg.data)
            if hb.state is RankState.PAUSED:
                paused_ranks.add(hb.rank)
                if paused_ranks == {0, 1}:
                    paused.set()

        await nc.subscribe(subjects.heartbeats_of(JOB), cb=on_hb)
        proc = torchrun(out, job_env, steps=120, step_sleep=0.01)  # paused at about step 20
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not all(len(read_records(out / f"rank{r}.jsonl")) >= 20 for r in (0, 1)):
            assert time.monotonic() < deadline, "ranks did not start training within 60 s"
            assert proc.poll() is None
            await asyncio.sleep(0.05)

        subject = stream.subject(run_id)  # where the weaver publishes (a weaver-only subject)
        await js.publish(subject, wire.encode(command(JOB, run_id, 1, ActionKind.PAUSE)))
        async with asyncio.timeout(30):
            await paused.wait()
        # While paused no rank makes progress, whatever the wall clock does.
        held = [len(read_records(out / f"rank{r}.jsonl")) for r in (0, 1)]
        await js.publish(subject, wire.encode(command(JOB, run_id, 2, {"weight_decay": 0.25})))
        await js.publish(subject, wire.encode(command(JOB, run_id, 3, ActionKind.RESUME)))
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
    finally:
        await nc.close()

    applied = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    for x in applied:
        assert [(a["seq"], a["kind"], a["status"]) for a in x] == [
            (1, "pause", "applied"),
            (2, "set", "applied"),
            (3, "resume", "applied"),
        ]
    # The pause step is where every rank stopped; commands decided while paused carry that step.
    pause_step = applied[0][0]["step"]
    assert {a["step"] for x in applied for a in x} == {pause_step}
    assert held == [pause_step, pause_step]
    for r in (0, 1):
        records = read_records(out / f"rank{r}.jsonl")
        assert len(records) == 120
        for rec in records:
            want = 0.25 if rec["step"] >= pause_step else 0.01  # type: ignore[operator]
            assert rec["weight_decay"]["body"] == want, rec  # type: ignore[index]
