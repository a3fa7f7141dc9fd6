"""A small character-level language model (an MLP over the previous CONTEXT characters) trained with
Adam on bench/data/text.txt, for bench/outcome.py. One process (or DDP over several), steered by
torchloom like any job: lr is a knob, the eval action reports the validation loss.

    torchloom run --nproc-per-node 1 [--policy default] charlm_train.py --lr 3e-3 --steps 600 --out DIR

Batches are drawn from torch's global RNG, which checkpoints (hence rollbacks) restore, so a replay of
the decided commands retraces the run bit for bit. DIR/rank0.jsonl has one line per loop iteration
(step, branch, lr, loss); DIR/result.json the final validation loss and the iterations run.
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

import threadlet

CONTEXT = 16
EMBED = 16
HIDDEN = 128
BATCH = 64
DATA = Path(__file__).resolve().parent.parent / "data" / "text.txt"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--step-sleep", type=float, default=0.02, help="emulated extra compute per step (s)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    text = DATA.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    train, val = ids[:split], ids[split:]
    torch.manual_seed(args.seed)
    net = nn.Sequential(
        nn.Embedding(len(vocab), EMBED),
        nn.Flatten(),
        nn.Linear(CONTEXT * EMBED, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, len(vocab)),
    )
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    offsets = torch.arange(CONTEXT)

    def windows(data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return data[starts.unsqueeze(1) + offsets], data[starts + CONTEXT]

    val_x, val_y = windows(val, torch.arange(0, len(val) - CONTEXT))

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"loss": nn.functional.cross_entropy(net(val_x), val_y).item()}

    tl = threadlet.attach(model=model, optimizer=opt, eval_fn=evaluate)
    iterations = 0
    with (args.out / f"rank{rank}.jsonl").open("w", encoding="utf-8") as records:
        for step in tl.range(args.steps):
            x, y = windows(train, torch.randint(0, len(train) - CONTEXT, (BATCH,)))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            iterations += 1
            lr = opt.param_groups[0]["lr"]
            rec = {
                "step": step,
                "branch": tl.branch,
                "lr": lr,
                "loss": value if math.isfinite(value) else None,
            }
            records.write(json.dumps(rec) + "\n")
            if args.step_sleep:
                time.sleep(args.step_sleep)
            tl.step(loss=value)
    final = evaluate()["loss"]
    tl.close()
    if rank == 0:
        result = {
            "val_loss": final if math.isfinite(final) else None,
            "iterations": iterations,
            "steps": args.steps,
        }
        (args.out / "result.json").write_text(json.dumps(result))
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
