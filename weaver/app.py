"""The weaver's composition and entry points: `open_weaver()` starts a `Weaver` and then the gRPC
Control service over it; `serve()` runs that for embedding (CLI, launcher) and `main()` for
`python -m weaver`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from torchloom import defaults, tokens
from torchloom.policy import PolicyMode
from weaver.config import WeaverConfig
from weaver.grpc_api import ControlServer
from weaver.health_policy import DEFAULT_DEAD_AFTER_S
from weaver.service import Weaver

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunningWeaver:
    """A started `Weaver` and the gRPC Control service serving it."""

    weaver: Weaver
    control: ControlServer

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

    The service accepts the bearer tokens of `config.grpc_tokens_file` (created when absent).

    Raises:
        OSError: the gRPC address cannot be bound (the weaver is closed again).
        NatsUnavailable: NATS cannot be reached.
        TokenError: the token file is malformed or readable by others.
    """
    tokens_file = Path(config.grpc_tokens_file) if config.grpc_tokens_file else None
    table = await asyncio.to_thread(tokens.TokenTable.load_or_create, tokens_file)
    async with (
        Weaver(config) as weaver,
        ControlServer(weaver, config.grpc_addr, tokens=table, tls=config.tls()) as control,
    ):
        log.info("weaver serving gRPC on %s", control.address)
        yield RunningWeaver(weaver, control)


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = False
    if (
        handle_sigterm
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        installed = True
    try:
        async with open_weaver(config) as running:
            if ready is not None:
                ready(running)
            closed = asyncio.ensure_future(running.weaver.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (closed, stopped):
                    task.cancel()
            if closed.done() and not closed.cancelled():
                closed.result()  # surface a crashed loop
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = WeaverConfig.from_env(nats_url=args.nats, grpc_addr=args.grpc)
    try:
        config = WeaverConfig(
            nats_url=base.nats_url,
            grpc_addr=base.grpc_addr,
            dead_after_s=args.dead_after,
            hung_after_s=args.hung_after,
            straggler_factor=args.straggler_factor,
            health_policy=PolicyMode(args.health_policy),
        )
    except ValueError as exc:
        parser.error(str(exc))

    def _ready(w: RunningWeaver) -> None:
        print(f"weaver ready: grpc {w.grpc_address}, nats {config.nats_url}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, ready=_ready, handle_sigterm=True))
    return 0
