"""What one agreement round costs on this machine, per world size: the gloo fallback's round (a MIN
all-reduce of the 5 int64 of an offer on its own group) and the piggyback's addition to DDP's first
bucket (a 1 MiB float32 all-reduce, divided by the world size as DDP's default hook does, with and
without the 32 appended counts, through the real `PiggybackTransport.ride`). The numbers behind
docs/design.md, "Agreement at scale".

With --backward, what a communication hook costs a real DDP backward (2 ranks, MLP 64-H-1, batch
32, one bucket): DDP's C++ reduction, torch's own Python `allreduce_hook`, and the piggyback hook
carrying an idle round every step, interleaved in one process per rank; wall time and the process's
CPU time per forward+backward. With --cxx also a C++ hook that carries the same code
(bench/cxx/ride_hook.cpp, built with torch.utils.cpp_extension: needs g++ and `pip install ninja`):

    python bench/agreement_cost.py --worlds 2,4,8
    python bench/agreement_cost.py --backward --hidden 256 [--cxx]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from threadlet.agreement import NONE_REFUSED, Offer, encode
from threadlet.ddp_hook import WIDTH, PiggybackHook, PiggybackTransport, piggyback_hook

REPO = Path(__file__).resolve().parent.parent
BUCKET = 1 << 18  # float32 elements: DDP's first bucket is capped at 1 MiB


def timed(fn: object, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def measure(iters: int, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    offer = torch.tensor(encode(Offer(5, NONE_REFUSED, False, 100, 1)), dtype=torch.int64)
    grads = torch.randn(BUCKET)
    buffer = grads.clone()
    transport = PiggybackTransport(world)
    transport.start(0, lambda: (3, NONE_REFUSED))

    def gloo_round() -> None:
        dist.all_reduce(offer.clone(), op=dist.ReduceOp.MIN, group=group)

    def plain_bucket() -> None:
        buffer.copy_(grads)
        buffer.div_(world)
        dist.all_reduce(buffer)

    def ride_bucket() -> None:
        buffer.copy_(grads)
        transport.ride(buffer, dist.group.WORLD).wait()

    fns = {"gloo_round": gloo_round, "plain_bucket": plain_bucket, "ride_bucket": ride_bucket}
    for fn in fns.values():  # warm-up
        timed(fn, 10)
    # Interleaved, so the machine's load of the moment hits every variant alike.
    rows: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            rows[name] += timed(fn, 1)
    if rank == 0:
        result = {
            name: {
                "median_us": statistics.median(v) * 1e6,
                "p90_us": sorted(v)[int(0.9 * (len(v) - 1))] * 1e6,
            }
            for name, v in rows.items()
        }
        result["world_size"] = world  # type: ignore[assignment]
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure_backward(iters: int, hidden: int, out: Path, cxx: bool) -> None:
    """Forward + backward of the DDP twins, interleaved step by step."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    names = BACKWARD_ARMS + (CXX_ARMS if cxx else ())
    arms = {name: nn.parallel.DistributedDataParallel(copy.deepcopy(base)) for name in names}
    if cxx:
        from torch.utils.cpp_extension import load

        ride = load(name="tl_ride_hook", sources=[str(REPO / "bench" / "cxx" / "ride_hook.cpp")])
        code = torch.zeros(WIDTH)
        code[:3] = 1.0  # an idle rank's code: constant, written at a boundary
        cxx_sums = torch.zeros(WIDTH)
        for name in CXX_ARMS:  # cxx_plain: DDP's own reduction, but through a registered C++ hook
            ride.install(arms[name].reducer, arms[name].process_group, code, cxx_sums, name == "cxx_plain")
    arms["python_hook"].register_comm_hook(None, default_hooks.allreduce_hook)
    state = PiggybackHook(arms["piggyback_hook"].process_group)
    transport = state.transport = PiggybackTransport(dist.get_world_size())
    arms["piggyback_hook"].register_comm_hook(state, piggyback_hook)
    last = dist.get_world_size()  # any decided seq: nothing is ever pending

    def idle_offer() -> tuple[int, int]:
        return last, NONE_REFUSED

    x, y = torch.randn(32, 64), torch.randn(32, 1)
    rows: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(iters + 100):
        for name, net in arms.items():
            if name == "piggyback_hook":  # the boundary: read the carried round, stage the next
                if transport.done():
                    transport.cancel()
                transport.start(last, idle_offer)
            net.zero_grad(set_to_none=True)
            c0, t0 = time.process_time(), time.perf_counter()
            nn.functional.mse_loss(net(x), y).backward()
            if i >= 100:
                rows[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)  # every thread of the process
    # Same parameters, same batch: every arm's last backward must leave DDP's own gradients.
    grads = {n: [p.grad for p in net.parameters()] for n, net in arms.items()}
    same = {
        n: all(torch.equal(a, b) for a, b in zip(g, grads["builtin"], strict=True)) for n, g in grads.items()
    }
    if dist.get_rank() == 0:
        result: dict[str, object] = {
            name: {
                "grads_equal_builtin": same[name],
                "median_us": statistics.median(v) * 1e6,
                "mean_us": statistics.fmean(v) * 1e6,
                "cpu_mean_us": statistics.fmean(cpu[name]) * 1e6,
            }
            for name, v in rows.items()
        }
        result.update(hidden=hidden, iters=iters, load=os.getloadavg()[0])
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


BACKWARD_ARMS = ("builtin", "python_hook", "piggyback_hook")
CXX_ARMS = ("cxx_plain", "cxx_hook")


def backward(args: argparse.Namespace) -> None:
    part = Path(tempfile.mkdtemp(prefix="tl-agree-")) / "backward.json"
    load = os.getloadavg()[0]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         __file__, "--iters", str(args.iters), "--hidden", str(args.hidden), "--measure-backward",
         str(part), *(["--cxx"] if args.cxx else [])],
        env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True,
    )  # fmt: skip
    result = json.loads(part.read_text())
    result["load_before"] = load
    base = result["builtin"]["median_us"]
    base_cpu = result["builtin"]["cpu_mean_us"]
    head = f"{'forward+backward':<18}{'median us':>12}{'mean us':>12}{'vs C++':>10}"
    print(f"{head}{'CPU us':>10}{'vs C++':>10}")
    for name in BACKWARD_ARMS + (CXX_ARMS if args.cxx else ()):
        med, mean, cpu = result[name]["median_us"], result[name]["mean_us"], result[name]["cpu_mean_us"]
        print(
            f"{name:<18}{med:>12.1f}{mean:>12.1f}{(med / base - 1) * 100:>+9.1f}%"
            f"{cpu:>10.1f}{(cpu / base_cpu - 1) * 100:>+9.1f}%"
            f"{'' if result[name]['grads_equal_builtin'] else '  GRADIENTS DIFFER FROM DDP'}"
        )
    print(f"load average {load:.1f} before, {result['load']:.1f} after")
    out = Path(args.out).with_name("agreement_backward.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--backward", action="store_true", help="the hook's cost in a real DDP backward")
    p.add_argument("--hidden", type=int, default=256, help="--backward: the MLP's hidden width")
    p.add_argument("--cxx", action="store_true", help="--backward: also a C++ hook (bench/cxx/ride_hook.cpp)")
    p.add_argument("--out", default=str(REPO / "bench/results/agreement_cost.json"))
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--measure-backward", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure is not None:
        measure(args.iters, args.measure)
        return
    if args.measure_backward is not None:
        measure_backward(args.iters, args.hidden, args.measure_backward, args.cxx)
        return
    if args.backward:
        backward(args)
        return
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="tl-agree-"))
    for world in (int(w) for w in args.worlds.split(",")):
        part = tmp / f"{world}.json"
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--standalone",
             __file__, "--iters", str(args.iters), "--measure", str(part)],
            env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True,
        )  # fmt: skip
        results.append(json.loads(part.read_text()))
    print(f"{'world':>6}{'gloo round us':>16}{'bucket us':>14}{'bucket+offer us':>18}{'added us':>10}")
    for r in results:
        g, b, rb = (r[k]["median_us"] for k in ("gloo_round", "plain_bucket", "ride_bucket"))
        print(f"{r['world_size']:>6}{g:>16.1f}{b:>14.1f}{rb:>18.1f}{rb - b:>10.1f}")
    Path(args.out).write_text(
        json.dumps({"cpus": os.cpu_count(), "bucket_floats": BUCKET, "worlds": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
