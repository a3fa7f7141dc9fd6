"""The gRPC Control service (Submit, Status, Watch, Journal) over a running weaver.

It depends on the `ControlBackend` protocol only (which `weaver.service.Weaver` satisfies), so the
service never imports this module and this module never imports the service; the composition
(`weaver.app`) starts a `Weaver` and then a `ControlServer` over it. Messages cross the wire through
`torchloom.wire` only; handlers are registered generically, so no generated servicer class is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol, Self

import grpc

from torchloom import defaults, wire
from torchloom.errors import JobNotFound, NatsUnavailable
from torchloom.messages import (
    JobEvent,
    JournalRequest,
    Outcome,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
    WatchRequest,
)

SERVICE = defaults.GRPC_SERVICE
# How long a stop lets in-flight calls (open Watch streams among them) finish before cancelling them.
STOP_GRACE_S = 0.2


class ControlBackend(Protocol):
    """What the Control service needs of a weaver: the four calls it exposes."""

    async def submit(self, req: SubmitRequest) -> Outcome:
        """Validate, publish and wait for a command's outcome (raises `NatsUnavailable`)."""
        ...

    def status(self, job: str = "") -> StatusReply:
        """A snapshot of one job, or of every job for "" (raises `JobNotFound`)."""
        ...

    def iter_watch(self, job: str = "") -> AsyncIterator[WatchEvent]:
        """The live feed of one job, or of every job for ""."""
        ...

    def journal(self, job: str = "", *, follow: bool = False) -> AsyncIterator[Outcome | JobEvent]:
        """The durable journal, oldest first (raises `ValueError`, `NatsUnavailable`)."""
        ...


def _handlers(weaver: ControlBackend) -> grpc.GenericRpcHandler[object, object]:
    async def submit(
        req: SubmitRequest, context: grpc.aio.ServicerContext[SubmitRequest, Outcome]
    ) -> Outcome:
        try:
            return await weaver.submit(req)
        except NatsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def status(
        req: StatusRequest, context: grpc.aio.ServicerContext[StatusRequest, StatusReply]
    ) -> StatusReply:
        try:
            return weaver.status(req.job)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def watch(
        req: WatchRequest, context: grpc.aio.ServicerContext[WatchRequest, WatchEvent]
    ) -> AsyncIterator[WatchEvent]:
        async for ev in weaver.iter_watch(req.job):
            yield ev

    async def journal(
        req: JournalRequest, context: grpc.aio.ServicerContext[JournalRequest, WatchEvent]
    ) -> AsyncIterator[WatchEvent]:
        try:
            async for ev in weaver.journal(req.job, follow=req.follow):
                yield ev
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NatsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Submit": grpc.unary_unary_rpc_method_handler(
                submit, request_deserializer=wire.decode_submit_request, response_serializer=wire.encode
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                status, request_deserializer=wire.decode_status_request, response_serializer=wire.encode
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=wire.decode_watch_request,
                response_serializer=wire.encode_watch_event,
            ),
            "Journal": grpc.unary_stream_rpc_method_handler(
                journal,
                request_deserializer=wire.decode_journal_request,
                response_serializer=wire.encode_watch_event,
            ),
        },
    )


class ControlServer:
    """The gRPC Control service over `backend`, bound to `address` (`host:port`; port 0 picks one).

    Use as `async with ControlServer(weaver, config.grpc_addr) as server:` over a started weaver;
    `close()` is idempotent.
    """

    def __init__(self, backend: ControlBackend, address: str) -> None:
        self.backend = backend
        self.requested_address = address
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def address(self) -> str:
        """`host:port` the service listens on (the bound port when 0 was asked)."""
        host = self.requested_address.rpartition(":")[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            OSError: the address cannot be bound.
        """
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handlers(self.backend),))
        try:
            port = server.add_insecure_port(self.requested_address)
        except RuntimeError:  # grpc raises this (older versions returned 0) when binding fails
            port = 0
        if port == 0:
            raise OSError(
                f"cannot bind the gRPC Control service to {self.requested_address}: is the port in use?"
            )
        await server.start()
        self._server, self._port = server, port

    async def close(self) -> None:
        """Stop serving: calls in flight get `STOP_GRACE_S` to finish, then are cancelled."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=STOP_GRACE_S)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
