"""Actions end to end: a real weaver steers a real 2-rank torchrun job of examples/train_tiny.py
through set, checkpoint, eval, rollback and stop; a replay of the decided commands reproduces the
final parameters bit for bit; fault_inject turns the target rank's device unhealthy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import torch

from tests.integration import helpers
from tests.integration.helpers import read_records, replay_plan, submit, wait_training
from torchloom.client import ControlClient
from torchloom.messages import Action, ActionKind, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

STEPS = 3000  # an upper bound: the stop action ends the run


def torchrun(out: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return helpers.torchrun(out, env, steps=STEPS, step_sleep=0.01)


def job_env(
    base: dict[str, str], tmp_path: Path, job: str, *, server: EmbeddedNats | None = None, **extra: str
) -> dict[str, str]:
    return helpers.job_env(base, job, server=server, TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"), **extra)


async def test_checkpoint_eval_rollback_stop_then_replay_is_bit_identical(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    job = "actjob"
    out = tmp_path / "live"
    env = job_env(subprocess_env, tmp_path, job, server=nats_server)
    async with (
        open_weaver(WeaverConfig(nats_url=nats_server.url, nats_credentials=helpers.auth(nats_server))) as w,
        ControlClient(w.grpc_address) as client,
    ):
        proc = torchrun(out, env)
        procs.append(proc)
        await wait_training(client, job, proc, out)

        await submit(client, job, SetConfig(values={"lr": "0.005"}))
        ck = (await submit(client, job, Action(kind=ActionKind.CHECKPOINT, args={"tag": "t1"}))).results[0]
        ev = (await submit(client, job, Action(kind=ActionKind.EVAL))).results[0]
        fi = await client.submit(
            SubmitRequest(job=job, body=Action(kind=ActionKind.FAULT_INJECT, args={"rank": "1", "xid": "79"}))
        )
        rb = (await submit(client, job, Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "t1"}))).results[
            0
        ]
        status = (await client.status(job)).jobs[0]
        stop = (await submit(client, job, Action(kind=ActionKind.STOP))).results[0]
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]

    ck_step = int(ck.detail["checkpoint_step"])
    assert ck.detail["checkpoint_id"] == "ckpt-2" and ck.detail["checkpoint_tag"] == "t1"
    assert ck.detail["branch"] == "main" and ck_step == ck.step
    assert Path(ck.detail["checkpoint_path"]) == tmp_path / "ckpt" / job / env["TORCHLOOM_RUN_ID"] / "ckpt-2"
    assert float(ev.detail["eval.loss"]) > 0
    assert fi.status is OutcomeStatus.REJECTED and "fault injection is disabled" in fi.reason
    assert rb.detail == {
        "branch": "b4",
        "parent_branch": "main",
        "from_checkpoint": "ckpt-2",
        "fork_step": str(ck_step),
        **{f"{part}_restored": "true" for part in ("model", "optimizer", "data_position", "rng")},
        "scheduler_restored": "false",
    }
    assert [b.id for b in status.branches][-1] == "b4" and status.branch == "b4"
    assert stop.detail["checkpoint_id"] == "ckpt-5" and stop.detail["branch"] == "b4" and stop.branch == "b4"
    assert stop.detail["handled_by_loop"] == "true"  # train_tiny iterates tl.range

    for r in (0, 1):
        records = read_records(out / f"rank{r}.jsonl")
        main = {rec["step"]: rec for rec in records if rec["branch"] == "main"}
        b4 = [rec for rec in records if rec["branch"] == "b4"]
        # The new branch starts at the checkpoint's step from the checkpoint's parameters...
        assert b4[0]["step"] == ck_step and b4[0]["params_before"] == main[ck_step - 1]["params"]
        # ...and retraces main exactly (same batches, same lr) until main's last step.
        for rec in b4:
            if rec["step"] in main:
                assert rec["params"] == main[rec["step"]]["params"], (r, rec["step"])
        assert [rec["step"] for rec in b4] == list(range(ck_step, stop.step))
        assert max(main) + 1 == rb.step

    # Replay the applied commands (rank 0's record is the journal's) in a fresh run without a bus.
    plan = replay_plan(out, job)
    assert [c["kind"] for c in plan["commands"]] == ["set", "checkpoint", "eval", "rollback", "stop"]
    (tmp_path / "replay.json").write_text(json.dumps(plan))
    replay_out = tmp_path / "replay"
    renv = job_env(subprocess_env, tmp_path, job, TORCHLOOM_REPLAY=str(tmp_path / "replay.json"))
    renv.pop("TORCHLOOM_NATS_URL", None)
    proc = torchrun(replay_out, renv)
    procs.append(proc)
    stdout, _ = await asyncio.to_thread(proc.communicate, timeout=180)
    assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
    for r in (0, 1):
        live, again = (torch.load(d / f"rank{r}.params.pt", weights_only=True) for d in (out, replay_out))
        assert live.keys() == again.keys()
        assert all(torch.equal(live[k], again[k]) for k in live), r
        replayed = json.loads((replay_out / f"rank{r}.applied.json").read_text())
        assert [(a["seq"], a["step"], a["branch"], a["status"]) for a in replayed] == [
            (c["seq"], c["step"], c["branch"], "applied") for c in plan["commands"]
        ]


async def test_fault_inject_turns_the_target_ranks_device_unhealthy(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    job = "faultjob"
    out = tmp_path / "out"
    env = job_env(subprocess_env, tmp_path, job, server=nats_server, TORCHLOOM_ALLOW_FAULT_INJECTION="1")
    async with (
        open_weaver(WeaverConfig(nats_url=nats_server.url, nats_credentials=helpers.auth(nats_server))) as w,
        ControlClient(w.grpc_address) as client,
    ):
        proc = torchrun(out, env)
        procs.append(proc)
        await wait_training(client, job, proc, out)
        await submit(client, job, Action(kind=ActionKind.FAULT_INJECT, args={"rank": "1", "xid": "79"}))
        deadline = time.monotonic() + 30
        while True:
            ranks = {r.rank: r for r in (await client.status(job)).jobs[0].ranks}
            dev1, dev0 = ranks[1].device, ranks[0].device
            if dev1 is not None and not dev1.healthy:
                break
            assert time.monotonic() < deadline, f"rank 1 device still healthy: {dev1}"
            await asyncio.sleep(0.05)
        assert "XID 79" in dev1.unhealthy_reason
        assert dev0 is not None and dev0.healthy
        await submit(client, job, Action(kind=ActionKind.STOP))
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]
