"""The weaver's composition and entry points: `open_weaver()` starts a `Weaver` and then the gRPC
Control service over it; `serve()` runs that for embedding (CLI, launcher) and `main()` for
`python -m weaver`. `open_standby_weaver()` and `serve_standby()` (`python -m weaver --standby`) run
a weaver that serves only while it holds the lease of `weaver.leader`, so several can share one NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors

from torchloom import bus, defaults, discovery, tokens
from torchloom.errors import NatsRefused, NatsUnavailable, TorchloomError
from torchloom.policy import PolicyMode
from weaver.config import WeaverConfig
from weaver.grpc_api import ControlServer
from weaver.health_policy import DEFAULT_DEAD_AFTER_S
from weaver.leader import Leadership, LeaseConfig, StandbyBackend
from weaver.metrics import MetricsServer
from weaver.service import Weaver

log = logging.getLogger(__name__)

# A standalone weaver whose start fails on something that passes (`transient_start_error`) tries
# again after START_RETRY_FIRST_S, doubling up to START_RETRY_MAX_S, for DEFAULT_START_GIVE_UP_S.
START_RETRY_FIRST_S = 0.25
START_RETRY_MAX_S = 5.0
DEFAULT_START_GIVE_UP_S = 60.0


@dataclass(frozen=True, slots=True)
class RunningWeaver:
    """A started `Weaver` and the gRPC Control service serving it."""

    weaver: Weaver
    control: ControlServer
    metrics: MetricsServer | None = None  # the Prometheus endpoint, when `config.metrics_port` is set

    @property
    def grpc_address(self) -> str:
        """`host:port` the Control service listens on (the bound port when 0 was asked)."""
        return self.control.address

    @property
    def operator_token(self) -> str:
        """The local operator's bearer token (for the 0600 discovery file)."""
        return self.control.tokens.token(tokens.TokenRole.OPERATOR)


@contextlib.asynccontextmanager
async def open_weaver(config: WeaverConfig) -> AsyncIterator[RunningWeaver]:
    """Start a weaver, then its gRPC Control service on `config.grpc_addr`; stop them in reverse order.

    The service accepts the bearer tokens of `config.grpc_tokens_file` (created when absent). With
    `config.metrics_port` set, the weaver's Prometheus metrics are served too (`weaver.metrics`).

    Raises:
        OSError: the gRPC address cannot be bound (the weaver is closed again).
        NatsUnavailable: NATS cannot be reached.
        TokenError: the token file is malformed or readable by others.
    """
    tokens_file = Path(config.grpc_tokens_file) if config.grpc_tokens_file else tokens.default_path()
    table = await asyncio.to_thread(tokens.TokenTable.load_or_create, tokens_file)
    async with (
        Weaver(config) as weaver,
        ControlServer(
            weaver, config.grpc_addr, tokens=table, tokens_file=tokens_file, tls=config.tls()
        ) as control,
    ):
        log.info("weaver serving gRPC on %s", control.address)
        if config.metrics_port is None:
            yield RunningWeaver(weaver, control)
            return
        async with MetricsServer(
            weaver.metrics, config.metrics_host, config.metrics_port, allow_remote=config.metrics_allow_remote
        ) as metrics:
            yield RunningWeaver(weaver, control, metrics)


@dataclass(frozen=True, slots=True)
class StandbyWeaver:
    """A weaver that serves only while it holds the lease: its gRPC Control service is up from the
    start and answers UNAVAILABLE, naming the active weaver, until then (`weaver.leader`)."""

    control: ControlServer
    backend: StandbyBackend
    leadership: Leadership
    follower: asyncio.Task[None]

    @property
    def grpc_address(self) -> str:
        """`host:port` the Control service listens on (the bound port when 0 was asked)."""
        return self.control.address

    @property
    def weaver(self) -> Weaver | None:
        """The started weaver while this one is active, else None."""
        active = self.backend.active
        return active if isinstance(active, Weaver) else None

    async def wait_closed(self) -> None:
        """Return once the weaver has stopped for good (only on an error it could not survive)."""
        await self.follower


async def _serve_while_elected(config: WeaverConfig, leadership: Leadership, backend: StandbyBackend) -> None:
    """Each time the lease is won: start a weaver (which recovers from the journal and commands
    streams before it subscribes), serve through it until the lease is lost, then close it."""
    while True:
        bus.check_cancelled()
        await leadership.elected.wait()
        won = time.monotonic()
        try:
            # The lease is ours: a predecessor still bound to the acks consumer has lost it.
            async with Weaver(dataclasses.replace(config, acks_take_over=True)) as weaver:
                backend.active = weaver
                log.info("weaver active: serving %.2f s after winning the lease", time.monotonic() - won)
                lost = asyncio.ensure_future(leadership.lost.wait())
                closed = asyncio.ensure_future(weaver.wait_closed())
                try:
                    await asyncio.wait({lost, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    backend.active = None
                    for task in (lost, closed):
                        task.cancel()
        except Exception:  # NATS gone while starting, a crashed loop: let another weaver try
            log.exception("weaver failed while holding the lease: giving the lease up")
        if leadership.elected.is_set():
            await leadership.release()
            await asyncio.sleep(leadership.config.stale_after_s)


@contextlib.asynccontextmanager
async def open_standby_weaver(config: WeaverConfig, lease: LeaseConfig) -> AsyncIterator[StandbyWeaver]:
    """Bind the gRPC Control service on `config.grpc_addr`, then take part in the lease on
    `config.nats_url`; while this weaver holds it, a started `Weaver` serves behind the service.
    On the way out the weaver closes first, then the lease is given up, so a standby takes over at
    once.

    Raises:
        OSError: the gRPC address cannot be bound.
        NatsUnavailable: NATS cannot be reached.
        TokenError: the token file is malformed or readable by others.
    """
    tokens_file = Path(config.grpc_tokens_file) if config.grpc_tokens_file else tokens.default_path()
    table = await asyncio.to_thread(tokens.TokenTable.load_or_create, tokens_file)
    backend = StandbyBackend()
    control_server = ControlServer(
        backend, config.grpc_addr, tokens=table, tokens_file=tokens_file, tls=config.tls()
    )
    async with control_server as control:
        nc = await bus.connect(
            config.nats_url,
            name="torchloom-weaver-lease",
            connect_timeout_s=config.nats_timeout_s,
            credentials=config.nats_credentials,
        )
        try:
            identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            leadership = Leadership(
                nc.jetstream(timeout=config.nats_timeout_s), identity, control.address, lease
            )
            backend.leadership = leadership
            holding = asyncio.create_task(leadership.run(), name="weaver-lease")
            follower = asyncio.create_task(
                _serve_while_elected(config, leadership, backend), name="weaver-follower"
            )
            log.info(
                "weaver %s serving gRPC on %s, active once it holds the lease", identity, control.address
            )
            try:
                yield StandbyWeaver(control, backend, leadership, follower)
            finally:
                for task in (follower, holding):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if task is follower:
                        await leadership.release()
        finally:
            await nc.close()


@contextlib.contextmanager
def _sigterm(handle: bool) -> Iterator[asyncio.Event]:
    """An event SIGTERM sets, when `handle` and the main thread runs the loop and nobody else
    handles SIGTERM yet; the handler is removed on exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = (
        handle
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if installed:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        yield stop
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


async def _until_closed_or(stop: asyncio.Event, wait_closed: Awaitable[None]) -> None:
    closed = asyncio.ensure_future(wait_closed)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (closed, stopped):
            task.cancel()
    if closed.done() and not closed.cancelled():
        closed.result()  # surface a crashed loop


async def serve(
    config: WeaverConfig,
    *,
    ready: Callable[[RunningWeaver], None] | None = None,
    handle_sigterm: bool = False,
) -> None:
    """Run a weaver and its gRPC Control service until cancelled, closed or (with `handle_sigterm`)
    SIGTERM.

    Args:
        config: the weaver's configuration.
        ready: called once with the running weaver after its gRPC address is bound.
        handle_sigterm: stop cleanly on SIGTERM. Off by default because an embedding entry point
            (the CLI, the launcher forwarding signals to torchrun) owns its signals. When on, the
            handler is installed only if the main thread runs this loop and nobody else handles
            SIGTERM yet, and it is removed on exit. SIGINT is left to `asyncio.run`, which
            cancels the main task.
    """
    with _sigterm(handle_sigterm) as stop:
        async with open_weaver(config) as running:
            if ready is not None:
                ready(running)
            await _until_closed_or(stop, running.weaver.wait_closed())


async def serve_standby(
    config: WeaverConfig,
    lease: LeaseConfig,
    *,
    ready: Callable[[StandbyWeaver], None] | None = None,
    handle_sigterm: bool = False,
) -> None:
    """`serve` for a weaver that takes part in the lease (`open_standby_weaver`)."""
    with _sigterm(handle_sigterm) as stop:
        async with open_standby_weaver(config, lease) as running:
            if ready is not None:
                ready(running)
            await _until_closed_or(stop, running.wait_closed())


def transient_start_error(exc: BaseException) -> bool:
    """Whether a weaver's start failed on something that passes by itself: NATS not reachable yet,
    JetStream not answering in time (a cluster electing leaders after a server restarted), or the
    gRPC port still held (a killed predecessor's). Refused credentials (`NatsRefused`) do not."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return True
    if isinstance(exc, NatsRefused):  # wrong or missing credentials stay wrong
        return False
    return isinstance(
        exc,
        (
            NatsUnavailable,
            TimeoutError,  # also nats-py's own
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.js.errors.ServiceUnavailableError,
        ),
    )


async def serve_retrying(
    config: WeaverConfig,
    *,
    ready: Callable[[RunningWeaver | StandbyWeaver], None] | None = None,
    handle_sigterm: bool = False,
    lease: LeaseConfig | None = None,
    give_up_s: float = DEFAULT_START_GIVE_UP_S,
) -> None:
    """`serve` (with `lease`, `serve_standby`) that starts again while its start fails on something
    that passes (`transient_start_error`), pausing START_RETRY_FIRST_S and doubling up to
    START_RETRY_MAX_S, for up to `give_up_s`. A weaver restarted while its NATS cluster re-forms then
    comes up once JetStream answers, instead of exiting. Only the start is retried: once ready, the
    weaver ends as `serve` does.

    Raises:
        NatsUnavailable: the start still failed on something transient after `give_up_s`.
        ValueError: `give_up_s` is negative or not finite.
        Exception: any other start failure, at once (a bad key or token file, a bad config).
    """
    if not (math.isfinite(give_up_s) and give_up_s >= 0):
        raise ValueError(f"give_up_s={give_up_s!r} rejected: must be a finite number of seconds >= 0")
    first, pause = time.monotonic(), START_RETRY_FIRST_S
    while True:
        started = False

        def _ready(running: RunningWeaver | StandbyWeaver) -> None:
            nonlocal started
            started = True
            if ready is not None:
                ready(running)

        try:
            if lease is None:
                await serve(config, ready=_ready, handle_sigterm=handle_sigterm)
            else:
                await serve_standby(config, lease, ready=_ready, handle_sigterm=handle_sigterm)
            return
        except Exception as exc:
            spent = time.monotonic() - first
            if started or not transient_start_error(exc):
                raise
            if spent + pause > give_up_s:
                raise NatsUnavailable(
                    f"the weaver did not start within {give_up_s:g} s (--start-timeout): {exc!r}"
                ) from exc
            log.warning(
                "the weaver could not start (%r): trying again in %.2f s (%.1f s of %g s spent)",
                exc,
                pause,
                spent,
                give_up_s,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, START_RETRY_MAX_S)


def main(argv: list[str] | None = None) -> int:
    """`python -m weaver --nats URL [--grpc HOST:PORT]`: run a weaver against an existing NATS."""
    parser = argparse.ArgumentParser(prog="python -m weaver", description=__doc__)
    parser.add_argument(
        "--nats", default=None, help=f"NATS URL (default: TORCHLOOM_NATS_URL or {defaults.NATS_URL})"
    )
    parser.add_argument("--grpc", default=None, help="HOST:PORT for the gRPC Control service")
    parser.add_argument(
        "--dead-after",
        type=float,
        default=DEFAULT_DEAD_AFTER_S,
        help=f"seconds without heartbeat before a rank is dead (default {DEFAULT_DEAD_AFTER_S:g})",
    )
    parser.add_argument(
        "--hung-after", type=float, default=10.0, help="seconds without a step change before a rank is hung"
    )
    parser.add_argument(
        "--straggler-factor", type=float, default=2.0, help="step time over this x the median is a straggler"
    )
    parser.add_argument(
        "--health-policy",
        choices=[m.value for m in PolicyMode],
        default=defaults.HEALTH_POLICY.value,
        help=f"what rank health problems trigger (default: {defaults.HEALTH_POLICY})",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="share NATS with other weavers: serve only while holding the lease, else stand by",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port; default: none)",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="where metrics bind (default loopback)")
    parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow a non-loopback --metrics-host (the endpoint has no token)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="JetStream replicas of the weaver's streams on a NATS cluster, 1 to 5 (default: "
        "TORCHLOOM_NATS_REPLICAS, else 1; 3 keeps the journal through the loss of one server)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=DEFAULT_START_GIVE_UP_S,
        help="keep trying a start that fails on NATS (not reachable yet, JetStream electing leaders) "
        f"or a port still held, this many seconds (default {DEFAULT_START_GIVE_UP_S:g}; 0: try once)",
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.start_timeout) and args.start_timeout >= 0):
        parser.error(f"--start-timeout {args.start_timeout:g}: must be a finite number of seconds >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        base = WeaverConfig.from_env(nats_url=args.nats, grpc_addr=args.grpc)
        # From the environment's config, so its NATS credential and signing key are kept.
        config = dataclasses.replace(
            base,
            dead_after_s=args.dead_after,
            hung_after_s=args.hung_after,
            straggler_factor=args.straggler_factor,
            health_policy=PolicyMode(args.health_policy),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_allow_remote=args.metrics_allow_remote,
            replicas=base.replicas if args.replicas is None else args.replicas,
        )
    except ValueError as exc:
        parser.error(str(exc))

    announced: list[Path] = []

    def _ready(w: RunningWeaver | StandbyWeaver) -> None:
        metrics = w.metrics if isinstance(w, RunningWeaver) else None
        served = f", metrics {metrics.url}" if metrics is not None else ""
        # Active or standby, the CLI of this TORCHLOOM_HOME finds it without flags (torchloom.discovery).
        announced.append(discovery.announce_weaver(w.grpc_address))
        print(f"weaver ready: grpc {w.grpc_address}, nats {config.nats_url}{served}", flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                serve_retrying(
                    config,
                    ready=_ready,
                    handle_sigterm=True,
                    lease=LeaseConfig() if args.standby else None,
                    give_up_s=args.start_timeout,
                )
            )
    except (TorchloomError, OSError) as exc:  # NATS gone for good, a bad file, a port in use: one line
        print(f"python -m weaver: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for path in announced:
            discovery.withdraw_weaver(path)
    return 0
