"""Test job for reconfiguration: a tiny DDP regression whose ranks append one record per step
(step, loss, grad_accum_steps, world size, run id) to OUT/rank<R>.jsonl, across restarts.

--xid-at STEP makes rank 1's (fake) device report XID 79 at that step; --hang-at STEP makes rank 1
stop advancing there for --hang-s seconds (or until the file --hang-until names exists); --die-at
STEP makes rank 1 kill itself with SIGKILL there (first attempt only). Each record also carries the
wall-clock time "t" the step ended, and the process's start time "start_t" and attach duration
"attach_s" (a resume loads its checkpoint there), for bench/recovery.py; a hang writes
OUT/hang.json with its start time.
"""

from __future__ import annotations

import time

START_T = time.time()  # before the heavy imports: a restart's cost includes them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import threadlet  # noqa: E402
from torchloom import env  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.02)
    p.add_argument("--xid-at", type=int, default=0)
    p.add_argument("--hang-at", type=int, default=0)
    p.add_argument("--hang-s", type=float, default=3600.0)
    p.add_argument("--hang-until", type=Path, help="the hang also ends once this file exists")
    p.add_argument("--die-at", type=int, default=0)
    args = p.parse_args()
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.xid_at and rank == 1:
        os.environ[env.FAKE_NVML] = f"xid:79@{args.xid_at}/1"  # only rank 1's device fails
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.linspace(-1, 1, 8)).unsqueeze(1)
    torch.manual_seed(100 + rank)
    attach_t = time.time()
    tl = threadlet.attach(model=model, optimizer=opt)
    attach_s = time.time() - attach_t
    tl.training.enable(grad_accum_steps=1)
    args.out.mkdir(parents=True, exist_ok=True)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    with open(args.out / f"rank{rank}.jsonl", "a", encoding="utf-8") as records:
        for step in tl.range(args.steps):
            accum = tl.training.grad_accum_steps
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(accum):
                idx = torch.randint(0, x.shape[0], (16,))
                loss = nn.functional.mse_loss(model(x[idx]), y[idx]) / accum
                loss.backward()
                total += loss.item()
            opt.step()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if rank == 1 and args.hang_at and step == args.hang_at and not restarted:
                (args.out / "hang.json").write_text(json.dumps({"step": step, "t": time.time()}))
                hang_end = time.monotonic() + args.hang_s
                while time.monotonic() < hang_end and not (args.hang_until and args.hang_until.exists()):
                    time.sleep(0.05)
            if rank == 1 and args.die_at and step == args.die_at and not restarted and not tl.resumed_from:
                os.kill(os.getpid(), signal.SIGKILL)
            rec = {"step": step, "loss": total, "accum": accum, "world": world, "run": tl.config.run_id}
            rec |= {"t": time.time(), "start_t": START_T, "attach_s": attach_s}
            records.write(json.dumps(rec) + "\n")
            records.flush()
            tl.step(loss=total)
    tl.close()
    threadlet.finish(tl)


if __name__ == "__main__":
    main()
