"""Per-step overhead of the threadlet with nothing pending, measured inside a real 2-rank torchrun job.

Each rank runs the same tiny DDP training loop in alternating blocks: K steps calling `tl.step()`
and K steps without it, interleaved so that drift in machine load hits both arms alike. Rank 0 prints
a table and writes JSON. Run it through the launcher so a real nats-server and weaver are on the bus:

    torchloom run --job bench --nproc-per-node 2 bench/threadlet_overhead.py --blocks 40 --block-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    parser.add_argument("--out", default="bench/results/threadlet_overhead.json")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 64)
    y = torch.randn(args.batch, 1)
    overrides = {} if args.idle_round_period is None else {"idle_round_period_s": args.idle_round_period}
    tl = threadlet.attach(model=ddp, optimizer=opt, config=threadlet.from_env(**overrides))

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(50):  # warm-up both paths
        tl.step(loss=train_step())
    with_tl: list[float] = []
    without: list[float] = []
    in_call: list[float] = []
    pair_ratios: list[float] = []
    for block in range(2 * args.blocks):
        use_tl = block % 2 == 0
        block_times: list[float] = []
        for _ in range(args.block_steps):
            t0 = time.perf_counter()
            loss = train_step()
            if use_tl and not os.environ.get("BENCH_AA"):
                t1 = time.perf_counter()
                tl.step(loss=loss)
                in_call.append(time.perf_counter() - t1)
            block_times.append(time.perf_counter() - t0)
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
        print(f"agreement rounds: {tl.rounds} over {len(with_tl) + 50} tl.step() calls")
        print(
            f"tl.step() itself: median {result['step_call_us_median']:.1f} us, "
            f"mean {result['step_call_us_mean']:.1f} us, p99 {result['step_call_us_p99']:.1f} us"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
