"""The async gRPC client of the weaver's Control service, used by the CLI, scripts and agents.

Every call has a deadline and carries the caller's bearer token (`torchloom.tokens.resolve_token`:
explicit, TORCHLOOM_TOKEN, the discovery file); an unreachable weaver is a `WeaverUnavailable`, a
refused token an `Unauthenticated`, never a raw gRPC error.
`submit_until` is the safe way to steer: it names the command once and retries it through weaver and
NATS restarts, so a command is decided once however often it is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from torchloom import defaults, tokens, wire
from torchloom.errors import JobNotFound, TorchloomError, Unauthenticated, WeaverUnavailable
from torchloom.messages import (
    AgentRefusal,
    JobEvent,
    JournalRequest,
    Outcome,
    PolicyReply,
    PolicyRequest,
    ProposalDecision,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
    WatchRequest,
)

_SERVICE = f"/{defaults.GRPC_SERVICE}"
# Errors after which the same request is sent again: the weaver (or its NATS) is restarting or the
# answer was lost. The command id makes the repeat safe.
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# How long a submit keeps trying to reach a weaver it has not reached once: a restarting control
# plane is back within seconds; a wrong address should not hold the caller for the whole deadline.
UNREACHED_GIVE_UP_S = 10.0
RETRY_WAIT_S = 0.25
_CONNECT_TIMEOUT_S = 2.0
# What an attempt leaves for the round trip after the weaver's own wait for the ranks.
_ANSWER_MARGIN_S = 1.0


_T = TypeVar("_T")
_R = TypeVar("_R")


def weaver_addresses(address: str) -> list[str]:
    """The `host:port` addresses of a comma-separated list: an active weaver and its standbys, in
    the order to try them.

    Raises:
        ValueError: an entry is not HOST:PORT, or the list is empty.
    """
    found = [a.strip() for a in address.split(",") if a.strip()]
    if not found or any(":" not in a for a in found):
        raise ValueError(
            f"weaver address {address!r} rejected: expected HOST:PORT (e.g. 127.0.0.1:50051), or "
            "several separated by commas (an active weaver and its standbys)"
        )
    return found


def new_command_id() -> str:
    """A fresh client-chosen command id (uuid4 hex), as the CLI sends with every submit."""
    return uuid.uuid4().hex


class ControlClient:
    """A connection to the weaver's gRPC Control service. Use as `async with ControlClient(addr):`.

    Args:
        address: the weaver's `host:port`, or several separated by commas (an active weaver and its
            standbys): a status or submit answered UNAVAILABLE (a standby names the active weaver
            so) moves on to the next one, and `address` is then the one that answered.
        timeout_s: deadline of a status call, and the slack added to a submit's own timeout.
        command_timeout_s: how long a submit without `timeout_s` may wait (the weaver's default).
        token: the bearer token every call carries; None: `tokens.resolve_token()` (TORCHLOOM_TOKEN,
            then the discovery file).
        root_certificates: PEM CA certificates of a weaver serving TLS; None: a plaintext channel
            (loopback), unless TORCHLOOM_GRPC_CA_FILE names a CA file or the address is that of
            the discovery file's control plane serving TLS (`tokens.grpc_ca_certificates`).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 5.0,
        command_timeout_s: float = defaults.COMMAND_TIMEOUT_S,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        self.addresses = weaver_addresses(address)
        for name, value in (("timeout_s", timeout_s), ("command_timeout_s", command_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} rejected: must be a positive number of seconds")
        self.address = self.addresses[0]
        self.timeout_s = timeout_s
        self.command_timeout_s = command_timeout_s
        token = token if token is not None else tokens.resolve_token()
        self._metadata: tuple[tuple[str, str], ...] = (
            ((tokens.METADATA_KEY, f"{tokens.SCHEME} {token}"),) if token else ()
        )
        self._root_certificates = root_certificates or tokens.grpc_ca_certificates(self.addresses)
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Self:
        if self._root_certificates is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            self._channel = grpc.aio.secure_channel(self.address, credentials)
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
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return Unauthenticated(f"weaver at {self.address} refused {what}: {exc.details()}")
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

        One attempt; `submit_until` retries. Give the request a `command_id` to make a repeat safe.

        Raises:
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """
        wait_s = request.timeout_s if request.timeout_s > 0 else self.command_timeout_s
        try:
            return await self._failing_over(lambda: self._submit_call(request, wait_s + self.timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "the submit") from None

    async def _failing_over(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call()`, and on UNAVAILABLE again on each next address (a standby, or a weaver that is
        gone); the last error when none answers."""
        for left in range(len(self.addresses) - 1, -1, -1):
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not left:
                    raise
            await self._use(self._next_address())
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _next_address(self) -> str:
        return self.addresses[(self.addresses.index(self.address) + 1) % len(self.addresses)]

    async def _use(self, address: str) -> None:
        await self.close()
        self.address = address
        await self.__aenter__()

    async def _submit_call(self, request: SubmitRequest, timeout_s: float) -> Outcome:
        call: grpc.aio.UnaryUnaryMultiCallable[SubmitRequest, Outcome] = self._chan().unary_unary(
            f"{_SERVICE}/Submit", request_serializer=wire.encode, response_deserializer=wire.decode_outcome
        )
        return await call(request, timeout=timeout_s, metadata=self._metadata)

    async def ready(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a connection to the weaver; False when none was made."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._chan().channel_ready()
        except TimeoutError:
            return False
        return True

    async def status(self, job: str = "") -> StatusReply:
        """The weaver's view of one job, or of all jobs for an empty name.

        Raises:
            JobNotFound: the weaver knows no job of that name.
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """

        async def once() -> StatusReply:
            call: grpc.aio.UnaryUnaryMultiCallable[StatusRequest, StatusReply] = self._chan().unary_unary(
                f"{_SERVICE}/Status",
                request_serializer=wire.encode,
                response_deserializer=wire.decode_status_reply,
            )
            return await call(StatusRequest(job=job), timeout=self.timeout_s, metadata=self._metadata)

        try:
            return await self._failing_over(once)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "the status request") from None

    async def _unary(self, method: str, request: Any, decode: Callable[[bytes], _T], what: str) -> _T:
        async def once() -> _T:
            call: grpc.aio.UnaryUnaryMultiCallable[Any, _T] = self._chan().unary_unary(
                f"{_SERVICE}/{method}", request_serializer=wire.encode, response_deserializer=decode
            )
            return await call(request, timeout=self.timeout_s, metadata=self._metadata)

        try:
            return await self._failing_over(once)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details() or f"{what} refused") from None
            raise self._error(exc, what) from None

    async def set_policy(self, job: str, text: str) -> PolicyReply:
        """Run `job` under the autopilot policy `text` (TOML; "" turns its rules off).

        Raises:
            ValueError: the weaver refused the policy (the message names the field and form).
            JobNotFound: no job was named and not exactly one runs.
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """
        request = PolicyRequest(job=job, text=text)
        return await self._unary("SetPolicy", request, wire.decode_policy_reply, "the policy")

    async def get_policy(self, job: str = "") -> PolicyReply:
        """A job's autopilot policy and the proposals waiting for an answer (errors as `set_policy`)."""
        request = PolicyRequest(job=job)
        return await self._unary("GetPolicy", request, wire.decode_policy_reply, "the policy request")

    async def decide_proposal(self, proposal_id: str, *, approve: bool, job: str = "") -> JobEvent:
        """Approve (send its commands now) or refuse an autopilot proposal; returns the journaled event.

        Raises:
            JobNotFound: no such job, or it has no pending proposal with that id.
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
        """
        request = ProposalDecision(job=job, proposal_id=proposal_id, approve=approve)
        return await self._unary("DecideProposal", request, wire.decode_event, "the decision")

    async def report_agent_refusal(self, reason: str, *, reply: str = "", job: str = "") -> JobEvent:
        """Journal a model reply this agent refused (nothing was proposed); needs an agent token.

        Raises:
            ValueError: an empty reason, or too many reports in a minute.
            JobNotFound: no such job (or, for "", not exactly one runs).
            WeaverUnavailable: the weaver cannot be reached or did not answer in time.
            Unauthenticated: the token is unknown, or not an agent's.
        """
        request = AgentRefusal(job=job, reason=reason, reply=reply)
        return await self._unary("ReportAgentRefusal", request, wire.decode_event, "the agent refusal")

    async def watch(self, job: str = "") -> AsyncIterator[WatchEvent]:
        """Stream live metrics, job events and final outcomes until the weaver closes the stream.

        The stream is open-ended by design, so it carries no overall deadline; stop iterating (or
        cancel) to end it.

        Raises:
            WeaverUnavailable: the weaver cannot be reached or dropped the stream.
        """
        async for ev in self._streamed("Watch", WatchRequest(job=job), "the watch"):
            yield ev

    async def journal(
        self, job: str = "", follow: bool = False, *, run_id: str = "", command_id: str = ""
    ) -> AsyncIterator[WatchEvent]:
        """Stream the durable journal, oldest first: final command outcomes (`Outcome`, with the
        command, its issuer and every rank's result), refused attempts (REJECTED outcomes with no
        command) and job events (`JobEvent`).

        Args:
            job: one job's entries, or every job's for "".
            follow: keep streaming new entries; otherwise the stream ends at the entry that was
                last when the call was made.
            run_id: one run's entries only ("" for every run).
            command_id: only that command's final outcome; with `follow`, wait for it and end there.

        Raises:
            ValueError: `job` is not a valid job name.
            WeaverUnavailable: the weaver cannot be reached or dropped the stream.
        """
        request = JournalRequest(job=job, follow=follow, run_id=run_id, command_id=command_id)
        async for ev in self._streamed("Journal", request, "the journal"):
            yield ev

    async def _streamed(self, method: str, request: _R, what: str) -> AsyncIterator[WatchEvent]:
        """The server stream of `method`; UNAVAILABLE before its first item (a standby, or a weaver
        that is gone) moves on to the next address."""
        for left in range(len(self.addresses) - 1, -1, -1):
            call: grpc.aio.UnaryStreamMultiCallable[_R, WatchEvent] = self._chan().unary_stream(
                f"{_SERVICE}/{method}",
                request_serializer=wire.encode,
                response_deserializer=wire.decode_watch_event,
            )
            stream = call(request, metadata=self._metadata)
            started = False
            try:
                async for ev in stream:
                    started = True
                    yield ev
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(exc.details() or f"bad request for {what}") from None
                if code == grpc.StatusCode.CANCELLED:
                    return
                if code != grpc.StatusCode.UNAVAILABLE or started or not left:
                    raise self._error(exc, what) from None
            finally:
                stream.cancel()
            await self._use(self._next_address())


AddressSource = Callable[[], str | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitResult:
    """What a retried submit knows when it ends.

    Attributes:
        command_id: the id every attempt carried; `torchloom journal --command ID` follows it.
        outcome: the weaver's last answer: final (APPLIED or REJECTED) or TIMEOUT (still in flight);
            None when no attempt got an answer.
        reached: some attempt reached a weaver, so the command may have been submitted. False means
            nothing was submitted anywhere.
        attempts: submit calls made.
        error: why the last attempt failed, when there is no outcome.
    """

    command_id: str
    outcome: Outcome | None
    reached: bool
    attempts: int
    error: str = ""


async def submit_until(
    request: SubmitRequest,
    resolve: AddressSource,
    *,
    deadline_s: float,
    unreached_give_up_s: float = UNREACHED_GIVE_UP_S,
    retry_wait_s: float = RETRY_WAIT_S,
) -> SubmitResult:
    """Submit `request` and retry it with the same command id until an answer or the deadline.

    Each attempt asks `resolve` for the weaver's address again (a restarted control plane may listen
    elsewhere) and first waits for a connection, so an attempt that never connected is known to have
    submitted nothing. UNAVAILABLE, DEADLINE_EXCEEDED and lost connections are retried: the weaver
    decides a command id once, so a repeat returns that decision, never a second command. Each
    attempt asks the weaver to wait only for the time left.

    Args:
        request: the command; an empty `command_id` gets a fresh one (kept across attempts).
        resolve: returns the weaver's `host:port` (or several, comma-separated: an active weaver and
            its standbys, tried in turn), or None when none is known right now.
        deadline_s: total time for every attempt, including the ranks' answers.
        unreached_give_up_s: stop earlier when no weaver was reached in this long.
        retry_wait_s: pause between attempts.

    Raises:
        JobNotFound: the weaver answered NOT_FOUND.
        WeaverUnavailable: the weaver answered with an error that a retry cannot fix.
        ValueError: `resolve` found a malformed address, or a bound is not positive.
    """
    for name, value in (("deadline_s", deadline_s), ("unreached_give_up_s", unreached_give_up_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} rejected: must be a positive number of seconds")
    if not request.command_id:
        request = dataclasses.replace(request, command_id=new_command_id())
    start = time.monotonic()
    end = start + deadline_s
    reached, attempts, error = False, 0, ""
    turn = 0  # which of several addresses (an active weaver and its standbys) is tried next
    while True:
        now = time.monotonic()
        if now >= end or (not reached and now - start >= unreached_give_up_s):
            return SubmitResult(
                command_id=request.command_id, outcome=None, reached=reached, attempts=attempts, error=error
            )
        found = resolve()
        if found is None:
            error = "no weaver found"
            if attempts == 0 and not reached:  # nothing was ever there: no restart to wait out
                return SubmitResult(
                    command_id=request.command_id, outcome=None, reached=False, attempts=0, error=error
                )
            await asyncio.sleep(retry_wait_s)
            continue
        addresses = weaver_addresses(found)
        address = addresses[turn % len(addresses)]
        turn += 1
        async with ControlClient(address) as client:
            if not await client.ready(min(_CONNECT_TIMEOUT_S, end - now)):
                error = f"no connection to the weaver at {address}"
                if turn % len(addresses):  # the next one may be up: try it at once
                    continue
                await asyncio.sleep(retry_wait_s)
                continue
            reached = True
            attempts += 1
            left = end - time.monotonic()
            wait_s = max(0.1, left - _ANSWER_MARGIN_S)
            try:
                outcome = await client._submit_call(
                    dataclasses.replace(request, timeout_s=wait_s), max(0.1, left)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE:
                    error = f"{exc.code().name}: {exc.details()}"
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or not turn % len(addresses):
                        await asyncio.sleep(retry_wait_s)
                    continue
                raise client._error(exc, "the submit") from None
        return SubmitResult(command_id=request.command_id, outcome=outcome, reached=True, attempts=attempts)
