"""A tiny 2-rank DDP linear regression whose eval loss after a few steps depends on lr (SGD on a
well-conditioned problem: a larger stable lr gets further, lr >= 1 diverges), for the branch search
test.

    torchloom run --nproc-per-node 2 search_train.py --steps N --out DIR

Each rank writes the commands it decided to DIR/rank<R>.applied.json at the end.
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

import threadlet

FEATURES = 4


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.01)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group(backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Linear(FEATURES, 1, bias=False)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = torch.linspace(-1, 1, FEATURES).unsqueeze(1)
    held_out = torch.randn(256, FEATURES, generator=torch.Generator().manual_seed(1))

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"loss": nn.functional.mse_loss(net(held_out), held_out @ w).item()}

    tl = threadlet.attach(model=model, optimizer=opt, eval_fn=evaluate)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in tl.range(args.steps):
        x = torch.randn(32, FEATURES, generator=gen)
        loss = nn.functional.mse_loss(model(x), x @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.step_sleep)
        tl.step(loss=loss.item())
    tl.close()
    (args.out / f"rank{rank}.applied.json").write_text(json.dumps([d.to_json() for d in tl.applied]))
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
