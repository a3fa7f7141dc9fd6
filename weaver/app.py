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
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torchloom import bus, defaults, discovery, tokens
from torchloom.policy import PolicyMode
from weaver.config import WeaverConfig
from weaver.grpc_api import ControlServer
from weaver.health_policy import DEFAULT_DEAD_AFTER_S
from weaver.leader import Leadership, LeaseConfig, StandbyBackend
from weaver.metrics import MetricsServer
from weaver.service import Weaver

log = logging.getLogger(__name__)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = WeaverConfig.from_env(nats_url=args.nats, grpc_addr=args.grpc)
    try:
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
            if args.standby:
                asyncio.run(serve_standby(config, LeaseConfig(), ready=_ready, handle_sigterm=True))
            else:
                asyncio.run(serve(config, ready=_ready, handle_sigterm=True))
    finally:
        for path in announced:
            discovery.withdraw_weaver(path)
    return 0
