"""In-process rollback against a torchrun restart from the same checkpoint, and the cost of a checkpoint.

Starts an embedded nats-server and an in-process weaver, trains bench/scripts/sized_train.py on 2 ranks,
then:

* checkpoint cost: the step that carried out a `checkpoint` action, minus the median step, in seconds
  and in steps (for --params, 50M by default);
* rollback: from `Control.Submit(rollback)` to the first training step on the restored state (the first
  record of the new branch);
* restart: the job is stopped, then relaunched by torchrun with TORCHLOOM_RESUME_FROM=<same checkpoint>;
  from the relaunch to its first training step (imports, rendezvous, process groups, load).

    python bench/rollback_checkpoint.py --params 50000000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from torchloom import messages as m
from torchloom.client import ControlClient
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "scripts" / "sized_train.py"


def records(out: Path, rank: int = 0) -> list[dict[str, object]]:
    path = out / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def until(pred, what: str, deadline_s: float = 300.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise TimeoutError(what)


async def launch(env: dict[str, str], args: argparse.Namespace, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(SCRIPT), "--params", str(args.params), "--width", str(args.width), "--out", str(out),
        env=env, start_new_session=True,
    )  # fmt: skip


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def submit(client: ControlClient, job: str, body: m.Body) -> m.Outcome:
    out = await client.submit(m.SubmitRequest(job=job, body=body, timeout_s=600))
    if out.status is not m.OutcomeStatus.APPLIED:
        raise RuntimeError(f"{body}: {out.status} {out.reason}")
    return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-rb-"))
    job, run_id = "rbbench", uuid.uuid4().hex[:10]
    out = tmp / "out"
    with EmbeddedNats(tmp / "nats") as server:
        base_env = dict(
            os.environ, TORCHLOOM_NATS_URL=server.url, TORCHLOOM_JOB=job, TORCHLOOM_HOME=str(tmp / "home"),
            TORCHLOOM_CHECKPOINT_DIR=str(tmp / "ckpt"),
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        )  # fmt: skip
        async with open_weaver(WeaverConfig(nats_url=server.url, command_timeout_s=600)) as weaver:
            signed = {"TORCHLOOM_WEAVER_PUBKEY": weaver.weaver.public_key}  # ranks verify commands
            proc = await launch(dict(base_env, TORCHLOOM_RUN_ID=run_id, **signed), args, out)
            try:
                async with ControlClient(weaver.grpc_address, command_timeout_s=600) as client:
                    await until(lambda: len(records(out)) >= args.warmup, "warm-up steps", 600)
                    ck = await submit(
                        client, job, m.Action(kind=m.ActionKind.CHECKPOINT, args={"tag": "bench"})
                    )
                    ck_step = min(r.step for r in ck.results)
                    ck_path = ck.results[0].detail.get("checkpoint_path", "")
                    n_before = len(records(out))
                    await until(lambda: len(records(out)) >= n_before + args.warmup, "steps after ckpt", 600)
                    recs = records(out)
                    by_step = {int(r["step"]): r for r in recs}  # type: ignore[call-overload]
                    durations = [
                        float(b["t_boundary"]) - float(a["t_boundary"])  # type: ignore[arg-type]
                        for a, b in itertools.pairwise(recs)
                    ]
                    median_step = statistics.median(durations)
                    # A command decided at step s ran in the tl.step() that closed iteration s - 1 (the
                    # ack names the step count after that boundary), so the interval ending at that
                    # boundary holds the checkpoint beside one training step.
                    end = by_step[ck_step - 1]["t_boundary"]
                    begin = by_step[ck_step - 2]["t_boundary"]
                    ck_interval = float(end) - float(begin)  # type: ignore[arg-type]
                    ck_cost = ck_interval - median_step
                    rollbacks = []
                    for i in range(args.repeats):
                        n0 = len(records(out))
                        t0 = time.time()
                        rb = await submit(
                            client, job, m.Action(kind=m.ActionKind.ROLLBACK, args={"checkpoint": "bench"})
                        )
                        branch = rb.results[0].detail.get("branch", "")
                        first = await until(
                            lambda branch=branch, n0=n0: next(
                                (r for r in records(out)[n0:] if r["branch"] == branch), None
                            ),
                            "first step on the new branch",
                        )
                        rollbacks.append(float(first["t1"]) - t0)  # the end of the first restored step
                        await asyncio.sleep(0.5)
                        del i
            finally:
                await stop(proc)
            restarts = []
            for i in range(args.repeats):
                out2 = tmp / f"restart{i}"
                t0 = time.time()
                proc = await launch(
                    dict(base_env, TORCHLOOM_RUN_ID=f"{run_id}r{i}", TORCHLOOM_RESUME_FROM=ck_path),
                    args,
                    out2,
                )
                try:
                    first = await until(
                        lambda out2=out2: (records(out2) or [None])[0], "first restarted step", 600
                    )
                    restarts.append(float(first["t1"]) - t0)
                finally:
                    await stop(proc)
    rb_med, rs_med = statistics.median(rollbacks), statistics.median(restarts)
    return {
        "params": int(records(out)[0]["params"]),  # type: ignore[call-overload]
        "world_size": 2,
        "median_step_s": median_step,
        "checkpoint_step": ck_step,
        "checkpoint_cost_s": ck_cost,
        "checkpoint_cost_steps": ck_cost / median_step,
        "rollback_s": rollbacks,
        "restart_s": restarts,
        "rollback_median_s": rb_med,
        "restart_median_s": rs_med,
        "speedup": rs_med / rb_med,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=50_000_000)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench/results/rollback_checkpoint.json"))
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(
        f"model: {result['params']:,} parameters, 2 ranks, median step {result['median_step_s'] * 1e3:.1f} ms"
    )
    print(f"checkpoint: {result['checkpoint_cost_s']:.2f} s = {result['checkpoint_cost_steps']:.1f} steps")
    print(f"{'recovery':<28}{'median s':>10}  runs")
    print(f"{'in-process rollback':<28}{result['rollback_median_s']:>10.2f}  {result['rollback_s']}")
    print(f"{'torchrun restart + resume':<28}{result['restart_median_s']:>10.2f}  {result['restart_s']}")
    print(f"speed-up of rollback: {result['speedup']:.1f}x")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
