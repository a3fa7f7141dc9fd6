"""A DDP training script of a configurable size for benchmarks: an MLP of about --params parameters
on synthetic data, attached to a threadlet, one JSON line per step with wall-clock timestamps.

`--device-ms X` makes each step GPU-shaped: the host waits X ms in the forward (a sleep, as a
training thread waits on a CUDA stream), so the step takes about X ms more with the CPU idle, as on a
GPU node where the control plane has free cores; without it every step is CPU work."""

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


def build(params: int, width: int) -> nn.Module:
    depth = max(1, round(params / (width * width + width)))
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=int, default=2_000_000)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--device-ms", type=float, default=0.0, help="host wait per step, as on a GPU (ms)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    net = build(args.params, args.width)
    model: nn.Module = DistributedDataParallel(net) if dist.is_initialized() else net
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(1 + rank)
    tl = threadlet.attach(model=model, optimizer=opt)
    args.out.mkdir(parents=True, exist_ok=True)
    n_params = sum(q.numel() for q in net.parameters())
    with open(args.out / f"rank{rank}.jsonl", "a", encoding="utf-8") as rec:
        for step in tl.range(args.steps):
            t0 = time.time()
            x = torch.randn(args.batch, args.width)
            loss = model(x).pow(2).mean()
            if args.device_ms:
                time.sleep(args.device_ms / 1e3)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t1 = time.time()
            tl.step(loss=float(loss))
            rec.write(
                json.dumps(
                    {
                        "step": step,
                        "branch": tl.branch,
                        "t0": t0,
                        "t1": t1,
                        "t_boundary": time.time(),
                        "params": n_params,
                        "pid": os.getpid(),
                    }
                )
                + "\n"
            )
            rec.flush()
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
