"""Every built-in knob of examples/train_tiny.py through a real weaver and a real 2-rank torchrun job:
betas, eps, grad_clip_norm, grad_accum_steps, batch_size and mix in one command, `data add` then
`mix=extra:1`, a rollback across the mix change, and a replay of it all that is bit-identical."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from tests.integration.helpers import auth, read_records, replay_plan, submit, wait_training
from tests.integration.test_threadlet_actions import job_env, torchrun
from torchloom.client import ControlClient
from torchloom.messages import Action, ActionKind, SetConfig
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

ALL_KNOBS = {"lr", "weight_decay", "betas", "eps", "grad_clip_norm", "grad_accum_steps", "batch_size", "mix"}
FIRST = {
    "betas": "0.8,0.99",
    "eps": "1e-6",
    "grad_clip_norm": "1.0",
    "grad_accum_steps": "2",
    "batch_size": "16",
    "mix": "code:0.7,math:0.3,web:0",
}


async def wait_knobs(client: ControlClient, job: str) -> None:
    """Until the weaver's schema has every knob (training-loop knobs appear on the loop's first use)."""
    deadline = time.monotonic() + 30
    while True:
        names = {k.name for k in (await client.status(job)).jobs[0].knobs}
        if names >= ALL_KNOBS:
            return
        assert time.monotonic() < deadline, f"knobs {sorted(ALL_KNOBS - names)} never reported"
        await asyncio.sleep(0.05)


def check_knob_values(rec: dict[str, Any], first_step: int, extra_step: int) -> None:
    """The values a main-branch record shows before and after the decided steps."""
    step = rec["step"]
    if step < first_step:
        assert rec["betas"] == {"body": [0.9, 0.999], "head": [0.9, 0.999]}, rec
        assert rec["eps"] == {"body": 1e-8, "head": 1e-8}, rec
        assert (rec["grad_clip_norm"], rec["grad_norm"]) == (0.0, None), rec
        assert (rec["grad_accum_steps"], rec["batch_size"]) == (1, 32), rec
        assert sum(rec["counts"].values()) == 32 and "web" in rec["mix"], rec
        return
    assert rec["betas"] == {"body": [0.8, 0.99], "head": [0.8, 0.99]}, rec
    assert rec["eps"] == {"body": 1e-6, "head": 1e-6}, rec
    assert rec["grad_clip_norm"] == 1.0 and rec["grad_norm"] is not None, rec
    assert (rec["grad_accum_steps"], rec["batch_size"]) == (2, 16), rec
    assert sum(rec["counts"].values()) == 32, rec  # two micro-batches of 16
    if step < extra_step:
        assert rec["mix"] in ("code:0.7,math:0.3,web:0", "code:0.7,extra:0,math:0.3,web:0"), rec
        assert set(rec["counts"]) <= {"code", "math"}, rec
    else:
        assert rec["counts"] == {"extra": 32} and rec["mix"].startswith("code:0,extra:1"), rec


async def test_every_knob_takes_effect_at_the_decided_step_and_replay_is_bit_identical(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[Any],
) -> None:
    job = "knobjob"
    out = tmp_path / "live"
    extra = tmp_path / "extra.pt"
    gen = torch.Generator().manual_seed(5)
    torch.save(torch.randn(100, 9, generator=gen), extra)
    # `data add` reads only under the job's data roots: here the test's directory.
    env = job_env(subprocess_env, tmp_path, job, server=nats_server, TORCHLOOM_DATA_ROOTS=str(tmp_path))
    async with (
        open_weaver(WeaverConfig(nats_url=nats_server.url, nats_credentials=auth(nats_server))) as w,
        ControlClient(w.grpc_address) as client,
    ):
        proc = torchrun(out, env)
        procs.append(proc)
        await wait_training(client, job, proc, out)
        await wait_knobs(client, job)

        first = (await submit(client, job, SetConfig(values=FIRST))).results[0]
        ck = (await submit(client, job, Action(kind=ActionKind.CHECKPOINT, args={"tag": "t1"}))).results[0]
        add = (
            await submit(
                client, job, Action(kind=ActionKind.DATA_ADD, args={"name": "extra", "path": str(extra)})
            )
        ).results[0]
        mix = (await submit(client, job, SetConfig(values={"mix": "extra:1"}))).results[0]
        # Let the new mixture train a few steps before going back to before the data add.
        deadline = time.monotonic() + 60
        while min(len(read_records(out / f"rank{r}.jsonl")) for r in (0, 1)) < mix.step + 5:
            assert time.monotonic() < deadline, "job stopped advancing after mix=extra:1"
            await asyncio.sleep(0.05)
        rb = (await submit(client, job, Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "t1"}))).results[
            0
        ]
        stop = (await submit(client, job, Action(kind=ActionKind.STOP))).results[0]
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]

    assert add.detail == {"source": "extra"}
    assert first.step <= ck.step <= add.step <= mix.step < rb.step
    branch = rb.detail["branch"]
    for r in (0, 1):
        records = read_records(out / f"rank{r}.jsonl")
        main = {rec["step"]: rec for rec in records if rec["branch"] == "main"}
        assert sorted(main) == list(range(rb.step)), r
        for rec in main.values():
            check_knob_values(rec, first.step, mix.step)
        # After the rollback the sampler is back at the checkpoint: the same batches (extra stays
        # known at weight 0), the same knob values, the same parameters as main, step by step.
        new = [rec for rec in records if rec["branch"] == branch]
        assert [rec["step"] for rec in new] == list(range(ck.step, stop.step)), r
        for rec in new:
            if rec["step"] < mix.step:
                old = main[rec["step"]]
                same = ("counts", "grad_accum_steps", "batch_size", "betas", "eps", "params", "loss")
                assert {k: rec[k] for k in same} == {k: old[k] for k in same}, (r, rec["step"])
            else:
                assert set(rec["counts"]) <= {"code", "math"}, (r, rec)

    # Replay rank 0's decided commands in a fresh run without a bus: bit-identical parameters.
    plan = replay_plan(out, job)
    kinds = ["set", "checkpoint", "data_add", "set", "rollback", "stop"]
    assert [c["kind"] for c in plan["commands"]] == kinds
    (tmp_path / "replay.json").write_text(json.dumps(plan))
    replay_out = tmp_path / "replay"
    renv = job_env(
        subprocess_env,
        tmp_path,
        job,
        TORCHLOOM_REPLAY=str(tmp_path / "replay.json"),
        TORCHLOOM_DATA_ROOTS=str(tmp_path),
    )
    renv.pop("TORCHLOOM_NATS_URL", None)
    proc = torchrun(replay_out, renv)
    procs.append(proc)
    stdout, _ = await asyncio.to_thread(proc.communicate, timeout=180)
    assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
    for r in (0, 1):
        live, again = (torch.load(d / f"rank{r}.params.pt", weights_only=True) for d in (out, replay_out))
        assert live.keys() == again.keys()
        assert all(torch.equal(live[k], again[k]) for k in live), r
        live_recs, replay_recs = (read_records(d / f"rank{r}.jsonl") for d in (out, replay_out))
        keys = ("step", "branch", "loss", "counts", "mix", "params")
        assert [{k: x[k] for k in keys} for x in replay_recs] == [{k: x[k] for k in keys} for x in live_recs]
