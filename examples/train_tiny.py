"""A tiny DDP regression job steered live by torchloom: the smallest complete use of the threadlet.

    python -m torch.distributed.run --nproc-per-node 2 examples/train_tiny.py --steps 200 --out DIR

Each rank writes DIR/rank{R}.jsonl (one line per step: branch, the lr and weight_decay its optimizer
step used, and float64 sums of the parameters before and after it), DIR/rank{R}.applied.json (the
commands it decided) and DIR/rank{R}.params.pt (the final parameters). The loop iterates
`tl.range(steps)`, so it follows rollbacks and ends early on `stop`; an eval function (loss on a
held-out set) serves the `eval` action. Without TORCHLOOM_NATS_URL it runs in local mode.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import threadlet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--out", type=Path, required=True, help="directory for per-rank records")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (default 0)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be >= 1")
    if args.step_sleep < 0:
        p.error(f"--step-sleep={args.step_sleep} must be >= 0")
    return args


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP broadcasts them anyway)
    body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    head = nn.Linear(32, 1)
    net = nn.Sequential(body, head)
    model: nn.Module = DistributedDataParallel(net) if dist.is_initialized() else net
    opt = torch.optim.AdamW(
        [
            {"params": body.parameters(), "name": "body"},
            {"params": head.parameters(), "name": "head", "weight_decay": 0.0},
        ],
        lr=1e-3,
        weight_decay=1e-2,
    )
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own data shard
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.linspace(-1, 1, 8)).unsqueeze(1) + 0.1 * torch.randn(256, 1, generator=gen)
    x_eval, y_eval = x[:64], y[:64]
    # Batches come from the global RNG, which checkpoints capture: after a rollback the same
    # batches come again, so a run (or its replay) is a deterministic function of its commands.
    torch.manual_seed(args.seed * 1000 + rank)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"loss": nn.functional.mse_loss(net(x_eval), y_eval).item()}

    def checksum() -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in net.parameters()))

    args.out.mkdir(parents=True, exist_ok=True)
    tl = threadlet.attach(model=model, optimizer=opt, eval_fn=evaluate)
    with open(args.out / f"rank{rank}.jsonl", "w", encoding="utf-8") as records:
        for step in tl.range(args.steps):
            # The values this iteration's optimizer step uses: commands decided at the previous
            # boundary (tl.step_count == step) are already in param_groups.
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}
            wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
            before = checksum()
            idx = torch.randint(0, x.shape[0], (32,))
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            value = loss.item()
            rec = {"step": step, "branch": tl.branch, "loss": value, "lr": lrs, "weight_decay": wds}
            rec.update(params_before=before, params=checksum())
            records.write(json.dumps(rec) + "\n")
            records.flush()
            tl.step(loss=value, tokens=32)
            if rank == 0 and (step + 1) % 50 == 0:
                print(f"step {step + 1}/{args.steps} loss {value:.4f} lr {lrs}", flush=True)
    tl.close()
    torch.save(
        {k: v.detach().clone() for k, v in net.state_dict().items()}, args.out / f"rank{rank}.params.pt"
    )
    (args.out / f"rank{rank}.applied.json").write_text(json.dumps(tl.applied, indent=1))
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
