"""A tiny 2-rank DDP job whose reported loss turns NaN once, at step TORCHLOOM_TEST_NAN_AT_STEP (the
first time the run passes it; a rollback does not bring it back), for the autopilot test. With
TORCHLOOM_TEST_NAN_STEP_FILE set instead, that step is read from the file once it appears, so a test
chooses it while the job runs (after its own commands) rather than guessing how far a loaded machine
gets meanwhile.

    torchloom run --policy default --nproc-per-node 2 nan_train.py --steps N --out DIR

Each rank appends one JSON line per step to DIR/rank<R>.jsonl (step, branch, lr, loss) and writes the
commands it decided to DIR/rank<R>.applied.json at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import threadlet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.01)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    nan_file = os.environ.get("TORCHLOOM_TEST_NAN_STEP_FILE")
    nan_at = None if nan_file else int(os.environ["TORCHLOOM_TEST_NAN_AT_STEP"])
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tl = threadlet.attach(model=model, optimizer=opt)
    gen = torch.Generator().manual_seed(rank)
    injected = False
    with (args.out / f"rank{rank}.jsonl").open("a", encoding="utf-8") as records:
        for step in tl.range(args.steps):
            x = torch.randn(16, 4, generator=gen)
            loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            if nan_at is None and nan_file and os.path.exists(nan_file):
                nan_at = int(Path(nan_file).read_text())
            if step == nan_at and not injected:
                injected = True
                value = math.nan
            lr = opt.param_groups[0]["lr"]
            records.write(
                json.dumps(
                    {
                        "step": step,
                        "branch": tl.branch,
                        "lr": lr,
                        "loss": None if math.isnan(value) else value,
                    }
                )
                + "\n"
            )
            records.flush()
            time.sleep(args.step_sleep)
            tl.step(loss=value)
    tl.close()
    (args.out / f"rank{rank}.applied.json").write_text(json.dumps([d.to_json() for d in tl.applied]))
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
