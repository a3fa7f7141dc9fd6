"""A tiny DDP regression job steered live by torchloom, using every built-in knob of the threadlet.

    python -m torch.distributed.run --nproc-per-node 2 examples/train_tiny.py --steps 200 --out DIR

What a user can steer while it runs (`torchloom set ...`, `torchloom data add ...`):

- lr, weight_decay, betas, eps: AdamW with two named parameter groups, `body` and `head`
  (all groups at once, or one with `lr@head=...`);
- grad_clip_norm: the loop clips with `tl.clip_grad_` (0, the default, disables clipping);
- grad_accum_steps: each step accumulates that many micro-batches, then takes one optimizer step
  (one `tl.step()` per optimizer step, loss scaled by 1/accum);
- batch_size and mix: batches come from a `MixtureSampler` over three synthetic sources, `code`,
  `math` and `web`, each with its own target function (so their losses differ);
- `data add NAME PATH`: PATH is a .pt file holding a float tensor of shape (N, 9), rows
  `[x_0 .. x_7, y]`; the new source starts at weight 0 until a `mix` names it.

Each rank writes DIR/rank{R}.jsonl (one line per optimizer step: branch, loss, the knob values that
step used, lr/weight_decay/betas/eps per group, samples per source, and float64 sums of the
parameters before and after it), DIR/rank{R}.applied.json (the commands it decided) and
DIR/rank{R}.params.pt (the final parameters). Batches come from one global sample order (each rank
takes its slice of every global batch), and the sampler rides along checkpoints, so a rollback
retraces the same batches, a replay of the decided commands is bit-identical, and a restart on fewer
ranks (a reconfiguration, grad_accum_steps scaled up) continues the same order; a restarted rank
appends to its records. The loop iterates `tl.range(steps)`, so it follows
rollbacks and ends early on `stop`; an eval function (loss on held-out rows of each source) serves
the `eval` action. Without TORCHLOOM_NATS_URL it runs in local mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import threadlet
from threadlet.data import MixtureSampler

FEATURES = 8
SOURCE_ROWS = 512
EVAL_ROWS = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--out", type=Path, required=True, help="directory for per-rank records")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (default 0)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="also record each step's samples ([source, index] per micro-batch), the sampler's global "
        "position before the step, the world size and the run id",
    )
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be >= 1")
    if args.step_sleep < 0:
        p.error(f"--step-sleep={args.step_sleep} must be >= 0")
    return args


def make_sources(seed: int) -> dict[str, torch.Tensor]:
    """Three sources of (N, 9) rows `[x, y]`, the same on every rank (made from the seed alone)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.linspace(-1, 1, FEATURES)
    targets: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "code": lambda x: x @ w,  # linear
        "math": lambda x: torch.sin(2 * x).sum(1),  # smooth, non-linear
        "web": lambda x: (x**2).mean(1) - 1 + 0.3 * x[:, 0] * x[:, 1],  # quadratic with an interaction
    }
    out = {}
    for name, f in targets.items():
        x = torch.randn(SOURCE_ROWS, FEATURES, generator=gen)
        y = f(x) + 0.05 * torch.randn(SOURCE_ROWS, generator=gen)
        out[name] = torch.cat([x, y.unsqueeze(1)], dim=1)
    return out


def rows_of(sampler: MixtureSampler, batch: list[tuple[str, int]]) -> torch.Tensor:
    """The (B, 9) rows a batch names (sources added by `data add` included)."""
    return torch.stack([torch.as_tensor(sampler.dataset(name)[i], dtype=torch.float32) for name, i in batch])


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP broadcasts them anyway)
    body = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    head = nn.Linear(32, 1)
    net = nn.Sequential(body, head)
    ddp = DistributedDataParallel(net) if dist.is_initialized() else None
    model: nn.Module = ddp if ddp is not None else net
    # Named groups make every optimizer knob settable per group (`lr@head=...`).
    groups: list[dict[str, Any]] = [
        {"params": body.parameters(), "name": "body"},
        {"params": head.parameters(), "name": "head", "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=1e-3,
        weight_decay=1e-2,
    )
    sources = make_sources(args.seed)
    held_out = {name: rows[:EVAL_ROWS] for name, rows in sources.items()}
    sampler = MixtureSampler(
        {name: rows[EVAL_ROWS:] for name, rows in sources.items()},
        {"code": 1.0, "math": 1.0, "web": 1.0},
        batch_size=32,
        seed=args.seed,
        rank=rank,
        world_size=world,
    )

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            losses = {
                name: nn.functional.mse_loss(net(rows[:, :FEATURES]), rows[:, FEATURES:]).item()
                for name, rows in held_out.items()
            }
        return {"loss": sum(losses.values()) / len(losses), **{f"loss_{n}": v for n, v in losses.items()}}

    def checksum() -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in net.parameters()))

    def per_group(key: str) -> dict[str, object]:
        return {g["name"]: list(g[key]) if key == "betas" else g[key] for g in opt.param_groups}

    args.out.mkdir(parents=True, exist_ok=True)
    # sampler=: its mix/batch_size become knobs, `data add` adds sources to it, and checkpoints
    # (hence rollbacks) restore its position.
    tl = threadlet.attach(model=model, optimizer=opt, sampler=sampler, eval_fn=evaluate)
    if rank == 0:
        print(f"agreement path: {tl.agreement_path}", flush=True)
    # A resumed rank (a restart, a reconfiguration) keeps the records of the attempts before it.
    mode = "a" if tl.resumed_from else "w"
    with open(args.out / f"rank{rank}.jsonl", mode, encoding="utf-8") as records:
        for step in tl.range(args.steps):
            # The values this iteration uses: commands decided at the previous boundary
            # (tl.step_count == step) are already in force.
            accum = tl.grad_accum_steps
            rec: dict[str, object] = {
                "step": step,
                "branch": tl.branch,
                "lr": per_group("lr"),
                "weight_decay": per_group("weight_decay"),
                "betas": per_group("betas"),
                "eps": per_group("eps"),
                "grad_clip_norm": tl.training.grad_clip_norm,
                "grad_accum_steps": accum,
                "batch_size": sampler.batch_size,
                "mix": sampler.get_mix(),
            }
            if args.log_samples:
                rec.update(position=sampler.position, world=world, run=tl.config.run_id)
            drawn: list[list[tuple[str, int]]] = []
            before = checksum()
            opt.zero_grad(set_to_none=True)
            total, counts = 0.0, Counter[str]()
            per_source: dict[str, list[float]] = {}
            for micro in range(accum):
                batch = sampler.next_batch()
                drawn.append(batch)
                rows = rows_of(sampler, batch)
                pred = model(rows[:, :FEATURES])
                err = (pred - rows[:, FEATURES:]).pow(2).squeeze(1)
                loss = err.mean() / accum
                # DDP all-reduces gradients only on the last micro-batch of the step.
                last = micro == accum - 1
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    loss.backward()
                total += loss.item()
                counts.update(name for name, _ in batch)
                for (name, _), e in zip(batch, err.tolist(), strict=True):
                    per_source.setdefault(name, []).append(e)
            grad_norm = tl.clip_grad_(net.parameters())
            opt.step()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            source_loss = {f"loss_{n}": sum(v) / len(v) for n, v in sorted(per_source.items())}
            rec.update(
                loss=total,
                grad_norm=grad_norm,
                counts=dict(sorted(counts.items())),
                source_loss=source_loss,
                params_before=before,
                params=checksum(),
            )
            if args.log_samples:
                rec["samples"] = drawn
            records.write(json.dumps(rec) + "\n")
            records.flush()
            tl.step(loss=total, tokens=sum(counts.values()), **source_loss)
            if rank == 0 and (step + 1) % 50 == 0:
                print(
                    f"step {step + 1}/{args.steps} loss {total:.4f} lr {rec['lr']} {source_loss}", flush=True
                )
    tl.close()
    torch.save(
        {k: v.detach().clone() for k, v in net.state_dict().items()}, args.out / f"rank{rank}.params.pt"
    )
    (args.out / f"rank{rank}.applied.json").write_text(
        json.dumps([d.to_json() for d in tl.applied], indent=1)
    )
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
