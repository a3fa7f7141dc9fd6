"""`torchloom run` and `torchloom weaver`: bring up NATS and a weaver when none is reachable, launch torchrun.

The weaver runs as an asyncio task in this process; the embedded nats-server is a child process.
torchrun is a child in its own session, so a Ctrl-C reaches it exactly once: from us, forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torchloom import defaults, discovery, env, naming, subjects
from torchloom.app.supervisor import Supervisor, nproc_of, with_nproc
from torchloom.client import ControlClient
from torchloom.errors import WeaverUnavailable
from torchloom.nats_server import EmbeddedNats
from torchloom.policy import PolicyMode, parse_mode
from weaver.app import RunningWeaver, serve
from weaver.config import WeaverConfig
from weaver.ui_server import serve_ui

log = logging.getLogger(__name__)

# torchrun options that take no value (from torch.distributed.run's parser); every other torchrun
# option takes exactly one, given as `--opt VALUE` or `--opt=VALUE`.
TORCHRUN_FLAGS = frozenset(
    {"--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}
    | {"--virtual-local-rank", "--virtual_local_rank"}
)
_TORCHRUN_VALUE_NAMES = (
    "nnodes nproc-per-node rdzv-backend rdzv-endpoint rdzv-id rdzv-conf max-restarts "
    "monitor-interval start-method event-log-handler role log-dir redirects tee "
    "local-ranks-filter duplicate-stdout-filters duplicate-stderr-filters node-rank master-addr "
    "master-port local-addr logs-specs numa-binding signals-to-handle shutdown-timeout"
)
TORCHRUN_VALUE_OPTIONS = frozenset(
    opt for name in _TORCHRUN_VALUE_NAMES.split() for opt in (f"--{name}", f"--{name.replace('-', '_')}")
) | {"-r", "-t"}
# Our own options; they may appear anywhere before SCRIPT, mixed with torchrun's.
RUN_OPTIONS = frozenset(
    {
        "--job",
        "--run-id",
        "--nats",
        "--grpc",
        "--ui-port",
        "--hung-after",
        "--straggler-factor",
        "--health-policy",
    }
)
RUN_FLAGS = frozenset({"--ui", "--allow-fault-injection"})
# Options that mean the user chose a rendezvous; without one we add --standalone (a free port).
_RDZV_CHOICES = frozenset(
    {"--standalone", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend"}
    | {"--master-port", "--master_port", "--master-addr", "--master_addr", "--nnodes"}
)
READY_TIMEOUT_S = 30.0
_RDZV_ID = frozenset({"--rdzv-id", "--rdzv_id"})
_NNODES = frozenset({"--nnodes"})


class UsageError(ValueError):
    """A `torchloom run` command line that cannot be split into torchrun options and a script."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthOptions:
    """Rank-health thresholds for a weaver started here; None keeps WeaverConfig's default.

    Attributes:
        hung_after_s: `--hung-after`: a running rank whose step has not moved this long is hung.
        straggler_factor: `--straggler-factor`: step time above this multiple of the median.
        health_policy: `--health-policy`: reconfigure, pause or alert.
    """

    hung_after_s: float | None = None
    straggler_factor: float | None = None
    health_policy: PolicyMode | None = None

    def config_kwargs(self) -> dict[str, Any]:
        """The WeaverConfig keyword arguments these options set."""
        out: dict[str, Any] = {}
        if self.hung_after_s is not None:
            out["hung_after_s"] = self.hung_after_s
        if self.straggler_factor is not None:
            out["straggler_factor"] = self.straggler_factor
        if self.health_policy is not None:
            out["health_policy"] = self.health_policy
        return out


def parse_health(
    hung_after: str | None, straggler_factor: str | None, health_policy: str | None
) -> HealthOptions:
    """Check the health options' text and return them.

    Raises:
        UsageError: naming the bound or the expected values.
    """

    def number(name: str, text: str | None, low: float, high: float) -> float | None:
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise UsageError(f"{name} {text!r} rejected: must be a number in ({low:g}, {high:g}]")
        return value

    try:
        policy = None if health_policy is None else parse_mode(health_policy, name="--health-policy")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return HealthOptions(
        hung_after_s=number("--hung-after", hung_after, 0.0, 24 * 3600.0),
        straggler_factor=number("--straggler-factor", straggler_factor, 1.0, 1000.0),
        health_policy=policy,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """A parsed `torchloom run` command line.

    Attributes:
        job: job name (default: the script's stem).
        nats_url: `--nats`, else None (then TORCHLOOM_NATS_URL, else the embedded server).
        grpc: `--grpc`, else None.
        torchrun_args: options for torch.distributed.run, in the order given, with defaults added.
        script: the training script (or module with -m).
        script_args: everything after SCRIPT, untouched: it belongs to the script.
        run_id: `--run-id`, else derived from torchrun's `--rdzv-id` (so every node of a multi-node
            run reports the same run), else None (a fresh one per launch).
    """

    job: str
    nats_url: str | None
    grpc: str | None
    torchrun_args: tuple[str, ...]
    script: str
    script_args: tuple[str, ...]
    allow_fault_injection: bool = False
    ui: bool = False
    ui_port: int = 0
    health: HealthOptions = field(default_factory=HealthOptions)
    replay_path: str | None = None
    run_id: str | None = None

    @property
    def multinode(self) -> bool:
        """Whether torchrun may run this job on more than one node (see `is_multinode`)."""
        return is_multinode(self.torchrun_args)


def _option_value(argv: Sequence[str], i: int, opt: str) -> tuple[str, int]:
    """Return (value, next index) for the option at argv[i], in `--opt VALUE` or `--opt=VALUE` form."""
    word = argv[i]
    if "=" in word:
        return word.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option {opt} expects a value")
    return argv[i + 1], i + 2


def _has_option(args: Sequence[str], names: frozenset[str]) -> bool:
    return any(a.split("=", 1)[0] in names for a in args)


def _value_of(args: Sequence[str], names: frozenset[str]) -> str | None:
    """The value of the last option in `names` (`--opt VALUE` or `--opt=VALUE`), else None."""
    found: str | None = None
    for i, word in enumerate(args):
        name, eq, value = word.partition("=")
        if name in names:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def is_multinode(torchrun_args: Sequence[str]) -> bool:
    """Whether torchrun's options let the job span nodes: `--nnodes` other than 1 (or `1:1`).

    Then torchrun's elastic agents own the group's membership: a lost node is a re-rendezvous of
    the others, not something one node's launcher can restart.
    """
    if _has_option(torchrun_args, frozenset({"--standalone"})):
        return False
    nnodes = _value_of(torchrun_args, _NNODES)
    return nnodes is not None and nnodes not in ("1", "1:1")


def check_run_id(run_id: str) -> str:
    """Return `run_id` when it can name a run, else raise UsageError naming the expected form."""
    try:
        subjects.check_token("--run-id", run_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # A run id must not look like an attempt (`<run>-a<N>`): attempts of it are named that way.
    if naming.is_attempt_id(run_id):
        raise UsageError(
            f"--run-id {run_id!r} rejected: must not end in -a<N> (restarted attempts of a run are "
            "named <run>-a<N>)"
        )
    return run_id


def split_run_args(argv: Sequence[str]) -> RunSpec:
    """Split `torchloom run` arguments into ours, torchrun's, SCRIPT and the script's own.

    Everything after SCRIPT (or after `--`) belongs to the script. Defaults added: `--nproc-per-node 1`
    when absent, and `--standalone` (single node, free port) when no rendezvous option is given
    (`--nnodes`, `--rdzv-endpoint`, `--rdzv-backend`, `--master-addr`/`--master-port`). The run id is
    `--run-id`, else torchrun's `--rdzv-id` when a rendezvous is given, else left to `run` (fresh).

    Raises:
        UsageError: on an unknown option before SCRIPT, a missing value, no SCRIPT or a bad job name.
    """
    ours: dict[str, str] = {}
    flags: set[str] = set()
    torchrun: list[str] = []
    i = 0
    script: str | None = None
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            if i < len(argv):
                script = argv[i]
            break
        if not word.startswith("-") or word == "-":
            script = word
            break
        opt = word.split("=", 1)[0]
        if word in RUN_FLAGS:
            flags.add(word)
            i += 1
        elif opt in RUN_OPTIONS:
            ours[opt], i = _option_value(argv, i, opt)
        elif opt in TORCHRUN_FLAGS:
            torchrun.append(word)
            i += 1
        elif opt in TORCHRUN_VALUE_OPTIONS:
            value, i = _option_value(argv, i, opt)
            torchrun += [opt, value]
        else:
            raise UsageError(
                f"unknown option {word!r} before SCRIPT: expected one of "
                f"{', '.join(sorted(RUN_OPTIONS | RUN_FLAGS))} or a torchrun option "
                "(e.g. --nproc-per-node 2); options for the script go after SCRIPT"
            )
    if script is None:
        raise UsageError("no SCRIPT given: expected `torchloom run [options] SCRIPT [ARGS]`")
    script_args = tuple(argv[i + 1 :])
    if not _has_option(torchrun, frozenset({"--nproc-per-node", "--nproc_per_node"})):
        torchrun += ["--nproc-per-node", "1"]
    if not _has_option(torchrun, _RDZV_CHOICES):
        torchrun.insert(0, "--standalone")
    run_id = ours.get("--run-id")
    rdzv_id = _value_of(torchrun, _RDZV_ID)
    if run_id is None and rdzv_id is not None and not _has_option(torchrun, frozenset({"--standalone"})):
        # Every node runs the same command, so the rendezvous id is the one name they all share.
        run_id = rdzv_id
    if run_id is not None:
        check_run_id(run_id)
    default_job = Path(script).stem if not _has_option(torchrun, frozenset({"-m", "--module"})) else script
    job = ours.get("--job") or env.get(env.JOB) or default_job.rsplit(".", 1)[-1]
    try:
        subjects.check_token("job", job)
    except ValueError as exc:
        raise UsageError(f"{exc} (set it with --job NAME)") from None
    grpc = ours.get("--grpc")
    if grpc is not None:
        try:
            discovery.check_address(grpc)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    ui_port = ours.get("--ui-port", "0")
    if not ui_port.isdigit() or int(ui_port) > 65535:
        raise UsageError(
            f"--ui-port {ui_port!r} rejected: must be an integer in [0, 65535] (0 picks a free port)"
        )
    return RunSpec(
        job=job,
        nats_url=ours.get("--nats"),
        grpc=grpc,
        torchrun_args=tuple(torchrun),
        script=script,
        script_args=script_args,
        allow_fault_injection="--allow-fault-injection" in flags,
        ui="--ui" in flags or "--ui-port" in ours,
        ui_port=int(ui_port),
        health=parse_health(
            ours.get("--hung-after"), ours.get("--straggler-factor"), ours.get("--health-policy")
        ),
        run_id=run_id,
    )


def new_run_id() -> str:
    """Return a fresh run id: 12 hex characters of a uuid4."""
    return uuid.uuid4().hex[:12]


def torchrun_command(spec: RunSpec) -> list[str]:
    """Return the argv that launches the job under torchrun with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *spec.torchrun_args,
        spec.script,
        *spec.script_args,
    ]


def child_env(spec: RunSpec, *, run_id: str, nats_url: str, grpc: str) -> dict[str, str]:
    """Return the environment of the torchrun child: ours plus the TORCHLOOM_* variables."""
    out = dict(os.environ)
    out[env.NATS_URL] = nats_url
    out[env.JOB] = spec.job
    out[env.RUN_ID] = run_id
    out[env.GRPC_ADDR] = grpc
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.pop(env.ALLOW_FAULT_INJECTION, None)  # only an explicit --allow-fault-injection grants it
    if spec.allow_fault_injection:
        out[env.ALLOW_FAULT_INJECTION] = "1"
    out.pop(env.REPLAY, None)
    if spec.replay_path is not None:
        out[env.REPLAY] = spec.replay_path
    return out


def exit_status(returncode: int) -> int:
    """Map a child's return code to ours: the same code, or 128+N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True, slots=True, kw_only=True)
class WeaverEndpoints:
    """Where clients and ranks reach the weaver and its NATS server."""

    nats_url: str
    grpc: str
    ws_url: str
    owned: bool  # True when this process started the weaver (and so writes the discovery file)
    task: asyncio.Task[None] | None = None  # the in-process weaver, when owned


async def _probe(grpc: str, timeout_s: float = 2.0) -> bool:
    """Return True when a weaver answers Status at `grpc` within the deadline."""
    try:
        async with asyncio.timeout(timeout_s), ControlClient(grpc) as client:
            await client.status()
    except Exception as exc:  # any failure means "not usable": we start our own
        log.debug("weaver at %s not usable: %s", grpc, exc)
        return False
    return True


async def find_reusable(nats_url: str | None, grpc: str | None) -> WeaverEndpoints | None:
    """Return a running weaver to reuse: one that answers and shares the requested NATS URL."""
    info = discovery.read()
    if info is not None and (grpc is None or info.grpc == grpc) and nats_url in (None, info.nats_url):
        if await _probe(info.grpc):
            return WeaverEndpoints(nats_url=info.nats_url, grpc=info.grpc, ws_url=info.ws_url, owned=False)
        return None
    # An explicit weaver plus an explicit NATS URL: the user says they belong together.
    if grpc is not None and nats_url is not None and await _probe(grpc):
        return WeaverEndpoints(nats_url=nats_url, grpc=grpc, ws_url="", owned=False)
    return None


@contextlib.asynccontextmanager
async def hosted_weaver(
    *,
    nats_url: str | None,
    grpc: str | None,
    run_id: str,
    jobs: Sequence[str] = (),
    health: HealthOptions | None = None,
) -> AsyncIterator[WeaverEndpoints]:
    """Run NATS (embedded unless a URL is given) and a weaver task here until the block exits.

    Writes the discovery file while running and removes it afterwards. NATS is stopped with
    terminate, wait, then kill.

    Raises:
        NatsUnavailable: when the embedded server cannot start.
        WeaverUnavailable: when the weaver fails or does not bind before READY_TIMEOUT_S.
    """
    embedded: EmbeddedNats | None = None
    url = nats_url or env.get(env.NATS_URL)
    ws_url = ""
    if url is None:
        embedded = EmbeddedNats(discovery.home() / "runs" / run_id)
        await asyncio.to_thread(embedded.start)
        url, ws_url = embedded.url, embedded.ws_url
    ready: asyncio.Future[RunningWeaver] = asyncio.get_running_loop().create_future()

    def _ready(w: RunningWeaver) -> None:
        if not ready.done():
            ready.set_result(w)

    extra = health.config_kwargs() if health is not None else {}
    config = WeaverConfig(nats_url=url, grpc_addr=grpc or defaults.GRPC_BIND_ADDR, **extra)
    task = asyncio.create_task(serve(config, ready=_ready), name="torchloom-weaver")
    try:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                waits: set[asyncio.Future[Any]] = {task, ready}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise WeaverUnavailable(
                f"weaver did not bind its gRPC port within {READY_TIMEOUT_S:g}s"
            ) from None
        if not ready.done():
            exc = task.exception() if not task.cancelled() else None
            raise WeaverUnavailable(f"weaver stopped before it was ready: {exc!r}") from exc
        endpoints = WeaverEndpoints(
            nats_url=url, grpc=ready.result().grpc_address, ws_url=ws_url, owned=True, task=task
        )
        discovery.write(
            discovery.WeaverInfo(
                pid=os.getpid(), nats_url=url, grpc=endpoints.grpc, ws_url=ws_url, jobs=tuple(jobs)
            )
        )
        try:
            yield endpoints
        finally:
            discovery.remove()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def announce(endpoints: WeaverEndpoints, *, run_id: str | None = None, job: str | None = None) -> None:
    """Tell the user (on stderr) where to connect."""
    who = "started" if endpoints.owned else "reusing"
    parts = [f"torchloom: {who} weaver at gRPC {endpoints.grpc}", f"NATS {endpoints.nats_url}"]
    if endpoints.ws_url:
        parts.append(f"WebSocket {endpoints.ws_url}")
    if run_id is not None:
        parts.append(f"job {job} run {run_id}")
    print("; ".join(parts), file=sys.stderr, flush=True)


async def run(spec: RunSpec) -> int:
    """Launch the job under torchrun with a weaver reachable, and return the exit status for it."""
    run_id = spec.run_id or new_run_id()
    async with contextlib.AsyncExitStack() as stack:
        endpoints = await find_reusable(spec.nats_url or env.get(env.NATS_URL), spec.grpc)
        if endpoints is None:
            endpoints = await stack.enter_async_context(
                hosted_weaver(
                    nats_url=spec.nats_url,
                    grpc=spec.grpc,
                    # A chosen run id can repeat across launches; the embedded store must not.
                    run_id=run_id if spec.run_id is None else f"{run_id}-{new_run_id()}",
                    jobs=[spec.job],
                    health=spec.health,
                )
            )
        elif spec.health.config_kwargs():
            print(
                "torchloom: reusing a running weaver, so --hung-after/--straggler-factor/--health-policy "
                "do not apply (they configure a weaver started here)",
                file=sys.stderr,
                flush=True,
            )
        announce(endpoints, run_id=run_id, job=spec.job)
        if spec.ui:
            await start_ui(stack, endpoints.ws_url, port=spec.ui_port)
        started = time.monotonic()
        # The supervisor runs torchrun as attempts of this run and relaunches it on the weaver's
        # restart request (a device failure under --health-policy reconfigure).
        sup = Supervisor(
            job=spec.job,
            run_id=run_id,
            nats_url=endpoints.nats_url,
            command=lambda n: torchrun_command(
                spec if n is None else replace(spec, torchrun_args=with_nproc(spec.torchrun_args, n))
            ),
            child_env=child_env(spec, run_id=run_id, nats_url=endpoints.nats_url, grpc=endpoints.grpc),
            nproc=nproc_of(spec.torchrun_args),
            elastic_membership=spec.multinode,
        )
        code = await sup.run()
        run_id = sup.run_id
        print(
            f"torchloom: job {spec.job} run {run_id} exited with status {code} "
            f"after {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        return code
    raise AssertionError("unreachable")  # AsyncExitStack does not swallow exceptions


async def start_ui(stack: contextlib.AsyncExitStack, ws_url: str, *, port: int) -> None:
    """Serve the web UI until `stack` closes and print its URL; without a WebSocket URL or a built UI,
    say why on stderr and go on (training matters more than the dashboard)."""
    if not ws_url:
        print(
            "torchloom: no UI: this NATS server has no WebSocket listener known here "
            "(use the embedded server, or `torchloom ui --nats-ws URL`)",
            file=sys.stderr,
            flush=True,
        )
        return
    try:
        ui = await serve_ui(nats_ws_url=ws_url, port=port)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"torchloom: no UI: {exc}", file=sys.stderr, flush=True)
        return
    stack.push_async_callback(ui.close)
    print(f"torchloom UI: {ui.url}", file=sys.stderr, flush=True)


async def serve_weaver(*, nats_url: str | None, grpc: str | None, health: HealthOptions | None = None) -> int:
    """Run a standalone weaver until SIGINT or SIGTERM; return 0 on a clean stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with hosted_weaver(
            nats_url=nats_url, grpc=grpc, run_id=f"weaver-{new_run_id()}", health=health
        ) as ep:
            announce(ep)
            print(f"nats_url={ep.nats_url}\ngrpc={ep.grpc}", flush=True)
            stopping = asyncio.create_task(stop.wait())
            assert ep.task is not None
            await asyncio.wait({stopping, ep.task}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if ep.task.done() and not ep.task.cancelled() and ep.task.exception() is not None:
                print(f"torchloom: weaver failed: {ep.task.exception()!r}", file=sys.stderr, flush=True)
                return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("torchloom: weaver stopped", file=sys.stderr, flush=True)
    return 0
