"""A loop whose LR scheduler drives the optimizer but is not passed to `threadlet.attach`, so an lr
set through torchloom is overwritten at the next `scheduler.step()`: the threadlet notices it and the
weaver journals the notice. Runs until a `stop` (`tl.range`).

    torchloom run --nproc-per-node 1 unattached_scheduler.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import threadlet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--step-sleep", type=float, default=0.02)
    args = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)
    tl = threadlet.attach(model=model, optimizer=opt)  # the scheduler deliberately left out
    x = torch.randn(32, 4)
    y = x.sum(dim=1, keepdim=True)
    for _ in tl.range(args.steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tl.step(loss=float(loss))
        time.sleep(args.step_sleep)
    tl.close()
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
