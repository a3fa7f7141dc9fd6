"""Rounds riding DDP's backward, on a real torchrun job: each rank's `Agreement` is connected to the
piggyback hook of a real DDP model (`threadlet.ddp_hook.connect`), files commands at its own random
ticks (out of order, some refused on one rank), trains with gradient accumulation (no_sync
micro-steps) and a pause, and writes what it decided, the gradients after each step and the hook
statistics to OUT/MODE-aACCUM/rank{R}.json. The test compares the ranks and a plain-DDP run.

One launch runs every named mode at every named accumulation, one after another, each on a fresh
model, DDP wrapper, gloo group and agreement with the same seeds (what separate launches would do;
starting torchrun and three ranks costs far more than one run):

    torchrun --nproc-per-node 3 ddp_agreement.py OUT --mode piggyback side plain --accum 1 3 --seed S

With `--device cuda` the model and its gradients live on each rank's GPU and DDP reduces them over
NCCL (one GPU per rank); the agreement's own group stays gloo, as in a threadlet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from threadlet import ddp_hook
from threadlet.agreement import Agreement, GlooTransport, Verdict
from threadlet.config import ThreadletConfig
from threadlet.state import Filed, TrainingState
from torchloom.messages import Command, Issuer, SetConfig

COMMANDS = 60
TICKS = 160


def command(seq: int) -> Command:
    return Command(
        command_id=f"c{seq}",
        job="j",
        run_id="r",
        seq=seq,
        issuer=Issuer(kind="test", identity="t"),
        issued_at_s=0.0,
        body=SetConfig(values={"lr": "0.1"}),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["piggyback", "side", "plain"], nargs="+", required=True)
    p.add_argument("--accum", type=int, nargs="+", default=[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    if args.device == "cuda":
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    for accum in args.accum:
        for mode in args.mode:
            run(args.out / f"{mode}-a{accum}", mode, accum, args.seed, device)
    dist.destroy_process_group()


def run(out: Path, mode: str, accum: int, seed: int, device: torch.device) -> None:
    """One run of `mode` at `accum` micro-steps per step, its records written under `out`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # Two buckets (a 4 KB cap), so the offer rides one of several.
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(
        device
    )
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(net, device_ids=ids, bucket_cap_mb=0.004)
    user_calls = [0]
    if mode == "side":

        def user_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
            user_calls[0] += 1
            return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

        ddp.register_comm_hook(*ddp_hook.wrap_comm_hook(None, user_hook))
    rng = random.Random(seed * 7919 + rank)
    # The seqs this rank refuses (rank-specific) and the tick at which it files each one.
    refused = {s for s in range(1, COMMANDS + 1) if rng.random() < 0.1}
    arrival = {s: rng.randrange(1, TICKS // 2) for s in range(1, COMMANDS + 1)}
    state = TrainingState(step_time_s=0.001)
    group = dist.new_group(backend="gloo")
    agreement = Agreement(
        ThreadletConfig(),
        state,
        prepare=lambda cmd, t: Filed(cmd, t, "refused" if cmd.seq in refused else None),
        transport=GlooTransport(group),
    )
    path = "gloo" if mode == "plain" else ddp_hook.connect(agreement, ddp, group)
    data = torch.Generator().manual_seed(1)
    decided: list[list[object]] = []
    grads: list[float] = []
    pause_at, resume_at = TICKS // 3, TICKS // 3 + 5
    for tick in range(1, TICKS + 1):
        state.tick = state.step_count = tick
        for seq, at in arrival.items():
            if at == tick:
                agreement.file(command(seq), 0.0)
        # The pause is a decided state every rank enters at the same tick: rounds go through gloo.
        state.paused = pause_at <= tick < resume_at
        if not state.paused:
            for micro in range(accum):
                x = torch.randn(8, 16, generator=data).to(device)
                last = micro == accum - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    ddp(x).pow(2).mean().backward()
            grads.append(float(sum(p.grad.double().sum() for p in net.parameters())))
            for p_ in net.parameters():
                p_.grad = None
        for filed, verdict in agreement.read_round():
            state.last_decided = filed.command.seq
            decided.append([tick, filed.command.seq, verdict is Verdict.APPLY])
        agreement.start_round()
    # Whatever is left is decided by a few more steps.
    tick = TICKS
    while state.last_decided < COMMANDS and tick < TICKS + 200:
        tick += 1
        state.tick = state.step_count = tick
        ddp(torch.randn(8, 16, generator=data).to(device)).pow(2).mean().backward()
        for p_ in net.parameters():
            p_.grad = None
        for filed, verdict in agreement.read_round():
            state.last_decided = filed.command.seq
            decided.append([tick, filed.command.seq, verdict is Verdict.APPLY])
        agreement.start_round()
    agreement.close()
    hooks = [s for _, s in ddp._comm_hooks if isinstance(s, ddp_hook.PiggybackHook)]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "path": path,
                "decided": decided,
                "grads": grads,
                "refused": sorted(refused),
                "rounds": agreement.rounds,
                "carried": hooks[0].transport.carried if hooks and hooks[0].transport else 0,
                "user_calls": user_calls[0],
                "world": world,
            }
        )
    )
    dist.barrier()


if __name__ == "__main__":
    main()
