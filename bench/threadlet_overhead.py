"""Per-step overhead of the threadlet with nothing pending, measured inside a real 2-rank torchrun job,
on both agreement paths side by side.

Each rank trains two identical DDP models in alternating blocks: K steps of a plain DDP model without
the threadlet, and K steps of its twin, attached to the threadlet (its DDP carrying the agreement's
comm hook on the piggyback path) and calling `tl.step()`; interleaved so that drift in machine load
hits both arms alike. Run without torchrun, it launches itself through `torchloom run` (a real
nats-server and weaver on the bus) once per path, then prints both side by side and writes one JSON:

    python bench/threadlet_overhead.py --blocks 40 --block-steps 50 --repeats 3

Each path runs `--repeats` times, the paths alternating, and the run with the median overhead is
reported (all runs' overheads are printed and kept in the JSON).

`--micro` times `tl.step()` alone instead, in this process: one rank with an AdamW optimizer (five
knobs) and a bus nobody serves (so the link thread runs and the reports are due on their clocks, as
in a job), `--micro-steps` steps each after `--micro-step-ms` of busy work (cold caches, as after a
training step); it prints the median, mean and p99 with the load average:

    python bench/threadlet_overhead.py --micro --micro-steps 20000 --micro-step-ms 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import threadlet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=40, help="pairs of (with, without) blocks")
    parser.add_argument("--block-steps", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--idle-round-period", type=float, default=None, help="idle_round_period_s")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per path, alternating paths (the median run is reported)"
    )
    parser.add_argument("--out", default="bench/results/threadlet_overhead.json")
    parser.add_argument("--micro", action="store_true", help="time tl.step() alone (see the docstring)")
    parser.add_argument("--micro-steps", type=int, default=20_000)
    parser.add_argument("--micro-step-ms", type=float, default=2.0)
    args = parser.parse_args()
    if args.micro:
        micro(args.micro_steps, args.micro_step_ms / 1e3)
        return
    if "RANK" not in os.environ:
        drive(args)
        return

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    twin = copy.deepcopy(model)
    plain = nn.parallel.DistributedDataParallel(model)  # the arm without the threadlet
    ddp = nn.parallel.DistributedDataParallel(twin)
    opts = {id(plain): torch.optim.AdamW(plain.parameters(), lr=1e-3)}
    opt = opts[id(ddp)] = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 64)
    y = torch.randn(args.batch, 1)
    overrides = {} if args.idle_round_period is None else {"idle_round_period_s": args.idle_round_period}
    tl = threadlet.attach(model=ddp, optimizer=opt, config=threadlet.from_env(**overrides))

    def train_step(net: nn.Module) -> float:
        o = opts[id(net)]
        o.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        o.step()
        return float(loss.detach())

    for _ in range(50):  # warm-up both arms
        tl.step(loss=train_step(ddp))
        train_step(plain)
    with_tl: list[float] = []
    without: list[float] = []
    cpu = {True: 0.0, False: 0.0}  # this process's CPU seconds (all threads) per arm: load-proof
    in_call: list[float] = []
    pair_ratios: list[float] = []
    for block in range(2 * args.blocks):
        use_tl = block % 2 == 0
        block_times: list[float] = []
        cpu0 = time.process_time()
        for _ in range(args.block_steps):
            t0 = time.perf_counter()
            loss = train_step(ddp if use_tl else plain)
            if use_tl and not os.environ.get("BENCH_AA"):
                t1 = time.perf_counter()
                tl.step(loss=loss)
                in_call.append(time.perf_counter() - t1)
            block_times.append(time.perf_counter() - t0)
        cpu[use_tl] += time.process_time() - cpu0
        (with_tl if use_tl else without).extend(block_times)
        if use_tl:
            with_block = statistics.median(block_times)
        else:  # each pair of adjacent blocks shares the machine's mood of the moment
            pair_ratios.append(with_block / statistics.median(block_times))

    in_call = in_call or [0.0]
    if rank == 0:
        med_with = statistics.median(with_tl)
        med_without = statistics.median(without)
        mean_with = statistics.fmean(with_tl)
        mean_without = statistics.fmean(without)
        result = {
            "agreement_path": tl.agreement_path,
            "world_size": dist.get_world_size(),
            "hidden": args.hidden,
            "batch": args.batch,
            "idle_round_period_s": tl.config.idle_round_period_s,
            "steps_per_arm": len(with_tl),
            "bus": bool(os.environ.get("TORCHLOOM_NATS_URL")),
            "median_step_s_without": med_without,
            "median_step_s_with": med_with,
            "median_ratio": med_with / med_without,
            "mean_ratio": mean_with / mean_without,
            "overhead_pct_median": (med_with / med_without - 1) * 100,
            "pair_ratio_median": statistics.median(pair_ratios),
            "pair_ratio_q1_q3": statistics.quantiles(pair_ratios, n=4)[::2],
            "overhead_pct_pairs": (statistics.median(pair_ratios) - 1) * 100,
            "cpu_ms_per_step_without": cpu[False] / len(without) * 1e3,
            "cpu_ms_per_step_with": cpu[True] / len(with_tl) * 1e3,
            "cpu_overhead_pct": (cpu[True] / cpu[False] - 1) * 100,
            "agreement_rounds": tl.rounds,
            "step_call_us_median": statistics.median(in_call) * 1e6,
            "step_call_us_mean": statistics.fmean(in_call) * 1e6,
            "step_call_us_p99": sorted(in_call)[int(0.99 * (len(in_call) - 1))] * 1e6,
        }
        print(f"{'arm':<12}{'median ms':>12}{'mean ms':>12}")
        print(f"{'without':<12}{med_without * 1e3:>12.3f}{mean_without * 1e3:>12.3f}")
        print(f"{'threadlet':<12}{med_with * 1e3:>12.3f}{mean_with * 1e3:>12.3f}")
        print(f"overhead (pooled medians): {result['overhead_pct_median']:+.2f}%")
        q1, q3 = result["pair_ratio_q1_q3"]
        print(
            f"overhead (median of {len(pair_ratios)} adjacent-block ratios): "
            f"{result['overhead_pct_pairs']:+.2f}%  (IQR of ratios {q1:.3f}..{q3:.3f})"
        )
        print(
            f"process CPU per step: {result['cpu_ms_per_step_without']:.3f} ms without, "
            f"{result['cpu_ms_per_step_with']:.3f} ms with ({result['cpu_overhead_pct']:+.2f}%)"
        )
        print(f"agreement rounds: {tl.rounds} over {len(with_tl) + 50} tl.step() calls")
        print(
            f"tl.step() itself: median {result['step_call_us_median']:.1f} us, "
            f"mean {result['step_call_us_mean']:.1f} us, p99 {result['step_call_us_p99']:.1f} us"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    threadlet.finish(tl)


def micro(steps: int, step_s: float) -> None:
    """`tl.step()` with nothing pending, alone: median, mean and p99 in us, with the load average."""
    model = nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A bus nobody serves: the link thread runs (and fails to connect), the reports are due as in a job.
    config = threadlet.ThreadletConfig(nats_url="nats://127.0.0.1:1", job="micro", run_id="micro-1")
    tl = threadlet.attach(model=model, optimizer=opt, config=config)
    for _ in range(200):
        tl.step(loss=0.5)
    load = os.getloadavg()[0]
    times: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(steps):
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:  # busy, as a training step would be
            pass
        t0 = clock()
        tl.step(loss=0.5)
        times.append(clock() - t0)
    tl.close()
    times.sort()
    us = [t / 1e3 for t in times]
    p99 = us[int(0.99 * (len(us) - 1))]
    print(
        f"tl.step() alone, {steps} steps {step_s * 1e3:g} ms apart: median {statistics.median(us):.1f} us, "
        f"mean {statistics.fmean(us):.1f} us, p99 {p99:.1f} us, max {us[-1]:.0f} us "
        f"(load {load:.1f} -> {os.getloadavg()[0]:.1f})"
    )


def drive(args: argparse.Namespace) -> None:
    """Run the measurement once per agreement path under `torchloom run`; print both side by side."""
    repo = Path(__file__).resolve().parent.parent
    runs: dict[str, list[dict[str, object]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tl-overhead-"))
    # The paths alternate (auto, gloo, gloo, auto, auto, gloo, ...): the first run of a session shares
    # the machine with the control plane's start and whatever ran before, so one run of each path in a
    # fixed order measured the order as much as the path (+13.7% then +0.9% for the same code).
    order = [p for i in range(args.repeats) for p in (("auto", "gloo") if i % 2 == 0 else ("gloo", "auto"))]
    for i, agreement in enumerate(order):
        out = tmp / f"{agreement}-{i}.json"
        cmd = [
            sys.executable, "-m", "torchloom.app.cli", "run", "--job", f"overhead-{agreement}-{i}",
            "--nproc-per-node", "2", str(Path(__file__).resolve()), "--blocks", str(args.blocks),
            "--block-steps", str(args.block_steps), "--hidden", str(args.hidden), "--batch", str(args.batch),
            "--out", str(out),
        ]  # fmt: skip
        if args.idle_round_period is not None:
            cmd += ["--idle-round-period", str(args.idle_round_period)]
        env = dict(os.environ, TORCHLOOM_AGREEMENT=agreement, OMP_NUM_THREADS="1")
        subprocess.run(cmd, env=env, check=True, cwd=repo)
        result = json.loads(out.read_text())
        result["load_avg_1m"] = os.getloadavg()[0]
        runs.setdefault(str(result["agreement_path"]), []).append(result)
    results: dict[str, dict[str, object]] = {}
    for path, path_runs in runs.items():  # each path's run with the median pooled overhead
        ordered = sorted(path_runs, key=lambda r: float(r["overhead_pct_median"]))  # type: ignore[arg-type]
        results[path] = dict(ordered[len(ordered) // 2])
        results[path]["overhead_pct_median_of_runs"] = [r["overhead_pct_median"] for r in path_runs]
        print(
            f"{path}: pooled-median overhead of each run, in order: "
            + ", ".join(f"{float(r['overhead_pct_median']):+.2f}%" for r in path_runs)
        )  # type: ignore[arg-type]
    keys = [
        ("median_step_s_without", 1e3, "step ms, no threadlet"),
        ("median_step_s_with", 1e3, "step ms, threadlet"),
        ("overhead_pct_median", 1, "overhead % (pooled medians)"),
        ("overhead_pct_pairs", 1, "overhead % (adjacent pairs)"),
        ("cpu_overhead_pct", 1, "process CPU per step, overhead %"),
        ("step_call_us_median", 1, "tl.step() median us"),
        ("step_call_us_mean", 1, "tl.step() mean us"),
        ("step_call_us_p99", 1, "tl.step() p99 us"),
        ("agreement_rounds", 1, "agreement rounds"),
    ]
    names = list(results)
    print(f"{'':<30}" + "".join(f"{n:>14}" for n in names))
    for key, scale, label in keys:
        print(f"{label:<30}" + "".join(f"{float(results[n][key]) * scale:>14.3f}" for n in names))  # type: ignore[arg-type]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"paths": results, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
