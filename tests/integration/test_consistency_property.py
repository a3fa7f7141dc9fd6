"""Property: random commands (sets, pauses, accumulation changes, and commands refused by the weaver
or by every rank) with fresh random delivery delays and filing orders on 3 ranks are each decided
once per rank, at one step on every rank, in seq order (within a step too); every applied value is
the one the training uses from that step on; the job stops with exit 0. Real nats-server, real
weaver, real 3-process torchrun of examples/train_tiny.py, once on each agreement path (riding DDP's
gradient all-reduce, and the gloo fallback); each job takes a phase of commands with gradient
accumulation off (no accumulation command: one micro-step throughout), then a phase with it on (the
phase opens with grad_accum_steps=3 and sets it at random). The delays come from the threadlet's
test-only TORCHLOOM_TEST_DELIVERY_DELAY_S/SEED hook (each rank files each command after its own
random delay); the seed is printed so a failure reproduces."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.conftest import REPO
from tests.integration.helpers import connect, kill_tree, rank_creds, until, weaver_config, weaver_pubkey
from torchloom import subjects, wire
from torchloom.client import ControlClient
from torchloom.messages import Ack, Action, ActionKind, Issuer, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver

WORLD = 3
COMMANDS = 120
CONCURRENCY = 12
INITIAL = {
    "lr": {"body": 1e-3, "head": 1e-3},
    "weight_decay": {"body": 1e-2, "head": 0.0},
    "grad_accum_steps": 1,
}

Body = SetConfig | Action


def random_body(rng: random.Random, paused: bool, accum: bool) -> Body:
    roll = rng.random()
    if roll < 0.08:
        # Pause and resume interleave with sets: commands sent while paused must apply in order.
        return Action(kind=ActionKind.RESUME if paused else ActionKind.PAUSE)
    if roll < 0.14:
        # Refused by every rank when filed (outside the data roots), never by the weaver.
        return Action(
            kind=ActionKind.DATA_ADD, args={"name": f"d{rng.randrange(10**6)}", "path": "/nonexistent/x.pt"}
        )
    if roll < 0.18:
        return SetConfig(values={"lr": "-1"})  # refused by the weaver: never published
    if accum and roll < 0.26:
        return SetConfig(values={"grad_accum_steps": str(rng.choice([1, 2, 3]))})
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


def in_effect(expected: dict[str, Any], values: dict[str, Any]) -> None:
    """Fold one applied set into the expected knob values: a plain key sets every group, except
    that a plain weight_decay sets only the groups with weight decay (all of them when none has)."""
    for key, value in values.items():
        name, _, group = key.partition("@")
        if name in ("lr", "weight_decay"):
            groups = [group] if group else ["body", "head"]
            if name == "weight_decay" and not group:
                groups = [g for g in groups if expected[name][g] != 0.0] or groups
            for g in groups:
                expected[name][g] = float(value)
        elif name == "grad_accum_steps":
            expected[name] = int(value)


def phase_bodies(rng: random.Random, accum: bool) -> list[Body]:
    """COMMANDS random bodies (one more to resume if they leave the job paused); with `accum`, the
    first sets grad_accum_steps=3 and later ones may change it."""
    bodies: list[Body] = [SetConfig(values={"grad_accum_steps": "3"})] if accum else []
    paused = False
    while len(bodies) < COMMANDS:
        body = random_body(rng, paused, accum)
        if isinstance(body, Action) and body.kind in (ActionKind.PAUSE, ActionKind.RESUME):
            paused = body.kind is ActionKind.PAUSE
        bodies.append(body)
    if paused:
        bodies.append(Action(kind=ActionKind.RESUME))
    return bodies


@pytest.mark.timeout(900)
@pytest.mark.parametrize("agreement", ["auto", "gloo"])
async def test_random_commands_decide_once_at_one_step_in_order_and_take_effect(
    nats_server: EmbeddedNats, subprocess_env: dict[str, str], tmp_path: Path, agreement: str
) -> None:
    seed = random.randrange(2**31)
    print(f"consistency seed={seed} agreement={agreement}")
    rng = random.Random(seed)
    job, run_id, out = "prop", uuid.uuid4().hex[:8], tmp_path / "out"
    env = dict(
        subprocess_env,
        **rank_creds(nats_server, job),
        TORCHLOOM_JOB=job,
        TORCHLOOM_RUN_ID=run_id,
        TORCHLOOM_TEST_DELIVERY_DELAY_S="0.05",
        TORCHLOOM_TEST_DELIVERY_SEED=str(seed),
        TORCHLOOM_AGREEMENT=agreement,
        TORCHLOOM_WEAVER_PUBKEY=weaver_pubkey(),
        TORCHLOOM_DATA_ROOTS=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    acks: list[Ack] = []
    tap = await connect(nats_server)

    async def on_ack(msg: nats.aio.msg.Msg) -> None:
        acks.append(wire.decode_ack(msg.data))

    await tap.subscribe(subjects.acks(job), cb=on_ack)
    log = tmp_path / "job.log"
    async with open_weaver(weaver_config(nats_server, dead_after_s=5.0)) as weaver:
        sink = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--standalone",
            str(REPO / "examples" / "train_tiny.py"), "--steps", "1000000", "--step-sleep", "0.002",
            "--out", str(out),
            env=env, stdout=sink, stderr=sink, start_new_session=True,
        )  # fmt: skip
        os.close(sink)  # the job holds its own copy
        try:
            async with ControlClient(weaver.grpc_address, command_timeout_s=120) as client:
                await wait_ranks(client, job, WORLD, 180)
                # One job, two phases (a torchrun of 3 ranks costs seconds of both cores to start).
                phases = [phase_bodies(rng, accum) for accum in (False, True)]
                bodies = [body for phase in phases for body in phase]
                sem = asyncio.Semaphore(CONCURRENCY)
                issuer = Issuer(kind="agent", identity="property-test")

                async def submit(body: Body) -> OutcomeStatus:
                    async with sem:
                        req = SubmitRequest(job=job, body=body, issuer=issuer, timeout_s=120)
                        return (await client.submit(req)).status

                # Submitted in order through a bounded window, so several are in flight at once; a
                # phase's last window ends before the next phase's first.
                statuses: list[OutcomeStatus] = []
                for phase in phases:
                    for i in range(0, len(phase), CONCURRENCY):
                        statuses += await asyncio.gather(*(submit(b) for b in phase[i : i + CONCURRENCY]))
                for body, status in zip(bodies, statuses, strict=True):
                    refused = isinstance(body, Action) and body.kind is ActionKind.DATA_ADD
                    refused = refused or (isinstance(body, SetConfig) and body.values.get("lr") == "-1")
                    want = OutcomeStatus.REJECTED if refused else OutcomeStatus.APPLIED
                    assert status is want, (seed, body, status)
                stop = await client.submit(
                    SubmitRequest(job=job, body=Action(kind=ActionKind.STOP), issuer=issuer, timeout_s=120)
                )
                assert stop.status is OutcomeStatus.APPLIED, (seed, stop)
            async with asyncio.timeout(180):
                code = await proc.wait()
            assert code == 0, (seed, log.read_text()[-3000:])
        finally:
            if proc.returncode is None:
                kill_tree(proc.pid)  # torchrun's ranks run in sessions of their own: not its group
                await proc.wait()
    await tap.flush()
    await tap.close()
    text = log.read_text()
    want_path = "gloo" if agreement == "gloo" else "piggyback"
    assert f"agreement path: {want_path}" in text, text[-2000:]
    published = sum(not (isinstance(b, SetConfig) and b.values.get("lr") == "-1") for b in bodies) + 1
    # Every rank's own acks: each command decided exactly once per rank, at one step on all ranks,
    # with one verdict, and steps never go down as seq goes up.
    by_seq: dict[int, dict[int, Ack]] = {}
    for ack in acks:
        if ack.detail.get("notice"):
            continue
        per_rank = by_seq.setdefault(ack.seq, {})
        assert ack.rank not in per_rank, f"seed {seed}: seq {ack.seq} acked twice by rank {ack.rank}"
        per_rank[ack.rank] = ack
    assert sorted(by_seq) == list(range(1, published + 1)), seed
    last_step = -1
    for seq in sorted(by_seq):
        per_rank = by_seq[seq]
        assert sorted(per_rank) == list(range(WORLD)), f"seed {seed}: seq {seq} not acked by every rank"
        steps = {a.step for a in per_rank.values()}
        assert len(steps) == 1, f"seed {seed}: seq {seq} decided at different steps: {steps}"
        assert len({a.status for a in per_rank.values()}) == 1, f"seed {seed}: seq {seq} verdicts differ"
        step = steps.pop()
        assert step >= last_step, f"seed {seed}: seq {seq} decided before seq {seq - 1}"
        last_step = step
    for rank in range(WORLD):
        applied = json.loads((out / f"rank{rank}.applied.json").read_text())
        # In seq order within a step too: the rank's own decision log.
        assert [d["seq"] for d in applied] == list(range(1, published + 1)), seed
        assert [d["step"] for d in applied] == sorted(d["step"] for d in applied), seed
        assert [d["step"] for d in applied] == [by_seq[d["seq"]][rank].step for d in applied], seed
        # Each applied value is the one in effect from its step on, until the next set.
        sets = [d for d in applied if d["status"] == "applied" and d.get("values")]
        expected = json.loads(json.dumps(INITIAL))
        i = 0
        records = [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        assert records, seed
        for rec in records:
            while i < len(sets) and sets[i]["step"] <= rec["step"]:
                in_effect(expected, sets[i]["values"])
                i += 1
            assert rec["lr"] == expected["lr"], (seed, rank, rec["step"])
            assert rec["weight_decay"] == expected["weight_decay"], (seed, rank, rec["step"])
            assert rec["grad_accum_steps"] == expected["grad_accum_steps"], (seed, rank, rec["step"])
        assert i == len(sets), (seed, rank, "a set decided after the last recorded step")
