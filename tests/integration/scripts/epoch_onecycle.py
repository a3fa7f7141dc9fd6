"""The second loop shape: an epoch loop over a DataLoader with a DistributedSampler, OneCycleLR passed
as `scheduler=`, a tiny DDP model on gloo and synthetic data. It neither iterates `tl.range` nor reads
`tl.should_stop`: a `stop` ends it from inside `tl.step()`.

    torchloom run --nproc-per-node 2 epoch_onecycle.py --epochs 100 --out DIR

Each rank appends to DIR/rank{R}.jsonl, per optimizer step: the threadlet's step and branch at the
step (before `tl.step()`), the lr that optimizer step used and the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import threadlet

SAMPLES = 256
BATCH = 8
MAX_LR = 0.1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.02)
    args = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    x = torch.randn(SAMPLES, 8)
    data = TensorDataset(x, x @ torch.randn(8, 1) + 0.1 * torch.randn(SAMPLES, 1))
    sampler = DistributedSampler(data, shuffle=True, seed=0) if dist.is_initialized() else None
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, shuffle=sampler is None)
    model: torch.nn.Module = torch.nn.Linear(8, 1)
    if dist.is_initialized():
        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=MAX_LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=MAX_LR, epochs=args.epochs, steps_per_epoch=len(loader)
    )
    tl = threadlet.attach(model=model, optimizer=opt, scheduler=sched)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"rank{rank}.jsonl", "w", encoding="utf-8") as records:
        for epoch in range(args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            for xb, yb in loader:
                lr = opt.param_groups[0]["lr"]  # what this optimizer step uses
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                rec = {
                    "step": tl.step_count,
                    "branch": tl.branch,
                    "epoch": epoch,
                    "lr": lr,
                    "loss": loss.item(),
                }
                records.write(json.dumps(rec) + "\n")
                records.flush()
                if args.step_sleep:
                    time.sleep(args.step_sleep)
                tl.step(loss=loss.item())
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
