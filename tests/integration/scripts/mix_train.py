"""A tiny 2-rank job that draws its batches from a MixtureSampler steered live (`mix`, `batch_size`).

    python -m torch.distributed.run --nproc-per-node 2 mix_train.py --steps 300 --out DIR

Each rank writes DIR/rank{R}.jsonl (per step: the samples drawn from each source) and
DIR/rank{R}.applied.json (the commands it decided).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import threadlet
from threadlet.data import MixtureSampler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.01)
    args = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    data = {"a": torch.randn(100, 4), "b": torch.randn(50, 4) + 10}
    sampler = MixtureSampler(data, {"a": 1.0, "b": 0.0}, batch_size=64, seed=0, rank=rank, world_size=world)
    tl = threadlet.attach()
    sampler.register_knobs(tl)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"rank{rank}.jsonl", "w", encoding="utf-8") as records:
        for step in range(args.steps):
            batch = sampler.next_batch()
            x = torch.stack([data[name][i] for name, i in batch])
            counts = Counter(name for name, _ in batch)
            records.write(json.dumps({"step": step, "counts": counts, "mean": float(x.mean())}) + "\n")
            records.flush()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            tl.step(tokens=len(batch))
    tl.close()
    (args.out / f"rank{rank}.applied.json").write_text(
        json.dumps([d.to_json() for d in tl.applied], indent=1)
    )
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
