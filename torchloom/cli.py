"""The `torchloom` command line: run a job, steer it (set, pause, resume), inspect it (status, watch).

Every command that talks to a weaver finds it by --grpc, then TORCHLOOM_GRPC, then the discovery file.
Output shapes under --json are a contract (see the README); the pure functions below build them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from torchloom import discovery, knobs
from torchloom.errors import (
    CommandRejected,
    CommandTimeout,
    JobNotFound,
    NatsUnavailable,
    TorchloomError,
    WeaverUnavailable,
)
from torchloom.messages import (
    AckStatus,
    Action,
    ActionKind,
    Body,
    Issuer,
    JobEvent,
    KnobValue,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StatusReply,
    StepMetrics,
    SubmitRequest,
    WatchEvent,
)

EXIT_OK = 0
EXIT_REJECTED = 2
EXIT_TIMEOUT = 3
EXIT_NO_WEAVER = 4
DEFAULT_TIMEOUT_S = 30.0
WATCH_METRICS_INTERVAL_S = 1.0  # at most one metrics line per rank per interval
NO_WEAVER_HELP = (
    "no weaver found: start a job with `torchloom run SCRIPT` (it starts one) or `torchloom weaver`, "
    "or point at one with --grpc HOST:PORT or TORCHLOOM_GRPC"
)


# ---- JSON shapes (pure) --------------------------------------------------------------------------


def json_value(value: KnobValue | None) -> Any:
    """Return a knob value in a JSON-safe form (tuples become lists; NaN/inf become strings)."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """Return the `--json` shape of set/pause/resume: command_id, status, reason, applied ranks."""
    applied = sorted(
        ({"rank": r.rank, "step": r.step} for r in outcome.results if r.status is AckStatus.APPLIED),
        key=lambda item: item["rank"],
    )
    return {
        "command_id": outcome.command_id,
        "status": str(outcome.status),
        "reason": outcome.reason or None,
        "applied": applied,
    }


def status_json(reply: StatusReply) -> dict[str, Any]:
    """Return the `--json` shape of status: jobs, each with its ranks, steps, knobs and heartbeats."""
    return {
        "jobs": [
            {
                "job": job.job,
                "run_id": job.run_id,
                "world_size": job.world_size,
                "last_seq": job.last_seq,
                "ranks": [
                    {
                        "rank": r.rank,
                        "step": r.step,
                        "state": str(r.state),
                        "alive": r.alive,
                        "knobs": {name: json_value(v) for name, v in sorted(r.knobs.items())},
                        "last_heartbeat_s": r.last_heartbeat_s,
                        "host": r.host,
                        "pid": r.pid,
                        "step_time_s": r.step_time_s,
                    }
                    for r in sorted(job.ranks, key=lambda r: r.rank)
                ],
            }
            for job in reply.jobs
        ]
    }


def exit_code(outcome: Outcome) -> int:
    """Return the exit status for a command's outcome: 0 applied everywhere, 2 rejected, 3 timeout."""
    if outcome.status is OutcomeStatus.APPLIED:
        return EXIT_OK
    if outcome.status is OutcomeStatus.REJECTED:
        return EXIT_REJECTED
    return EXIT_TIMEOUT


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def _age(stamp_s: float, now_s: float) -> str:
    # Accept a wall-clock stamp or an age in seconds; an operator wants "how long ago" either way.
    if stamp_s <= 0:
        return "-"
    age = now_s - stamp_s if stamp_s > 1e9 else stamp_s
    return f"{max(0.0, age):.1f}s ago"


def format_outcome(outcome: Outcome) -> str:
    """Return the human form of a command's outcome: a summary line, then one line per rank."""
    lines = [f"{outcome.status}: command {outcome.command_id} on job {outcome.job or '-'}"]
    for r in sorted(outcome.results, key=lambda r: r.rank):
        line = f"  rank {r.rank}: {r.status} at step {r.step}"
        lines.append(f"{line} ({r.reason})" if r.reason else line)
    if outcome.reason:
        lines.append(f"  reason: {outcome.reason}")
    return "\n".join(lines)


def format_status(reply: StatusReply, *, now_s: float | None = None) -> str:
    """Return the human form of status: a compact table per job."""
    if not reply.jobs:
        return "no jobs (the weaver is up; no rank has reported yet)"
    now = time.time() if now_s is None else now_s
    out: list[str] = []
    for job in reply.jobs:
        out.append(
            f"job {job.job}  run {job.run_id or '-'}  world_size {job.world_size}  last_seq {job.last_seq}"
        )
        out.append(f"  {'rank':>4}  {'step':>8}  {'state':<8}  {'alive':<5}  {'heartbeat':<12}  knobs")
        for r in sorted(job.ranks, key=lambda r: r.rank):
            knob_text = " ".join(f"{k}={_format_value(json_value(v))}" for k, v in sorted(r.knobs.items()))
            out.append(
                f"  {r.rank:>4}  {r.step:>8}  {r.state!s:<8}  {'yes' if r.alive else 'NO':<5}  "
                f"{_age(r.last_heartbeat_s, now):<12}  {knob_text}"
            )
    return "\n".join(out)


def format_watch_event(event: WatchEvent) -> str:
    """Return one terminal line for a watch event."""
    if isinstance(event, StepMetrics):
        values = " ".join(f"{k}={v:.6g}" for k, v in sorted(event.values.items()))
        return f"metrics {event.job} rank {event.rank} step {event.step} {values}".rstrip()
    if isinstance(event, JobEvent):
        text = f"event   {event.job} {event.kind}: {event.message}".rstrip(": ")
        return f"{text} [{event.command_id}]" if event.command_id else text
    return "outcome " + format_outcome(event).replace("\n", ";")


class MetricsLimiter:
    """Let through at most one metrics event per (job, rank) per interval; everything else passes."""

    def __init__(self, interval_s: float = WATCH_METRICS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, int], float] = {}

    def allow(self, event: WatchEvent, now_s: float) -> bool:
        if not isinstance(event, StepMetrics):
            return True
        key = (event.job, event.rank)
        last = self._last.get(key)
        if last is not None and now_s - last < self.interval_s:
            return False
        self._last[key] = now_s
        return True


# ---- argument parsing ------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: expected seconds > 0 (e.g. 30)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds > 0 (e.g. 30)")
    return value


def _address(text: str) -> str:
    try:
        return discovery.check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the `torchloom` argument parser (`run` is parsed separately; see launcher.split_run_args)."""
    parser = argparse.ArgumentParser(
        prog="torchloom",
        description="Steer a running PyTorch distributed job live: change knobs and run actions on every "
        "rank at the same step.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_parent() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(
            "--grpc",
            type=_address,
            metavar="HOST:PORT",
            help="weaver address (default: TORCHLOOM_GRPC, then $TORCHLOOM_HOME/weaver.json)",
        )
        p.add_argument("--job", default="", metavar="NAME", help="job name (default: the only running job)")
        return p

    def command_parent() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False, parents=[client_parent()])
        p.add_argument(
            "--timeout",
            type=_positive_float,
            default=DEFAULT_TIMEOUT_S,
            metavar="S",
            help=f"seconds to wait for every rank's ack (default {DEFAULT_TIMEOUT_S:g})",
        )
        p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
        return p

    sub.add_parser(
        "run",
        help="launch SCRIPT under torchrun with a weaver (started here unless one is reachable)",
        usage="torchloom run [--job NAME] [--nats URL] [--grpc HOST:PORT] [torchrun options] SCRIPT [ARGS]",
        description="torchrun options (e.g. --nproc-per-node 2, --nnodes, --max-restarts, --rdzv-*, "
        "--standalone) go before SCRIPT; everything after SCRIPT belongs to the script. --job defaults "
        "to the script's stem, --nproc-per-node to 1; without a rendezvous option --standalone is added.",
    )
    weaver = sub.add_parser("weaver", help="run a standalone weaver (embedded NATS unless --nats is given)")
    weaver.add_argument(
        "--nats", metavar="URL", help="NATS server URL (default: TORCHLOOM_NATS_URL, else embedded)"
    )
    weaver.add_argument(
        "--grpc", type=_address, metavar="HOST:PORT", help="gRPC bind address (default 127.0.0.1:0)"
    )

    set_p = sub.add_parser(
        "set", parents=[command_parent()], help="change knobs on every rank at the same step (KEY=VALUE ...)"
    )
    set_p.add_argument(
        "assignments", nargs="+", metavar="KEY=VALUE", help="e.g. lr=3e-4 weight_decay@head=0.1"
    )
    sub.add_parser("pause", parents=[command_parent()], help="pause every rank at the same step")
    sub.add_parser("resume", parents=[command_parent()], help="resume a paused job")
    status = sub.add_parser("status", parents=[client_parent()], help="show jobs, ranks, steps and knobs")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("watch", parents=[client_parent()], help="stream metrics and events until Ctrl-C")
    return parser


# ---- commands ----------------------------------------------------------------------------------------


def _resolve(grpc: str | None) -> str:
    addr = discovery.resolve_grpc(grpc)
    if addr is None:
        raise WeaverUnavailable(NO_WEAVER_HELP)
    return addr


async def submit(grpc: str | None, body: Body, *, job: str, timeout_s: float) -> Outcome:
    """Submit a command to the weaver and wait for its outcome (or the weaver's timeout)."""
    addr = _resolve(grpc)
    from torchloom.client import ControlClient

    request = SubmitRequest(body=body, job=job, issuer=Issuer(kind="cli"), timeout_s=timeout_s)
    async with ControlClient(addr) as client:
        # The weaver answers TIMEOUT itself at timeout_s; the margin covers the round trip.
        async with asyncio.timeout(timeout_s + 10.0):
            return await client.submit(request)


async def fetch_status(grpc: str | None, job: str) -> StatusReply:
    """Return the weaver's status of one job (or all jobs when `job` is empty)."""
    addr = _resolve(grpc)
    from torchloom.client import ControlClient

    async with ControlClient(addr) as client, asyncio.timeout(10.0):
        return await client.status(job)


async def watch(grpc: str | None, job: str, out: TextIO) -> None:
    """Print watch events, one line each, metrics rate-limited per rank, until cancelled."""
    addr = _resolve(grpc)
    from torchloom.client import ControlClient

    limiter = MetricsLimiter()
    async with ControlClient(addr) as client:
        async for event in client.watch(job):
            if limiter.allow(event, time.monotonic()):
                print(format_watch_event(event), file=out, flush=True)


def _report(outcome: Outcome, as_json: bool) -> int:
    if as_json:
        print(json.dumps(outcome_json(outcome)), flush=True)
    else:
        print(format_outcome(outcome), flush=True)
    code = exit_code(outcome)
    if code == EXIT_REJECTED:
        print(f"torchloom: rejected: {outcome.reason}", file=sys.stderr)
    elif code == EXIT_TIMEOUT:
        print(
            "torchloom: timed out waiting for every rank's ack; the command stays in flight "
            "(see `torchloom watch`)",
            file=sys.stderr,
        )
    return code


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "weaver":
        from torchloom import launcher

        return asyncio.run(launcher.serve_weaver(nats_url=args.nats, grpc=args.grpc))
    if args.command == "status":
        reply = asyncio.run(fetch_status(args.grpc, args.job))
        print(json.dumps(status_json(reply)) if args.json else format_status(reply), flush=True)
        return EXIT_OK
    if args.command == "watch":
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
            asyncio.run(watch(args.grpc, args.job, sys.stdout))
        return EXIT_OK
    body: Body
    if args.command == "set":
        body = SetConfig(values=knobs.parse_assignments(args.assignments))
    else:
        body = Action(kind=ActionKind.PAUSE if args.command == "pause" else ActionKind.RESUME)
    outcome = asyncio.run(submit(args.grpc, body, job=args.job, timeout_s=args.timeout))
    return _report(outcome, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `torchloom` command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run" and not ({"-h", "--help"} & set(argv[1:2])):
        return _main_run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except CommandRejected as exc:
        print(f"torchloom: {exc.reason}", file=sys.stderr)
        return EXIT_REJECTED
    except JobNotFound as exc:
        print(f"torchloom: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (CommandTimeout, TimeoutError) as exc:
        print(f"torchloom: timed out: {exc or 'no answer from the weaver'}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (WeaverUnavailable, NatsUnavailable) as exc:
        print(f"torchloom: {exc}", file=sys.stderr)
        return EXIT_NO_WEAVER
    except TorchloomError as exc:
        print(f"torchloom: {exc}", file=sys.stderr)
        return 1


def _main_run(argv: Sequence[str]) -> int:
    from torchloom import launcher

    try:
        spec = launcher.split_run_args(argv)
    except launcher.UsageError as exc:
        print(f"torchloom run: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(launcher.run(spec))
    except KeyboardInterrupt:
        return 130
    except TorchloomError as exc:
        print(f"torchloom run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
