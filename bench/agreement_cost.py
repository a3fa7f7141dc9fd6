"""What one agreement round costs on this machine, per world size: the gloo fallback's round (a MIN
all-reduce of the 5 int64 of an offer on its own group) and the piggyback's addition to DDP's first
bucket (a 1 MiB float32 all-reduce, divided by the world size as DDP's default hook does, with and
without the 32 appended counts, through the real `PiggybackTransport.ride`). The numbers behind
docs/design.md, "Agreement at scale".

    python bench/agreement_cost.py --worlds 2,4,8
"""

from __future__ import annotations

import argparse
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

from threadlet.agreement import NONE_REFUSED, Offer, encode
from threadlet.ddp_hook import PiggybackTransport

REPO = Path(__file__).resolve().parent.parent
BUCKET = 1 << 18  # float32 elements: DDP's first bucket is capped at 1 MiB


def timed(fn: object, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def measure(iters: int, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    offer = torch.tensor(encode(Offer(5, NONE_REFUSED, False, 100, 1)), dtype=torch.int64)
    grads = torch.randn(BUCKET)
    buffer = grads.clone()
    transport = PiggybackTransport(world)
    transport.start(0, lambda: (3, NONE_REFUSED))

    def gloo_round() -> None:
        dist.all_reduce(offer.clone(), op=dist.ReduceOp.MIN, group=group)

    def plain_bucket() -> None:
        buffer.copy_(grads)
        buffer.div_(world)
        dist.all_reduce(buffer)

    def ride_bucket() -> None:
        buffer.copy_(grads)
        transport.ride(buffer, dist.group.WORLD).wait()

    fns = {"gloo_round": gloo_round, "plain_bucket": plain_bucket, "ride_bucket": ride_bucket}
    for fn in fns.values():  # warm-up
        timed(fn, 10)
    # Interleaved, so the machine's load of the moment hits every variant alike.
    rows: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            rows[name] += timed(fn, 1)
    if rank == 0:
        result = {
            name: {
                "median_us": statistics.median(v) * 1e6,
                "p90_us": sorted(v)[int(0.9 * (len(v) - 1))] * 1e6,
            }
            for name, v in rows.items()
        }
        result["world_size"] = world  # type: ignore[assignment]
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--out", default=str(REPO / "bench/results/agreement_cost.json"))
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure is not None:
        measure(args.iters, args.measure)
        return
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="tl-agree-"))
    for world in (int(w) for w in args.worlds.split(",")):
        part = tmp / f"{world}.json"
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--standalone",
             __file__, "--iters", str(args.iters), "--measure", str(part)],
            env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True,
        )  # fmt: skip
        results.append(json.loads(part.read_text()))
    print(f"{'world':>6}{'gloo round us':>16}{'bucket us':>14}{'bucket+offer us':>18}{'added us':>10}")
    for r in results:
        g, b, rb = (r[k]["median_us"] for k in ("gloo_round", "plain_bucket", "ride_bucket"))
        print(f"{r['world_size']:>6}{g:>16.1f}{b:>14.1f}{rb:>18.1f}{rb - b:>10.1f}")
    Path(args.out).write_text(
        json.dumps({"cpus": os.cpu_count(), "bucket_floats": BUCKET, "worlds": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
