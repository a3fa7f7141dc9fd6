"""Command latency from `Control.Submit` to every rank's acknowledgement, on a real 2-rank torchrun job,
on both agreement paths side by side: riding DDP's gradient all-reduce ("piggyback") and the gloo
rounds ("gloo", TORCHLOOM_AGREEMENT=gloo).

For each path, starts an embedded nats-server and an in-process weaver, launches examples/train_tiny.py
(or, with `--model mlp`, a bare DDP MLP at about 2 ms steps) under torchrun, then submits N lr
changes one after another over gRPC (with `--gap-s`, a pause before each: back to back, deciding
commands is most of what the ranks do, and on 2 shared cores the control plane's work for each one
slows their steps). Each Outcome carries the timestamps that split its path into
parts (p50 / p99 of each, in ms):

* client_to_weaver: the client's call -> the weaver's submit (gRPC in);
* validate_sign: submit -> publish (validate, sequence, sign);
* publish_to_first_rank: publish -> first rank has it (JetStream store, the rank's pull, verify);
* receipt_spread: first rank has it -> last rank has it;
* apply_wait: last rank has it -> last rank decided (the offer riding the next all-reduce, the
  boundary after it);
* ack_to_outcome: last rank decided -> outcome complete (ack through JetStream, the weaver's
  consumer);
* weaver_to_client: outcome complete -> the client has it (gRPC out);
* bus = validate_sign + publish_to_first_rank + ack_to_outcome;
* to_every_ack: the client's call -> the weaver has every rank's ack (total less weaver_to_client):
  the issue-12 measure "submit to every rank's ack".

The ranks' median step time (from their heartbeats) is reported with each path, so the apply wait
reads in steps, and the load average before and after each path.

    python bench/command_latency.py --commands 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
PARTS = (
    "client_to_weaver",
    "validate_sign",
    "publish_to_first_rank",
    "receipt_spread",
    "apply_wait",
    "ack_to_outcome",
    "weaver_to_client",
)
PATHS = {"piggyback": "auto", "gloo": "gloo"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _script(args: argparse.Namespace) -> list[str]:
    """The training script and its arguments: train_tiny (a mixture sampler and a JSON record with two
    parameter checksums every step: 6 to 8 ms steps on an idle 2-core machine), or a bare DDP MLP of
    about 20,000 parameters (bench/scripts/sized_train.py: about 2 ms steps, the goal's pace)."""
    if args.model in ("mlp", "small"):
        if args.step_sleep:
            raise SystemExit("--step-sleep applies to --model tiny only (--device-ms to the others)")
        size = ["--params", "20000", "--width", "64", "--batch", "32"]
        if args.model == "small":  # 2,000 parameters: the step is mostly DDP's all-reduce
            size = ["--params", "2000", "--width", "32", "--batch", "8"]
        steps = ["--steps", "1000000", "--device-ms", str(args.device_ms)]
        return [str(REPO / "bench/scripts/sized_train.py"), *size, *steps]
    if args.device_ms:
        raise SystemExit("--device-ms applies to --model mlp or small")
    tiny = ["--steps", "1000000", "--step-sleep", str(args.step_sleep)]
    return [str(REPO / "examples/train_tiny.py"), *tiny]


async def run(args: argparse.Namespace, agreement: str) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    load_before = os.getloadavg()[0]
    job, run_id = "bench", uuid.uuid4().hex[:12]
    with EmbeddedNats(tmp / "nats") as server:
        async with open_weaver(WeaverConfig(nats_url=server.url)) as weaver:
            env = dict(os.environ, TORCHLOOM_NATS_URL=server.url, TORCHLOOM_JOB=job, TORCHLOOM_RUN_ID=run_id)
            env.setdefault("OMP_NUM_THREADS", "1")
            env["TORCHLOOM_AGREEMENT"] = agreement
            env.setdefault("TORCHLOOM_WEAVER_PUBKEY", weaver.weaver.public_key)  # ranks verify commands
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--standalone",
                *_script(args),
                "--out",
                str(tmp / "out"),
                env=env,
            )
            try:
                async with ControlClient(weaver.grpc_address) as client:
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        status = await client.status()
                        jobs = [j for j in status.jobs if j.job == job]
                        if jobs and len([r for r in jobs[0].ranks if r.alive]) == 2:
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise RuntimeError("job did not start")
                    # The run's first command also makes its command stream and each rank's consumer
                    # (ranks look for theirs with a backoff of up to 0.5 s): timed apart, not counted.
                    t0 = time.time()
                    first = await client.submit(
                        m.SubmitRequest(job=job, body=m.SetConfig(values={"lr": 1e-3}), timeout_s=30)
                    )
                    first_ms = (time.time() - t0) * 1e3
                    if first.status is not m.OutcomeStatus.APPLIED:
                        raise RuntimeError(f"first command: {first.status} {first.reason}")
                    total, bus, to_acks = [], [], []
                    parts: dict[str, list[float]] = {name: [] for name in PARTS}
                    for i in range(args.commands):
                        if args.gap_s:
                            await asyncio.sleep(args.gap_s)  # the ranks back at their idle pace
                        lr = 1e-3 if i % 2 else 2e-3
                        t0 = time.time()
                        out = await client.submit(
                            m.SubmitRequest(job=job, body=m.SetConfig(values={"lr": lr}), timeout_s=10)
                        )
                        t1 = time.time()
                        if out.status is not m.OutcomeStatus.APPLIED:
                            raise RuntimeError(f"command {i}: {out.status} {out.reason}")
                        first_recv = min(r.received_at_s for r in out.results)
                        last_recv = max(r.received_at_s for r in out.results)
                        last_dec = max(r.decided_at_s for r in out.results)
                        total.append(t1 - t0)
                        to_acks.append(out.completed_at_s - t0)
                        split = {
                            "client_to_weaver": out.submitted_at_s - t0,
                            "validate_sign": out.published_at_s - out.submitted_at_s,
                            "publish_to_first_rank": first_recv - out.published_at_s,
                            "receipt_spread": last_recv - first_recv,
                            "apply_wait": last_dec - last_recv,
                            "ack_to_outcome": out.completed_at_s - last_dec,
                            "weaver_to_client": t1 - out.completed_at_s,
                        }
                        for name, value in split.items():
                            parts[name].append(value)
                        bus.append(
                            split["validate_sign"] + split["publish_to_first_rank"] + split["ack_to_outcome"]
                        )
                    status = await client.status()
                    step_times = [r.step_time_s for j in status.jobs if j.job == job for r in j.ranks]
            finally:
                proc.terminate()
                async with asyncio.timeout(30):
                    await proc.wait()

    def row(values: list[float]) -> dict[str, float]:
        return {
            "p50": pct(values, 50) * 1e3,
            "p99": pct(values, 99) * 1e3,
            "mean": statistics.fmean(values) * 1e3,
        }

    step_s = statistics.median(step_times) if step_times else 0.0
    return {
        "agreement": agreement,
        "commands": args.commands,
        "model": args.model,
        "device_ms": args.device_ms,
        "step_sleep_s": args.step_sleep,
        "gap_s": args.gap_s,
        "median_step_ms": step_s * 1e3,
        "first_command_ms": first_ms,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "total_ms": row(total),
        "to_every_ack_ms": row(to_acks),
        "bus_ms": row(bus),
        **{f"{name}_ms": row(values) for name, values in parts.items()},
        # Every command's parts in order (ms), so an outlier can be read whole: which part, which command.
        "samples": {
            name: [round(v * 1e3, 3) for v in values] for name, values in {"total": total, **parts}.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument(
        "--gap-s",
        type=float,
        default=0.0,
        help="pause before each command (0: back to back, so deciding commands sets the step time)",
    )
    parser.add_argument(
        "--model",
        choices=("tiny", "mlp", "small"),
        default="tiny",
        help="examples/train_tiny.py (default), a bare DDP MLP of 20,000 parameters (about 2 ms steps "
        "on an idle machine) or of 2,000 (the step is DDP's all-reduce)",
    )
    parser.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="mlp and small: a host wait per step, as a training thread waits on a GPU (CPU free)",
    )
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: piggyback,gloo")
    parser.add_argument("--out", default=str(REPO / "bench/results/command_latency.json"))
    args = parser.parse_args()
    paths = {name: PATHS[name] for name in args.paths.split(",")}
    results = {name: asyncio.run(run(args, agreement)) for name, agreement in paths.items()}
    head = "".join(f"{name + ' ' + col:>18}" for name in paths for col in ("p50", "p99"))
    print(f"{'part (ms)':<28}{head}")
    first = results[next(iter(paths))]
    scalars = ("median_step_ms", "first_command_ms", "load_before", "load_after", "device_ms")
    for key in [k for k in first if k.endswith("_ms") and k not in scalars]:
        cells = ""
        for name in paths:
            row = results[name][key]
            assert isinstance(row, dict)
            cells += f"{row['p50']:>18.3f}{row['p99']:>18.3f}"
        print(f"{key:<28}{cells}")
    for key in scalars:
        print(f"{key:<28}" + "".join(f"{float(results[n][key]):>36.2f}" for n in paths))  # type: ignore[arg-type]
    Path(args.out).write_text(json.dumps({"paths": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
