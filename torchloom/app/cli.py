"""The `torchloom` command line: run or replay a job, steer it (set and actions), inspect it (status,
watch, knobs, checkpoints, branches, devices, journal) and serve the web UI.

Every command that talks to a weaver finds it by --grpc, then TORCHLOOM_GRPC, then the discovery file.
Output shapes under --json are a contract (see the README); the pure functions below build them. Set
and the actions are submitted and reported by `torchloom.app.submit_cmd`, run and replay launched by
`torchloom.app.run_cmd`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torchloom
from torchloom import defaults, discovery, env, knobs, tokens
from torchloom.app import actions as cli_actions
from torchloom.app import agent as agent_cmd
from torchloom.app import format as cli_format
from torchloom.app import policy_cmd, run_cmd, runs, search, submit_cmd
from torchloom.app.format import json_value
from torchloom.app.health_options import UsageError, parse_health
from torchloom.app.interrupt import run_until_interrupted
from torchloom.app.lookup import weaver_address
from torchloom.app.submit_cmd import EXIT_NO_WEAVER, EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT, format_outcome
from torchloom.client import ControlClient
from torchloom.errors import (
    CommandRejected,
    CommandTimeout,
    JobNotFound,
    NatsUnavailable,
    TorchloomError,
    WeaverUnavailable,
)
from torchloom.messages import (
    Body,
    JobEvent,
    SetConfig,
    StatusReply,
    StepMetrics,
    WatchEvent,
)
from torchloom.policy import PolicyMode

# The control plane, the launcher, run arguments and stored history are imported by the commands that
# use them: they bring NATS, aiohttp and the weaver, about two thirds of a CLI call's start (status,
# set and journal talk gRPC only).

WATCH_METRICS_INTERVAL_S = 1.0  # at most one metrics line per rank per interval


EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE


# ---- JSON shapes (pure) --------------------------------------------------------------------------


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
                        "health": r.health,  # healthy, dead, hung, waiting, ... (`rank_health`)
                        "health_reason": r.health_reason or None,
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
        out.append(
            f"  {'rank':>4}  {'step':>8}  {'state':<8}  {'alive':<5}  {'health':<9}  {'heartbeat':<12}  knobs"
        )
        ranks = sorted(job.ranks, key=lambda r: r.rank)
        for r in ranks:
            knob_text = " ".join(f"{k}={_format_value(json_value(v))}" for k, v in sorted(r.knobs.items()))
            out.append(
                f"  {r.rank:>4}  {r.step:>8}  {r.state!s:<8}  {'yes' if r.alive else 'NO':<5}  "
                f"{r.health:<9}  {_age(r.last_heartbeat_s, now):<12}  {knob_text}"
            )
        # Why a rank is not healthy: the state is what the rank last said, its health what the
        # weaver concludes now (a stopped rank still says "running").
        out += [f"  rank {r.rank} {r.health}: {r.health_reason}" for r in ranks if r.health_reason]
    return "\n".join(out)


def format_watch_event(event: WatchEvent) -> str:
    """Return one terminal line for a watch event (control characters escaped)."""
    return cli_format.printable(_watch_line(event))


def _watch_line(event: WatchEvent) -> str:
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


class _VersionAction(argparse.Action):
    """`--version`, as argparse's own action prints it, but reading the version only when asked (see
    torchloom.__getattr__)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(f"{parser.prog} {torchloom.__version__}", flush=True)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Return the `torchloom` argument parser (`run` is parsed separately; see run_args.split_run_args)."""
    parser = argparse.ArgumentParser(
        prog="torchloom",
        description="Steer a running PyTorch distributed job live: change knobs and run actions on every "
        "rank at the same step.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
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
        p.add_argument(
            "--token-file",
            metavar="FILE",
            help="file (mode 0600) holding the weaver's bearer token (default: TORCHLOOM_TOKEN, then "
            "$TORCHLOOM_HOME/weaver.json); a token is never taken on the command line, where `ps` shows it",
        )
        return p

    def command_parent() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False, parents=[client_parent()])
        p.add_argument(
            "--timeout",
            type=_positive_float,
            default=defaults.COMMAND_TIMEOUT_S,
            metavar="S",
            help=f"seconds to wait for every rank's ack (default {defaults.COMMAND_TIMEOUT_S:g})",
        )
        p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
        return p

    sub.add_parser(
        "run",
        help="launch SCRIPT under torchrun with a weaver (started here unless one is reachable)",
        usage="torchloom run [--job NAME] [--run-id ID] [--nats URL [--nats-creds PATH]] [--grpc HOST:PORT] "
        "[--join FILE | --listen HOST] "
        "[--ui] [--ui-port P] "
        "[--allow-fault-injection] [--hung-after S] [--straggler-factor F] "
        f"[--health-policy {'|'.join(PolicyMode)}] [--data-root DIR]... [torchrun options] SCRIPT [ARGS]",
        description="torchrun options (e.g. --nproc-per-node 2, --nnodes, --max-restarts, --rdzv-*, "
        "--standalone) go before SCRIPT; everything after SCRIPT belongs to the script. --job defaults "
        "to the script's stem, --nproc-per-node to 1; without a rendezvous option --standalone is added. "
        "--ui serves the web UI (URL on stderr); --allow-fault-injection lets `torchloom fault inject` "
        "reach the ranks; --data-root DIR (repeatable; default the working directory) is where "
        "`torchloom data add` may read files from; the health options configure a weaver started here. "
        "The embedded NATS server admits only torchloom's roles (docs/security.md); for a server of "
        "yours, --nats-creds PATH is its credential (a file, or a directory from "
        "`python -m torchloom.credentials`). "
        "A multi-node run's first node writes a join file (0600) and prints its path; the other nodes "
        "run `torchloom run --join FILE [torchrun options] SCRIPT`, which takes the NATS URL, gRPC "
        "address and credentials from it. For nodes on other machines, the first node's --listen HOST "
        "(one of its addresses) serves NATS and gRPC there over TLS with a private CA the join file "
        "carries (docs/security.md); by default both stay on loopback. "
        "The weaver runs in a "
        "control plane shared by every job of $TORCHLOOM_HOME: started (detached) when none runs, it "
        "exits 10 s (TORCHLOOM_CONTROLPLANE_IDLE_S) after its last job ended. Exit status: the job's; "
        "130 after Ctrl-C, 143 after SIGTERM (the job is stopped, never relaunched).",
    )
    sub.add_parser(
        "replay",
        help="re-run a job, applying the commands of a saved journal at the same steps",
        usage=cli_actions.REPLAY_USAGE,
        description="JOURNAL is the output of `torchloom journal --json` (or `-` for stdin); `--run ID` "
        "reads run ID's stored journal instead. Its applied commands of the latest run are applied again "
        "at the same steps; the rest is as `torchloom run`.",
    )
    weaver = sub.add_parser(
        "weaver",
        help="run the control plane in the foreground: the weaver and, unless --nats is given, a supervised "
        "embedded NATS; it does not exit when jobs end",
    )
    weaver.add_argument(
        "--nats", metavar="URL", help="NATS server URL (default: TORCHLOOM_NATS_URL, else embedded)"
    )
    weaver.add_argument(
        "--nats-creds",
        metavar="PATH",
        help="credential for --nats: an nkey seed or .creds file (0600), or a secrets directory from "
        "`python -m torchloom.credentials` (default: TORCHLOOM_NATS_CREDS_FILE; the embedded server "
        "uses the control plane's own)",
    )
    weaver.add_argument(
        "--grpc", type=_address, metavar="HOST:PORT", help="gRPC bind address (default 127.0.0.1:0)"
    )
    weaver.add_argument(
        "--grpc-tls-cert", metavar="FILE", help="PEM certificate chain: required to bind off loopback"
    )
    weaver.add_argument("--grpc-tls-key", metavar="FILE", help="PEM private key of --grpc-tls-cert")
    weaver.add_argument(
        "--ui-port",
        type=int,
        default=0,
        metavar="P",
        help="port of the web UI (`torchloom ui`), whose page origin the embedded WebSocket accepts "
        "(default: a free one, in the discovery file)",
    )
    weaver.add_argument("--hung-after", metavar="S", help="a rank whose step stalls this long is hung (10)")
    weaver.add_argument(
        "--straggler-factor", metavar="F", help="step time above F x the median is a straggler (2)"
    )
    weaver.add_argument(
        "--health-policy",
        metavar="POLICY",
        help=f"what rank health problems trigger: {', '.join(PolicyMode)} (default {defaults.HEALTH_POLICY})",
    )
    weaver.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="JetStream replicas of the weaver's streams on --nats, a cluster of yours: 1 to 5 "
        "(default: TORCHLOOM_NATS_REPLICAS, else 1; 3 keeps the journal through the loss of one server)",
    )
    weaver.add_argument(
        "--policy",
        metavar="FILE",
        help="autopilot rules of every job that has none of its own: a TOML file or 'default' "
        "(torchloom policy set overrides it per job)",
    )

    set_p = sub.add_parser(
        "set", parents=[command_parent()], help="change knobs on every rank at the same step (KEY=VALUE ...)"
    )
    set_p.add_argument(
        "assignments", nargs="+", metavar="KEY=VALUE", help="e.g. lr=3e-4 weight_decay@head=0.1"
    )
    sub.add_parser("pause", parents=[command_parent()], help="pause every rank at the same step")
    sub.add_parser("resume", parents=[command_parent()], help="resume a paused job")
    ckpt = sub.add_parser("checkpoint", parents=[command_parent()], help="checkpoint every rank at one step")
    ckpt.add_argument("--tag", metavar="T", help="a name for it, unique in the run ([A-Za-z0-9_.-]{1,64})")
    rollback = sub.add_parser(
        "rollback", parents=[command_parent()], help="restore a checkpoint on every rank (starts a branch)"
    )
    rollback.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint tag or id (ckpt-N)")
    sub.add_parser("eval", parents=[command_parent()], help="run the job's eval function; print its metrics")
    sub.add_parser("stop", parents=[command_parent()], help="checkpoint, then end the job with status 0")
    data = sub.add_parser("data", help="manage the job's data sources")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    data_add = data_sub.add_parser("add", parents=[command_parent()], help="add a data source NAME at PATH")
    data_add.add_argument("name", metavar="NAME", help="source name ([A-Za-z0-9_-]{1,64})")
    data_add.add_argument("path", metavar="PATH", help="its location (made absolute)")
    fault = sub.add_parser("fault", help="inject device faults (jobs run with --allow-fault-injection)")
    fault_sub = fault.add_subparsers(dest="fault_command", required=True, metavar="SUBCOMMAND")
    inject = fault_sub.add_parser("inject", parents=[command_parent()], help="make a rank report an XID")
    inject.add_argument("--rank", type=int, required=True, metavar="R", help="the rank whose device fails")
    inject.add_argument("--xid", type=int, required=True, metavar="N", help="the NVIDIA XID code (e.g. 79)")

    policy_cmd.add_parser(sub, client_parent)
    agent_cmd.add_parser(sub, client_parent)
    search.add_parser(sub, command_parent)

    def lister(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[client_parent()], help=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        return p

    lister("status", "show jobs, ranks, steps and knobs")
    lister("knobs", "list the job's knobs: type, bounds, groups, current value")
    run_help = (
        "read run ID's stored journal (works after the run ended, with nothing running); without a "
        "weaver the latest run is read"
    )
    for name, text in (
        ("checkpoints", "list the job's checkpoints"),
        ("branches", "show the job's branch tree (the current branch marked *)"),
    ):
        lister(name, text).add_argument("--run", metavar="ID", help=run_help)
    lister("devices", "show every rank's device and its health")
    sub.add_parser(
        "metrics-url",
        help="print where Prometheus scrapes the weaver's metrics (the control plane of $TORCHLOOM_HOME)",
    )
    journal = lister("journal", "print the durable journal: command outcomes and job events")
    journal.add_argument("--run", metavar="ID", help=run_help)
    journal.add_argument(
        "--follow", action="store_true", help="keep printing new entries (JSON: one per line)"
    )
    journal.add_argument(
        "--command",
        dest="command_id",
        default="",
        metavar="ID",
        help="only that command's outcome (with --follow: wait for it); exits like `set` (0, 2, 3)",
    )
    sub.add_parser("watch", parents=[client_parent()], help="stream metrics and events until Ctrl-C")
    ui = sub.add_parser("ui", help="serve the web UI for the running weaver until Ctrl-C")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument(
        "--port",
        type=int,
        default=None,
        metavar="P",
        help="TCP port (default: the one the control plane reserved for the UI, else a free one)",
    )
    ui.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (pages still need the printed token; the traffic is plain HTTP)",
    )
    ui.add_argument(
        "--read-only", action="store_true", help="make no operator token: every page can only watch"
    )
    ui.add_argument("--nats-ws", metavar="URL", help="NATS WebSocket URL (default: from the discovery file)")
    return parser


# ---- commands ----------------------------------------------------------------------------------------


async def fetch_status(grpc: str | None, job: str) -> StatusReply:
    """Return the weaver's status of one job (or all jobs when `job` is empty)."""
    addr = weaver_address(grpc)
    async with ControlClient(addr) as client, asyncio.timeout(10.0):
        return await client.status(job)


async def watch(grpc: str | None, job: str, out: TextIO) -> None:
    """Print watch events, one line each, metrics rate-limited per rank, until cancelled."""
    addr = weaver_address(grpc)
    limiter = MetricsLimiter()
    async with ControlClient(addr) as client:
        async for event in client.watch(job):
            if limiter.allow(event, time.monotonic()):
                print(format_watch_event(event), file=out, flush=True)


# Listing commands: (JSON builder from one job's status, its human form).
_JOB_LISTINGS = {
    "knobs": (cli_format.knobs_json, cli_format.format_knobs),
    "checkpoints": (cli_format.checkpoints_json, cli_format.format_checkpoints),
    "branches": (cli_format.branches_json, cli_format.format_branches),
}


def _print_data(data: dict[str, Any], as_json: bool, human: Any) -> int:
    print(json.dumps(data) if as_json else human(data), flush=True)
    return EXIT_OK


def _wants_history(args: argparse.Namespace) -> bool:
    """History is read for `--run ID`, and when no weaver is known at all (then: the latest run)."""
    if getattr(args, "run", None):
        return True
    if getattr(args, "follow", False) or getattr(args, "command_id", ""):
        return False
    return discovery.resolve_grpc(args.grpc) is None and bool(runs.read_runs())


def _history_command(args: argparse.Namespace) -> int:
    """journal/checkpoints/branches of a run from its stored journal (`--run ID`, default the latest)."""
    if getattr(args, "follow", False):
        raise ValueError("--follow needs a running weaver; --run reads a stored journal once")
    from torchloom.app import history

    record = runs.find_run(args.run, job=args.job)
    entries = asyncio.run(history.read_entries(record))
    state = "running" if record.ended_at_s is None else f"exit status {record.exit_code}"
    print(f"torchloom: job {record.job} run {record.run_id} ({state}), stored journal", file=sys.stderr)
    if args.command == "journal":
        items = [i for i in map(cli_format.journal_entry_json, entries) if i is not None]
        if args.json:
            print(json.dumps({"entries": items}), flush=True)
        else:
            for item in items:
                print(cli_format.format_journal_entry(item), flush=True)
        return EXIT_OK
    build, human = _JOB_LISTINGS[args.command]
    return _print_data(build(history.run_status(entries, record)), args.json, human)


def _run_command(args: argparse.Namespace) -> int:
    command = args.command
    if getattr(args, "token_file", None):
        # Every client this command makes resolves its token through TORCHLOOM_TOKEN first.
        os.environ[env.TOKEN] = tokens.read_token_file(args.token_file)
    if command == "weaver":
        try:
            health = parse_health(args.hung_after, args.straggler_factor, args.health_policy)
        except UsageError as exc:
            print(f"torchloom weaver: {exc}", file=sys.stderr)
            return 2
        if args.nats_creds is not None and not (args.nats or env.get(env.NATS_URL)):
            print(
                "torchloom weaver: --nats-creds is the credential for --nats URL (a server of yours); "
                "the embedded server uses the control plane's own credentials",
                file=sys.stderr,
            )
            return 2
        from torchloom.app import controlplane

        return controlplane.serve_weaver(
            nats_url=args.nats,
            grpc=args.grpc,
            health=health,
            nats_creds=args.nats_creds,
            ui_port=args.ui_port,
            grpc_tls_cert=args.grpc_tls_cert,
            grpc_tls_key=args.grpc_tls_key,
            autopilot_policy=args.policy,
            replicas=args.replicas,
        )
    if command in ("journal", "checkpoints", "branches") and _wants_history(args):
        return _history_command(args)
    if command == "metrics-url":
        info = discovery.read(discovery.discovery_path())
        if info is None or not info.metrics_url:
            print(
                f"torchloom: no control plane serves metrics for {discovery.home()} "
                "(`torchloom run` and `torchloom weaver` start one that does)",
                file=sys.stderr,
            )
            return 1
        print(info.metrics_url, flush=True)
        return EXIT_OK
    if command == "status":
        reply = asyncio.run(fetch_status(args.grpc, args.job))
        print(json.dumps(status_json(reply)) if args.json else format_status(reply), flush=True)
        return EXIT_OK
    if command == "devices":
        reply = asyncio.run(fetch_status(args.grpc, args.job))
        return _print_data(cli_format.devices_json(reply), args.json, cli_format.format_devices)
    if command in _JOB_LISTINGS:
        build, human = _JOB_LISTINGS[command]
        job = asyncio.run(cli_actions.fetch_job(args.grpc, args.job))
        return _print_data(build(job), args.json, human)
    if command == "journal" and args.command_id:
        return submit_cmd.report_command(args)
    if command == "journal":
        # Ctrl-C is how a --follow ends, and it ends it promptly (as a watch)
        journal = cli_actions.print_journal(
            args.grpc, args.job, follow=args.follow, as_json=args.json, out=sys.stdout
        )
        return run_until_interrupted(journal, code=EXIT_OK)
    if command == "watch":  # Ctrl-C is how a watch ends, and it ends it promptly
        return run_until_interrupted(watch(args.grpc, args.job, sys.stdout), code=EXIT_OK)
    if command == "ui":  # served until Ctrl-C, which ends it promptly (as a watch)
        serve = cli_actions.serve_ui(
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            nats_ws=args.nats_ws,
            read_only=args.read_only,
        )
        return run_until_interrupted(serve, code=EXIT_OK)
    if command == "policy":
        return policy_cmd.command(args)
    if command in ("agent", "token"):
        return agent_cmd.command(args)
    if command == "search":
        return search.command(args)
    body: Body
    if command == "set":
        body = SetConfig(values=knobs.parse_assignments(args.assignments))
    else:
        body = cli_actions.action_body(args)
    result = asyncio.run(submit_cmd.submit(args.grpc, body, job=args.job, timeout_s=args.timeout))
    return submit_cmd.report(result, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `torchloom` command; returns the process exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`torchloom journal | head`): what was done is done. Say nothing
        # more, and keep Python's own flush at exit from failing on the closed pipe as well.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run" and not ({"-h", "--help"} & set(argv[1:2])):
        return run_cmd.main_run(argv[1:])
    if argv and argv[0] == "replay" and not ({"-h", "--help"} & set(argv[1:2])):
        return run_cmd.main_replay(argv[1:])
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
    except ValueError as exc:  # bad input found after parsing (a knob assignment, a UI bind address)
        print(f"torchloom: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
