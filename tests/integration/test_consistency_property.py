"""Property: with random delays injected into command delivery on 4 ranks, many random commands are
each decided at the same step on every rank, in the same order, exactly once, and training never
deadlocks. Real nats-server, real weaver, real 4-process torchrun; the delays come from the
threadlet's test-only TORCHLOOM_TEST_DELIVERY_DELAY_S hook (each rank sleeps a random time, seeded
by its rank, before filing each command it receives)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest

from tests.conftest import REPO
from tests.integration.helpers import connect, rank_creds, until, weaver_config, weaver_pubkey
from torchloom import subjects, wire
from torchloom.client import ControlClient
from torchloom.messages import Ack, Action, ActionKind, Issuer, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver

WORLD = 4
COMMANDS = 200
CONCURRENCY = 16


def random_body(rng: random.Random, paused: bool) -> SetConfig | Action:
    roll = rng.random()
    if roll < 0.08:
        # Pause and resume interleave with sets: commands sent while paused must apply in order.
        return Action(kind=ActionKind.RESUME if paused else ActionKind.PAUSE)
    if roll < 0.6:
        return SetConfig(values={"lr": f"{rng.uniform(1e-5, 1e-2):.6g}"})
    if roll < 0.85:
        return SetConfig(values={"weight_decay": f"{rng.uniform(0, 0.2):.4g}"})
    group = rng.choice(["body", "head"])
    return SetConfig(values={f"lr@{group}": f"{rng.uniform(1e-5, 1e-2):.6g}", "weight_decay": "0.01"})


async def wait_ranks(client: ControlClient, job: str, world: int, deadline_s: float) -> None:
    async def reported() -> bool:
        jobs = [j for j in (await client.status()).jobs if j.job == job]
        return bool(jobs and sum(r.alive for r in jobs[0].ranks) == world and jobs[0].knobs)

    await until(f"{world} ranks of {job} with their knobs", reported, timeout_s=deadline_s)


@pytest.mark.timeout(420)
async def test_random_commands_with_random_delivery_delays_apply_identically_on_4_ranks(
    nats_server: EmbeddedNats, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(20261121)
    job, run_id, out = "prop", uuid.uuid4().hex[:8], tmp_path / "out"
    env = dict(
        subprocess_env,
        **rank_creds(nats_server, job),
        TORCHLOOM_JOB=job,
        TORCHLOOM_RUN_ID=run_id,
        TORCHLOOM_TEST_DELIVERY_DELAY_S="0.05",
        TORCHLOOM_WEAVER_PUBKEY=weaver_pubkey(),
        OMP_NUM_THREADS="1",
    )
    acks: list[Ack] = []
    tap = await connect(nats_server)

    async def on_ack(msg: nats.aio.msg.Msg) -> None:
        acks.append(wire.decode_ack(msg.data))

    await tap.subscribe(subjects.acks(job), cb=on_ack)
    async with open_weaver(weaver_config(nats_server, dead_after_s=5.0)) as weaver:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--standalone",
            str(REPO / "examples" / "train_tiny.py"), "--steps", "100000", "--step-sleep", "0.002",
            "--out", str(out),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            async with ControlClient(weaver.grpc_address, command_timeout_s=120) as client:
                await wait_ranks(client, job, WORLD, 120)
                bodies: list[SetConfig | Action] = []
                paused = False
                for _ in range(COMMANDS):
                    body = random_body(rng, paused)
                    if isinstance(body, Action):
                        paused = body.kind is ActionKind.PAUSE
                    bodies.append(body)
                if paused:
                    bodies.append(Action(kind=ActionKind.RESUME))
                sem = asyncio.Semaphore(CONCURRENCY)
                issuer = Issuer(kind="agent", identity="property-test")

                async def submit(body: SetConfig | Action) -> OutcomeStatus:
                    async with sem:
                        req = SubmitRequest(job=job, body=body, issuer=issuer, timeout_s=120)
                        return (await client.submit(req)).status

                # Submitted in order through a bounded window, so several are in flight at once.
                statuses = []
                for i in range(0, len(bodies), CONCURRENCY):
                    statuses += await asyncio.gather(*(submit(b) for b in bodies[i : i + CONCURRENCY]))
                assert statuses == [OutcomeStatus.APPLIED] * len(bodies)
                # Everything decided: end the job (no deadlock means it stops on SIGTERM promptly).
                final = await client.status(job=job)
                assert final.jobs[0].last_seq >= len(bodies)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await proc.wait()
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    await tap.flush()
    await tap.close()
    # Every rank's own acks: each command decided exactly once per rank, at one step on all ranks,
    # in seq order (the step never goes down as seq goes up), and applied everywhere.
    by_seq: dict[int, dict[int, Ack]] = {}
    for ack in acks:
        per_rank = by_seq.setdefault(ack.seq, {})
        assert ack.rank not in per_rank, f"seq {ack.seq} acked twice by rank {ack.rank}"
        per_rank[ack.rank] = ack
    assert sorted(by_seq) == list(range(1, len(bodies) + 1))
    last_step = -1
    for seq in sorted(by_seq):
        per_rank = by_seq[seq]
        assert sorted(per_rank) == list(range(WORLD)), f"seq {seq} not acked by every rank"
        steps = {a.step for a in per_rank.values()}
        assert len(steps) == 1, f"seq {seq} decided at different steps: {steps}"
        assert {a.status.value for a in per_rank.values()} == {"applied"}
        step = steps.pop()
        assert step >= last_step, f"seq {seq} decided before seq {seq - 1}"
        last_step = step
