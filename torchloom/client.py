"""The async gRPC client of the weaver's Control service, used by the CLI, scripts and agents.

Every call has a deadline; an unreachable weaver is a `WeaverUnavailable`, never a raw gRPC error.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import grpc

from torchloom import defaults, wire
from torchloom.errors import JobNotFound, TorchloomError, WeaverUnavailable
from torchloom.messages import (
    JournalRequest,
    Outcome,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
    WatchRequest,
)

_SERVICE = f"/{defaults.GRPC_SERVICE}"


class ControlClient:
    """A connection to the weaver's gRPC Control service. Use as `async with ControlClient(addr):`.

    Args:
        address: the weaver's `host:port`.
        timeout_s: deadline of a status call, and the slack added to a submit's own timeout.
        command_timeout_s: how long a submit without `timeout_s` may wait (the weaver's default).
    """

    def __init__(
        self, address: str, *, timeout_s: float = 5.0, command_timeout_s: float = defaults.COMMAND_TIMEOUT_S
    ) -> None:
        if not address or ":" not in address:
            raise ValueError(
                f"weaver address {address!r} rejected: expected HOST:PORT (e.g. 127.0.0.1:50051)"
            )
        for name, value in (("timeout_s", timeout_s), ("command_timeout_s", command_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} rejected: must be a positive number of seconds")
        self.address = address
        self.timeout_s = timeout_s
        self.command_timeout_s = command_timeout_s
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Self:
        self._channel = grpc.aio.insecure_channel(self.address)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)

    def _chan(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError("ControlClient is not open: use `async with ControlClient(...)`")
        return self._channel

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> TorchloomError:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            return JobNotFound(exc.details() or "job not found")
        if code == grpc.StatusCode.UNAVAILABLE:
            return WeaverUnavailable(
                f"weaver at {self.address} is unavailable ({exc.details()}): start one with "
                "`torchloom weaver` or `torchloom run`, or pass --grpc HOST:PORT"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return WeaverUnavailable(f"weaver at {self.address} did not answer {what} in time")
        return WeaverUnavailable(f"weaver at {self.address} failed {what}: {code.name} {exc.details()}")

    async def submit(self, request: SubmitRequest) -> Outcome:
        """Submit a command and wait for its outcome (APPLIED, REJECTED or TIMEOUT).

        Raises:
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """
        wait_s = request.timeout_s if request.timeout_s > 0 else self.command_timeout_s
        call: grpc.aio.UnaryUnaryMultiCallable[SubmitRequest, Outcome] = self._chan().unary_unary(
            f"{_SERVICE}/Submit", request_serializer=wire.encode, response_deserializer=wire.decode_outcome
        )
        try:
            outcome = await call(request, timeout=wait_s + self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "the submit") from None
        return outcome

    async def status(self, job: str = "") -> StatusReply:
        """The weaver's view of one job, or of all jobs for an empty name.

        Raises:
            JobNotFound: the weaver knows no job of that name.
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """
        call: grpc.aio.UnaryUnaryMultiCallable[StatusRequest, StatusReply] = self._chan().unary_unary(
            f"{_SERVICE}/Status",
            request_serializer=wire.encode,
            response_deserializer=wire.decode_status_reply,
        )
        try:
            reply = await call(StatusRequest(job=job), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "the status request") from None
        return reply

    async def watch(self, job: str = "") -> AsyncIterator[WatchEvent]:
        """Stream live metrics, job events and final outcomes until the weaver closes the stream.

        The stream is open-ended by design, so it carries no overall deadline; stop iterating (or
        cancel) to end it.

        Raises:
            WeaverUnavailable: the weaver cannot be reached or dropped the stream.
        """
        call: grpc.aio.UnaryStreamMultiCallable[WatchRequest, WatchEvent] = self._chan().unary_stream(
            f"{_SERVICE}/Watch", request_serializer=wire.encode, response_deserializer=wire.decode_watch_event
        )
        stream = call(WatchRequest(job=job))
        try:
            async for ev in stream:
                yield ev
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise self._error(exc, "the watch") from None
        finally:
            stream.cancel()

    async def journal(self, job: str = "", follow: bool = False) -> AsyncIterator[WatchEvent]:
        """Stream the durable journal, oldest first: final command outcomes (`Outcome`, with the
        command, its issuer and every rank's result) and job events (`JobEvent`).

        Args:
            job: one job's entries, or every job's for "".
            follow: keep streaming new entries; otherwise the stream ends at the entry that was
                last when the call was made.

        Raises:
            ValueError: `job` is not a valid job name.
            WeaverUnavailable: the weaver cannot be reached or dropped the stream.
        """
        call: grpc.aio.UnaryStreamMultiCallable[JournalRequest, WatchEvent] = self._chan().unary_stream(
            f"{_SERVICE}/Journal",
            request_serializer=wire.encode,
            response_deserializer=wire.decode_watch_event,
        )
        stream = call(JournalRequest(job=job, follow=follow))
        try:
            async for ev in stream:
                yield ev
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details() or "bad journal request") from None
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise self._error(exc, "the journal") from None
        finally:
            stream.cancel()
