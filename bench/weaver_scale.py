"""The weaver at scale: one real weaver process driven by N simulated ranks, each with real heartbeats
(5 Hz), StepMetrics (10 Hz) and acks, and its own JetStream consumer of the job's command stream, all
on a secured nats-server on loopback. Reports the weaver's CPU (cores) and RSS from /proc, command
latency from submit to the last of N acks at the weaver (`ack p50/p99`, the issue's measure; `p50/p99`
is the client's whole call, the outcome with its N rank results brought back too), the largest
heartbeat age the weaver reports in status, and whether any rank was ever reported dead.

    .venv/bin/python bench/weaver_scale.py --ranks 100,1000,3000 --duration-s 40
    .venv/bin/python bench/weaver_scale.py --ranks 3000 --profile --out /tmp/profile.json

Three parts: bench/weaver_sim.py (the simulated ranks), bench/weaver_measure.py (the processes, the
measured window and the cost model) and this script (the command line, the goals, the table and the
JSON). The simulated ranks ack every command as applied at once (no step boundary, no agreement) and
do not verify command signatures (real ranks do): the latency is the control plane's part alone.
They run in a few processes on the same machine as the weaver, so on a small loaded machine they
compete with it for CPU; each rank's largest gap between two heartbeats it sent is reported to tell
their lag from the weaver's. Prints a table and writes JSON to bench/results/weaver_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pstats
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from weaver_measure import RANKS_PER_PROCESS, cost_model, measure, serve_weaver  # noqa: E402
from weaver_sim import STEPS_PER_S, simulate  # noqa: E402


def goals(r: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals: under 1 core, command p99 under 50 ms (from submit to the last of the
    ranks' acks at the weaver), no rank falsely dead."""
    return {
        "cpu_under_1_core": r["weaver_cpu_cores"] < 1.0,
        "cmd_p99_under_50ms": r["to_every_ack_p99_ms"] is not None
        and r["to_every_ack_p99_ms"] < 50.0
        and r["outcomes"].get("applied", 0) == r["commands"],
        "no_rank_dead": r["joined"] == r["ranks"]
        and r["ranks_not_alive_max"] == 0
        and r["rank_dead_events"] == 0,
    }


HEADER = (
    f"{'ranks':>6} {'cpu':>6} {'rss MiB':>8} {'ack p50':>8} {'ack p99':>8} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'cmds':>5} {'applied':>7} "
    f"{'hb age s':>8} {'dead':>5} {'slow':>4} {'sim gap s':>9} {'sim cpu':>7} {'nats cpu':>8} {'load':>6} "
    f"{'scrape ms':>9} {'lag s':>6}"
)


def row(r: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return (
        f"{r['ranks']:>6} {r['weaver_cpu_cores']:>6.2f} {r['weaver_rss_mib_max']:>8.1f} "
        f"{num(r['to_every_ack_p50_ms'], '8.1f')} {num(r['to_every_ack_p99_ms'], '8.1f')} "
        f"{num(r['cmd_p50_ms'], '8.1f')} {num(r['cmd_p99_ms'], '8.1f')} {r['commands']:>5} "
        f"{r['outcomes'].get('applied', 0):>7} {num(r['hb_age_max_s'], '8.2f')} "
        f"{max(r['ranks_not_alive_max'], r['rank_dead_events'], r['ranks'] - r['joined']):>5} "
        f"{r['weaver_slow_consumer']:>4} {r['sim_max_send_gap_s']:>9.2f} "
        f"{r['sim_cpu_cores']:>7.2f} {r['nats_cpu_cores']:>8.2f} {r['loadavg_before'][0]:>6.1f} "
        f"{num(r['scrape_max_ms'], '9.1f')} {r['weaver_lag_max_s']:>6.2f}"
    )


def print_profile(path: Path, top: int = 25) -> list[str]:
    """The `top` functions by own time in a cProfile dump, as printed lines."""
    stats = pstats.Stats(str(path))
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    lines = [f"{'own %':>6} {'cum s':>8} {'calls':>9}  function"]
    for (file, line, name), (_cc, calls, own, cum, _callers) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        lines.append(f"{100 * own / total:>6.1f} {cum:>8.2f} {calls:>9}  {name} ({where})")
    return lines


def bench(a: argparse.Namespace) -> int:
    counts = [int(x) for x in a.ranks.split(",")]
    runs = []
    print(HEADER, flush=True)
    for n in counts if not a.no_live else ():
        profile = Path(tempfile.mkdtemp(prefix="tl-scale-prof-")) / "weaver.prof" if a.profile else None
        try:
            r = asyncio.run(
                measure(
                    n,
                    duration_s=a.duration_s,
                    hb_hz=a.hb_hz,
                    metrics_hz=a.metrics_hz,
                    command_gap_s=a.command_gap_s,
                    processes=a.processes,
                    profile=profile,
                )
            )
        except (RuntimeError, TimeoutError) as exc:  # recorded; the next rank count still runs
            runs.append({"ranks": n, "failed": repr(exc)})
            print(f"{n:>6} failed: {exc!r}", flush=True)
            traceback.print_exc()
            continue
        r["goals"] = goals(r)
        if profile is not None:
            r["profile_top"] = print_profile(profile)
        runs.append(r)
        print(row(r), flush=True)
        for line in r.get("profile_top", ()):
            print("   ", line)
    models = []
    if a.model:
        print(
            f"\n{'ranks':>6} {'hb hash us':>10} {'moved':>6} {'lr moved':>8} {'full':>6} {'mix':>6} "
            f"{'metrics read/skip us':>20} {'tick ms':>8} {'dead tick':>9} {'half quiet':>10} "
            f"{'status ms':>9} {'hb cores':>8} {'metrics':>7} {'liveness':>8} {'cores':>6}"
        )
        for n in counts:
            m = cost_model(n, a.hb_hz, a.metrics_hz)
            models.append(m)
            print(
                f"{n:>6} {m['heartbeat_hashed_us']:>10.1f} {m['heartbeat_moved_us']:>6.1f} "
                f"{m['heartbeat_values_moved_us']:>8.1f} {m['heartbeat_full_us']:>6.1f} "
                f"{m['heartbeat_mix_us']:>6.1f} "
                f"{m['metrics_read_us']:>12.1f} / {m['metrics_skipped_us']:>5.1f} "
                f"{m['liveness_tick_ms']:>8.2f} {m['liveness_tick_one_dead_ms']:>9.2f} "
                f"{m['liveness_tick_half_quiet_ms']:>10.2f} {m['status_ms']:>9.2f} "
                f"{m['cores_heartbeats']:>8.2f} {m['cores_metrics']:>7.2f} {m['cores_liveness']:>8.2f} "
                f"{m['cores_total']:>6.2f}",
                flush=True,
            )
    result = {
        "benchmark": "weaver_scale",
        "config": {
            "heartbeat_hz": a.hb_hz,
            "metrics_hz": a.metrics_hz,
            "duration_s": a.duration_s,
            "command_gap_s": a.command_gap_s,
            "simulated_step_hz": STEPS_PER_S,
            "ranks_verify_signatures": False,
            "ranks_ack_at_once": True,
        },
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "cost_model": models,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    w = sub.add_parser("weaver", help="(internal) the weaver process")
    w.add_argument("--nats", required=True)
    w.add_argument("--creds", required=True)
    w.add_argument("--key", required=True)
    w.add_argument("--tokens", required=True)
    w.add_argument("--profile", default="")
    w.add_argument("--dead-after", type=float, default=0.0)
    s = sub.add_parser("sim", help="(internal) one simulator process")
    s.add_argument("--nats", required=True)
    s.add_argument("--creds", required=True)
    s.add_argument("--job", required=True)
    s.add_argument("--run-id", required=True)
    s.add_argument("--world", type=int, required=True)
    s.add_argument("--lo", type=int, required=True)
    s.add_argument("--hi", type=int, required=True)
    s.add_argument("--t0", type=float, required=True)
    s.add_argument("--hb-hz", type=float, default=5.0)
    s.add_argument("--metrics-hz", type=float, default=10.0)
    s.add_argument("--run-s", type=float, required=True)
    p.add_argument(
        "--ranks", default="100,1000,3000", help="comma-separated rank counts (default 100,1000,3000)"
    )
    p.add_argument(
        "--duration-s", type=float, default=40.0, help="measured window per rank count (default 40)"
    )
    p.add_argument("--hb-hz", type=float, default=5.0, help="heartbeats per rank per second (default 5)")
    p.add_argument(
        "--metrics-hz", type=float, default=10.0, help="StepMetrics per rank per second (default 10)"
    )
    p.add_argument(
        "--command-gap-s", type=float, default=0.5, help="pause between two commands (default 0.5)"
    )
    p.add_argument(
        "--processes", type=int, default=0, help=f"simulator processes (0: one per {RANKS_PER_PROCESS})"
    )
    p.add_argument(
        "--profile", action="store_true", help="run the weaver under cProfile and print its hot spots"
    )
    p.add_argument("--model", action="store_true", help="also measure the CPU cost model in-process")
    p.add_argument("--no-live", action="store_true", help="skip the live runs (with --model)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "weaver_scale.json")
    a = p.parse_args(argv)
    if a.role is None:
        try:
            counts = [int(x) for x in a.ranks.split(",")]
        except ValueError:
            p.error(f"--ranks={a.ranks!r} rejected: expected comma-separated integers, e.g. 100,1000")
        if not all(1 <= n <= 4096 for n in counts):
            p.error(
                f"--ranks={a.ranks!r} rejected: each must be in [1, 4096] (the weaver's max_ranks_per_job)"
            )
        if not (a.duration_s > 0 and 0 < a.hb_hz <= 50 and 0 < a.metrics_hz <= 50 and a.command_gap_s >= 0):
            p.error("--duration-s must be > 0, --hb-hz and --metrics-hz in (0, 50], --command-gap-s >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role == "weaver":
        return serve_weaver(a)
    if a.role == "sim":
        return simulate(a)
    return bench(a)


if __name__ == "__main__":
    raise SystemExit(main())
