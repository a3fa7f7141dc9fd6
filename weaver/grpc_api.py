"""The gRPC Control service (Submit, Status, Watch, Journal) over a running `Weaver`.

Messages cross the wire through `torchloom.wire` only; handlers are registered generically, so no
generated servicer class is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from torchloom import defaults, wire
from torchloom.errors import JobNotFound, NatsUnavailable
from torchloom.messages import (
    JournalRequest,
    Outcome,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
    WatchRequest,
)

if TYPE_CHECKING:
    from weaver.service import Weaver

SERVICE = defaults.GRPC_SERVICE


def _handlers(weaver: Weaver) -> grpc.GenericRpcHandler[object, object]:
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


async def start_grpc(weaver: Weaver, address: str) -> tuple[grpc.aio.Server, int]:
    """Start the Control service on `address` (`host:port`, port 0 picks one).

    Returns:
        The running `grpc.aio.Server` and the port it bound.

    Raises:
        OSError: the address cannot be bound.
    """
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(weaver),))
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises this (older versions returned 0) when binding fails
        port = 0
    if port == 0:
        raise OSError(f"cannot bind the gRPC Control service to {address}: is the port in use?")
    await server.start()
    return server, port
