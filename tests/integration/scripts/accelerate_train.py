"""Test job for `threadlet.attach` with what `accelerate.Accelerator.prepare` returns: a DDP-wrapped
tiny MLP, an AcceleratedOptimizer (AdamW) and an AcceleratedScheduler (a warmup-then-decay LambdaLR),
passed to attach as they are. The loop iterates `tl.range` and steps through `accelerator.backward`.

    torchrun --nproc-per-node 2 tests/integration/scripts/accelerate_train.py --out DIR --steps 40

Each rank appends one record per step to DIR/rank<R>.jsonl: step, branch, the lr the step used, the
loss, and float64 sums of the parameters before and after the step; plus DIR/rank<R>.types.json with the
types it passed to attach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import threadlet


def _param_sum(net: nn.Module) -> float:
    return sum(float(p.detach().double().sum()) for p in net.parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.99**s)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=gen)
    data = TensorDataset(x, (x @ torch.linspace(-1, 1, 8)).unsqueeze(1))
    loader = DataLoader(data, batch_size=16, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    types = {
        "model": type(model).__name__,
        "optimizer": type(opt).__name__,
        "scheduler": type(sched).__name__,
    }
    (args.out / f"rank{rank}.types.json").write_text(json.dumps(types))

    tl = threadlet.attach(model=model, optimizer=opt, scheduler=sched)
    (args.out / f"rank{rank}.agreement_path").write_text(tl.agreement_path)
    batches = iter(loader)
    with open(args.out / f"rank{rank}.jsonl", "a", encoding="utf-8") as records:
        for step in tl.range(args.steps):
            xb, yb = next(batches)
            before = _param_sum(net)
            lr = opt.param_groups[0]["lr"]
            loss = nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            rec = {"step": step, "branch": tl.branch, "lr": lr, "loss": loss.item()}
            rec |= {"params_before": before, "params": _param_sum(net)}
            records.write(json.dumps(rec) + "\n")
            tl.step(loss=loss.item())
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
