"""Test job: a tiny DDP regression whose batches come from a torchdata `StatefulDataLoader` (with a
`StatefulDistributedSampler`) attached with `threadlet.attach(loader=...)`, so checkpoints,
rollbacks and resumes carry the loader's position. Each rank appends one record per step to
OUT/rank<R>.jsonl: step, branch, lr, rank, epoch, the dataset ids of its batch, world size and run id.

The loop follows the threadlet: it takes a new loader iterator when the branch changes (a rollback
loaded the loader's state, which applies at the next `iter()`), and starts the next epoch with
`sampler.set_epoch` when one ends.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import threadlet

ROWS = 96


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 8, generator=gen)
    y = (x @ torch.linspace(-1, 1, 8)).unsqueeze(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    ids = list(range(ROWS))
    sampler = StatefulDistributedSampler(ids, num_replicas=world, rank=rank, shuffle=True, seed=3)
    loader = StatefulDataLoader(ids, batch_size=args.batch_size, sampler=sampler)
    tl = threadlet.attach(model=model, optimizer=opt, loader=loader)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"rank{rank}.jsonl", "a", encoding="utf-8") as records:
        batches = iter(loader)
        branch = tl.branch
        for step in tl.range(args.steps):
            if tl.branch != branch:  # a rollback restored the loader: it applies at the next iter()
                batches, branch = iter(loader), tl.branch
            batch = next(batches, None)
            if batch is None:
                sampler.set_epoch(sampler.epoch + 1)
                batches = iter(loader)
                batch = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            rec = {
                "step": step,
                "rank": rank,
                "branch": tl.branch,
                "lr": opt.param_groups[0]["lr"],
                "epoch": sampler.epoch,
                "ids": batch.tolist(),
                "world": world,
                "run": tl.config.run_id,
            }
            records.write(json.dumps(rec) + "\n")
            records.flush()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            tl.step(loss=loss.item())
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
