"""The gRPC Control service (Submit, Status, Watch, Journal) over a running weaver.

Every call must carry `authorization: Bearer <token>`; an interceptor maps the token to an identity
through the `TokenTable` the composition gives it, refuses any other call with UNAUTHENTICATED (and
has the weaver journal the refusal: who, why), and a Submit is issued by that identity, whatever the
client claims (a different claim is journaled beside it as `Issuer.claimed_identity`). A token of role
"agent" submits through the guardrails of the job's policy (`weaver.agents`), with issuer kind
"agent", and may journal the model replies it refused (ReportAgentRefusal). The token table is read
again when its file changes, so an agent added while the weaver runs can call at once. Off loopback
the service binds only with TLS.

It depends on the `ControlBackend` protocol only (which `weaver.service.Weaver` satisfies), so the
service never imports this module and this module never imports the service; the composition
(`weaver.app`) starts a `Weaver` and then a `ControlServer` over it. Messages cross the wire through
`torchloom.wire` only; handlers are registered generically, so no generated servicer class is needed.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import grpc

from torchloom import defaults, tokens, wire
from torchloom.errors import JobNotFound, NatsUnavailable
from torchloom.messages import (
    AgentRefusal,
    Issuer,
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

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SERVICE = defaults.GRPC_SERVICE
AGENT_KIND = "agent"  # the issuer kind of every submit made with an agent token
_MAX_CLAIM_CHARS = 128
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

    def journal(
        self, job: str = "", *, follow: bool = False, run_id: str = "", command_id: str = ""
    ) -> AsyncIterator[Outcome | JobEvent]:
        """The durable journal, oldest first, of one run or one command when asked (raises
        `ValueError`, `NatsUnavailable`)."""
        ...

    def set_policy(self, req: PolicyRequest) -> PolicyReply:
        """Run a job under an autopilot policy (raises `ValueError`, `JobNotFound`)."""
        ...

    def get_policy(self, req: PolicyRequest) -> PolicyReply:
        """A job's autopilot policy and pending proposals (raises `ValueError`, `JobNotFound`)."""
        ...

    def decide_proposal(self, req: ProposalDecision, decided_by: str = "") -> JobEvent:
        """Approve or refuse a proposal, journaled as decided by `decided_by` (raises `ValueError`,
        `JobNotFound`, `KeyError`)."""
        ...

    def refuse_call(self, message: str, *, job: str = "", key: str = "", **attrs: str) -> None:
        """Journal a call the service refused before it reached the weaver (rate-limited like every
        refusal; `key` groups the ones counted together)."""
        ...

    async def submit_agent(self, req: SubmitRequest) -> Outcome:
        """An agent's submit: the guardrails of the job's policy, then `submit`."""
        ...

    def report_agent_refusal(self, identity: str, report: AgentRefusal) -> JobEvent:
        """Journal a model reply an agent refused (raises `ValueError`, `JobNotFound`)."""
        ...


# The token entry (role, identity) the interceptor authenticated, for the handler of the same call
# (grpc.aio runs the interceptors and the handler of one call in one contextvars.Context).
_CALLER: contextvars.ContextVar[tokens.TokenEntry] = contextvars.ContextVar("torchloom_grpc_caller")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not) and "localhost"."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """The PEM certificate chain and private key the service presents off loopback."""

    cert_file: Path
    key_file: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read both files into `grpc.ssl_server_credentials`.

        Raises:
            OSError: a file cannot be read.
        """
        return grpc.ssl_server_credentials([(self.key_file.read_bytes(), self.cert_file.read_bytes())])


_Behavior = Callable[[bytes, grpc.aio.ServicerContext[bytes, object]], Awaitable[None]]


class Authenticator(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    """Lets a call through only with a bearer token of `table`; refuses the rest with UNAUTHENTICATED
    and reports each refusal to `backend.refuse_call`."""

    def __init__(self, table: tokens.TokenFile, backend: ControlBackend) -> None:
        self.table = table
        self.backend = backend

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[object, object]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[object, object]:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return handler
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == tokens.METADATA_KEY]
        token = tokens.parse_authorization(str(values[0])) if len(values) == 1 else None
        entry = self.table.table.entry(token) if token else None
        if entry is not None:
            _CALLER.set(entry)
            return handler
        if not values:
            why = f"no credential: send `{tokens.METADATA_KEY}: {tokens.SCHEME} <token>` metadata"
        elif token is None:
            why = f"malformed {tokens.METADATA_KEY} metadata: expected exactly one `{tokens.SCHEME} <token>`"
        else:
            why = "unknown token"
        refuse = self._refusal(handler_call_details.method, why)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _refusal(self, method: str, why: str) -> _Behavior:
        async def refuse(request: bytes, context: grpc.aio.ServicerContext[bytes, object]) -> None:
            who = f"unauthenticated {context.peer()}"
            name = method.rsplit("/", 1)[-1]
            attrs = {"who": who, "method": name, "why": why}
            job = ""
            if name == "Submit":
                # What the refused client asked for, as far as it parses (it changes nothing).
                try:
                    req = wire.decode_submit_request(request)
                except ValueError:
                    pass
                else:
                    job = req.job
                    attrs.update(command_id=req.command_id[:64], claimed=req.issuer.identity[:128])
            self.backend.refuse_call(
                f"gRPC {name} from {who} refused: {why}", job=job, key=f"grpc-auth {name}", **attrs
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{why}. The operator's token is in the control plane's discovery file "
                "($TORCHLOOM_HOME/weaver.json, mode 0600); pass another with TORCHLOOM_TOKEN or --token-file",
            )

        return refuse


def _authenticated(req: SubmitRequest, caller: tokens.TokenEntry) -> SubmitRequest:
    """`req` issued by the caller's authenticated identity (an agent's always with kind "agent"); a
    different claimed identity is kept as `claimed_identity`, for the journal only."""
    identity = caller.identity
    claimed = req.issuer.identity if req.issuer.identity != identity else ""
    if claimed:
        log.info("submit %s: claimed issuer %r, authenticated as %r", req.command_id, claimed, identity)
    kind = AGENT_KIND if caller.role is tokens.TokenRole.AGENT else req.issuer.kind
    return dataclasses.replace(
        req, issuer=Issuer(kind=kind, identity=identity, claimed_identity=claimed[:_MAX_CLAIM_CHARS])
    )


async def _answer(context: grpc.aio.ServicerContext[Any, _T], call: Callable[[], _T]) -> _T:
    """The answer of a synchronous backend call, its errors as gRPC status codes."""
    try:
        return call()
    except (JobNotFound, KeyError) as exc:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else str(exc))
    except NatsUnavailable as exc:  # a standby weaver, naming the active one
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    raise AssertionError("context.abort returns only by raising")


def _handlers(weaver: ControlBackend) -> grpc.GenericRpcHandler[object, object]:
    async def malformed(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: ValueError) -> None:
        """Refuse a request that does not parse as its message (INVALID_ARGUMENT, journaled as a
        rate-limited "refused" event), instead of gRPC's UNKNOWN and a traceback in the log."""
        caller = _CALLER.get()
        why = f"malformed {method} request: {exc}"
        weaver.refuse_call(
            f"gRPC {method} from {caller.identity} refused: {why}",
            key=f"grpc-malformed {method}",
            who=caller.identity,
            method=method,
            why=why,
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)

    def unary(method: str, decode: Callable[[bytes], Any], handler: Callable[..., Any]) -> Any:
        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                req = decode(request)
            except ValueError as exc:
                await malformed(context, method, exc)
            return await handler(req, context)

        return grpc.unary_unary_rpc_method_handler(call, response_serializer=wire.encode)

    def streaming(method: str, decode: Callable[[bytes], Any], handler: Callable[..., Any]) -> Any:
        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                req = decode(request)
            except ValueError as exc:
                await malformed(context, method, exc)
            async for ev in handler(req, context):
                yield ev

        return grpc.unary_stream_rpc_method_handler(call, response_serializer=wire.encode_watch_event)

    async def submit(
        req: SubmitRequest, context: grpc.aio.ServicerContext[SubmitRequest, Outcome]
    ) -> Outcome:
        caller = _CALLER.get()
        try:
            if caller.role is tokens.TokenRole.AGENT:
                return await weaver.submit_agent(_authenticated(req, caller))
            return await weaver.submit(_authenticated(req, caller))
        except NatsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def status(
        req: StatusRequest, context: grpc.aio.ServicerContext[StatusRequest, StatusReply]
    ) -> StatusReply:
        try:
            return weaver.status(req.job)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except NatsUnavailable as exc:  # a standby weaver, naming the active one
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def watch(
        req: WatchRequest, context: grpc.aio.ServicerContext[WatchRequest, WatchEvent]
    ) -> AsyncIterator[WatchEvent]:
        try:
            async for ev in weaver.iter_watch(req.job):
                yield ev
        except NatsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def journal(
        req: JournalRequest, context: grpc.aio.ServicerContext[JournalRequest, WatchEvent]
    ) -> AsyncIterator[WatchEvent]:
        try:
            async for ev in weaver.journal(
                req.job, follow=req.follow, run_id=req.run_id, command_id=req.command_id
            ):
                yield ev
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NatsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def not_for_agents(context: grpc.aio.ServicerContext[Any, Any], method: str, job: str) -> None:
        """Refuse (PERMISSION_DENIED, journaled) a call an agent's token may not make: an agent that
        could set the policy or answer proposals would lift its own guardrails and approve itself."""
        caller = _CALLER.get()
        if caller.role is not tokens.TokenRole.AGENT:
            return
        why = f"{method} is for people and launchers, not agents: the policy is what guards an agent"
        weaver.refuse_call(
            f"gRPC {method} from {caller.identity} refused: {why}",
            job=job,
            key=f"grpc-role {method}",
            who=caller.identity,
            method=method,
            why=why,
        )
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{why} ({caller.identity} is an agent token)")

    async def set_policy(
        req: PolicyRequest, context: grpc.aio.ServicerContext[PolicyRequest, PolicyReply]
    ) -> PolicyReply:
        await not_for_agents(context, "SetPolicy", req.job)
        return await _answer(context, lambda: weaver.set_policy(req))

    async def get_policy(
        req: PolicyRequest, context: grpc.aio.ServicerContext[PolicyRequest, PolicyReply]
    ) -> PolicyReply:
        return await _answer(context, lambda: weaver.get_policy(req))

    async def decide_proposal(
        req: ProposalDecision, context: grpc.aio.ServicerContext[ProposalDecision, JobEvent]
    ) -> JobEvent:
        await not_for_agents(context, "DecideProposal", req.job)
        caller = _CALLER.get()
        return await _answer(context, lambda: weaver.decide_proposal(req, decided_by=caller.identity))

    async def report_agent_refusal(
        req: AgentRefusal, context: grpc.aio.ServicerContext[AgentRefusal, JobEvent]
    ) -> JobEvent:
        caller = _CALLER.get()
        if caller.role is not tokens.TokenRole.AGENT:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"ReportAgentRefusal is for agent tokens; {caller.identity} is a {caller.role.value} "
                "(add one with `torchloom token add-agent NAME`)",
            )
        return await _answer(context, lambda: weaver.report_agent_refusal(caller.identity, req))

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Submit": unary("Submit", wire.decode_submit_request, submit),
            "Status": unary("Status", wire.decode_status_request, status),
            "Watch": streaming("Watch", wire.decode_watch_request, watch),
            "Journal": streaming("Journal", wire.decode_journal_request, journal),
            "SetPolicy": unary("SetPolicy", wire.decode_policy_request, set_policy),
            "GetPolicy": unary("GetPolicy", wire.decode_policy_request, get_policy),
            "DecideProposal": unary("DecideProposal", wire.decode_proposal_decision, decide_proposal),
            "ReportAgentRefusal": unary(
                "ReportAgentRefusal", wire.decode_agent_refusal, report_agent_refusal
            ),
        },
    )


def _token_file(table: tokens.TokenTable, path: Path | None) -> tokens.TokenFile:
    # A parameter of ControlServer is named `tokens`, which hides the module there.
    return tokens.TokenFile(table, path)


class ControlServer:
    """The gRPC Control service over `backend`, bound to `address` (`host:port`; port 0 picks one).

    Use as `async with ControlServer(weaver, config.grpc_addr, tokens=table) as server:` over a
    started weaver; `close()` is idempotent.

    Args:
        backend: the weaver.
        address: `host:port` to bind.
        tokens: the bearer tokens it accepts and the identity of each.
        tokens_file: the file `tokens` came from: read again whenever it changes (agents added or
            removed while serving); None: `tokens` is fixed.
        tls: certificate and key; required off loopback (plaintext is refused there).

    Raises:
        ValueError: a non-loopback `address` without `tls`.
    """

    def __init__(
        self,
        backend: ControlBackend,
        address: str,
        *,
        tokens: tokens.TokenTable,
        tokens_file: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        host = address.rpartition(":")[0]
        if tls is None and not is_loopback(host):
            raise ValueError(
                f"gRPC address {address!r} rejected: off loopback the Control service needs TLS "
                "(--grpc-tls-cert FILE --grpc-tls-key FILE); bind 127.0.0.1:PORT for local use"
            )
        self.backend = backend
        self.requested_address = address
        self._tokens = _token_file(tokens, tokens_file)
        self.tls = tls
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def tokens(self) -> tokens.TokenTable:
        """The bearer tokens accepted now."""
        return self._tokens.table

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
        server = grpc.aio.server(interceptors=(Authenticator(self._tokens, self.backend),))
        server.add_generic_rpc_handlers((_handlers(self.backend),))
        try:
            if self.tls is None:
                port = server.add_insecure_port(self.requested_address)
            else:
                port = server.add_secure_port(self.requested_address, self.tls.server_credentials())
        except RuntimeError:  # grpc raises this (older versions returned 0) when binding fails
            port = 0
        if port == 0:
            raise OSError(
                errno.EADDRINUSE,
                f"cannot bind the gRPC Control service to {self.requested_address}: is the port in use?",
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
