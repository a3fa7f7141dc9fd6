"""The weaver's I/O shell: NATS connections and subscriptions, command publishing and watchers. Its
components handle the rest: `weaver.submit_path` (submits decided once, their waiting submitters, the
runs' seq floors), `weaver.ack_intake` (acks in, every decision delivered), `weaver.telemetry`
(heartbeats, metrics, launchers' events), `weaver.bus_api` (the request-reply API),
`weaver.health_loop` (the liveness tick) and `weaver.watchers` (the live feed's subscribers).

Every decision is delegated to the pure functions and mutators of `weaver.liveness`, `weaver.submits`,
`weaver.outcomes`, `weaver.health_plan` and `weaver.recovery`; this module only feeds them messages
and carries out what they return. JetStream reads and writes go through `weaver.streams`. Callbacks
never block: slow work (JetStream publishes, request handling) runs in tasks owned by the weaver's
TaskGroup. The gRPC Control service is not started here: the composition (`weaver.app`) serves it
over a started `Weaver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from torchloom import bus, signing, subjects, wire
from torchloom.bus import JournalStream
from torchloom.messages import (
    AgentRefusal,
    Command,
    JobEvent,
    Outcome,
    PolicyReply,
    PolicyRequest,
    ProposalDecision,
    RestartRequest,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
)
from weaver import (
    admission,
    dedupe,
    knob_schemas,
    liveness,
    recovery,
    ui_feeds,
)
from weaver.ack_intake import AckIntake
from weaver.agents import AgentGate
from weaver.bus_api import DECIDE_FAILED, BusApi
from weaver.config import WeaverConfig
from weaver.health_loop import HealthLoop
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.steering import FIRED_KINDS, Steering
from weaver.streams import Outbox, OutboxItem, RankConsumers, Streams
from weaver.submit_path import SubmitPath
from weaver.telemetry import Telemetry
from weaver.watchers import Watcher

log = logging.getLogger(__name__)

QUEUE_GROUP = "torchloom-weaver"
# Heartbeats and metrics (15 messages per rank per second) come on a connection of their own, so a
# backlog of them never delays a JetStream answer (a stored command, a pub ack) or an API request,
# and a slow-consumer cut of it loses telemetry only. Its queues are bounded: past these, nats-py
# drops the newest message (the weaver is seconds behind; the read clock holds verdicts back).
TELEMETRY_PENDING_MSGS = 200_000
TELEMETRY_PENDING_BYTES = 256 * 1024 * 1024

__all__ = ["DECIDE_FAILED", "QUEUE_GROUP", "Watcher", "Weaver"]


class Weaver:
    """The central service. Use as `async with Weaver(config) as w:`.

    Entering connects to NATS, ensures the JetStream streams, recovers its state from them and
    subscribes to heartbeats, acks, metrics and the request-reply API. Its components: `state` (the
    `WeaverState` the decision modules read and update), the JetStream `Streams` (once started), the
    `Outbox` of journal entries and events, `submit_path` (submits and their waiting submitters),
    `intake` (the acks feed and the delivery of every decision), `telemetry` (the heartbeat, metrics
    and event handlers), `health` (the liveness tick), `steering` (autopilot), `agents` and, once
    started, a `BusApi`. The gRPC Control service is served over it by the composition
    (`weaver.app.open_weaver`), through the methods `submit`, `status`, `iter_watch` and `journal`.
    """

    def __init__(self, config: WeaverConfig) -> None:
        self.config = config
        self.state = WeaverState()
        self._nc: Client | None = None
        self._telemetry_nc: Client | None = None  # heartbeats and metrics (TELEMETRY_PENDING_MSGS)
        self._heartbeats: Any = None  # their subscription (its backlog feeds the read clock)
        self._read_clock = liveness.ReadClock()
        self._streams: Streams | None = None
        self._journal: bus.JournalStream | None = None  # where journal entries are published
        self._schemas: knob_schemas.KnobSchemas | None = None  # once connected
        self._consumers: RankConsumers | None = None  # each rank's command consumer (made here)
        self._outbox = Outbox()
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._watchers: set[Watcher] = set()
        self._signer: signing.Signer | None = None
        self._verifier: signing.Verifier | None = None
        self._limits = config.limits()
        self.refusals = admission.Refusals()
        self.metrics = WeaverMetrics(
            self.status, self.refusals.total, lambda: {n: len(j.pending) for n, j in self.state.jobs.items()}
        )
        # Submits decided once, their submitters waiting for the outcome, the runs' seq floors.
        self.submit_path = SubmitPath(
            self.state,
            config,
            self.metrics,
            signer=lambda: self._signer,
            streams=lambda: self.streams,
            consumers=lambda: self._consumers,
            signed=self._signed,
            finish=lambda outcome: self.intake.finish(outcome),
        )
        # Acks in, decisions out: each decision to its submitter, watchers, the journal and events.
        self.intake = AckIntake(
            self.state,
            config,
            self.metrics,
            self._outbox,
            streams=lambda: self.streams,
            answer=self.submit_path.answer,
            warming_up=self.submit_path.warming_up,
            foreign=self._foreign,
            refuse=self._refuse,
            fan_out=self._fan_out,
            announce=self._announce,
            spawn=self._spawn,
        )
        # Autopilot rules: their commands go through `submit` like any other (issuer kind "rule").
        self.steering = Steering(
            self.state, config.autopilot(), announce=self._announce, submit=self.submit, spawn=self._spawn
        )
        # Agents' submits pass their job policy's guardrails first (issuer kind "agent").
        self.agents = AgentGate(
            self.state,
            self.steering.pilots,
            announce=self._announce,
            submit=self.submit,
            refuse=lambda req, why, now, job: self.submit_path.refuse(
                req, why, now, job=job.job, run_id=job.run_id
            ),
            dead_after_s=config.dead_after_s,
        )
        # The liveness tick: health checks, dead jobs forgotten, the health policy carried out.
        self.health = HealthLoop(
            self.state,
            config,
            self._limits,
            self.metrics,
            self._read_clock,
            backlog=self._backlog,
            submit=self.submit,
            announce=self._announce,
            spawn=self._spawn,
            restart=self._send_restart,
            closing=lambda: self._closing is not None,
        )
        # Heartbeats, step metrics and launchers' events (the API is served by a `BusApi` once started).
        self.telemetry = Telemetry(
            self.state,
            config,
            self._limits,
            self.metrics,
            self.steering,
            self._read_clock,
            backlog=self._backlog,
            schemas=lambda: self._schemas,
            consumers=lambda: self._consumers,
            running=lambda: self._tg is not None,
            watched=lambda: bool(self._watchers),
            foreign=self._foreign,
            refuse=self._refuse,
            finish=self.intake.finish,
            announce=self._announce,
            fan_out=self._fan_out,
            spawn=self._spawn,
            load_seq_floor=self.submit_path.load_seq_floor,
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def nats(self) -> Client:
        assert self._nc is not None, "the weaver is not started"
        return self._nc

    @property
    def streams(self) -> Streams:
        assert self._streams is not None, "the weaver is not started"
        return self._streams

    @property
    def public_key(self) -> str:
        """The public key of the key this weaver signs commands with (64 hex characters)."""
        assert self._signer is not None, "the weaver is not started"
        return self._signer.public_key

    async def start(self) -> None:
        """Load (or create) the signing key, connect, recover and subscribe; undone by `close()` even
        when it fails halfway.

        Raises:
            signing.SignatureError: the signing key file is malformed or readable by others.
        """
        try:
            key_file = self.config.signing_key_file
            self._signer = await asyncio.to_thread(
                signing.load_or_create, Path(key_file) if key_file else None
            )
            self._verifier = self._signer.verifier()
            self._nc = await bus.connect(
                self.config.nats_url,
                name="torchloom-weaver",
                connect_timeout_s=self.config.nats_timeout_s,
                credentials=self.config.nats_credentials,
                on_error=self._on_nats_error,
                on_reconnected=self._on_reconnected,
            )
            js = self._nc.jetstream(timeout=self.config.nats_timeout_s)
            self._streams = Streams(js, self.config.nats_timeout_s)
            self._schemas = knob_schemas.KnobSchemas(js, replicas=self.config.replicas)
            self._consumers = RankConsumers(js, self.config.nats_timeout_s)
            api = BusApi(
                ui_feeds.UiFeeds(js, self.config.nats_timeout_s),
                identity=self.config.api_submit_identity,
                submit=self.submit,
                status=self.status,
                decide=self.decide_proposal,
                refuse=self._refuse,
                spawn=self._spawn,
            )
            # Commands live in one stream per job (a threadlet's credential names its own); an older
            # store's shared stream would overlap them. Asked again after a dropped request, as a
            # cluster drops them for a moment after a server rejoins.
            journal = await bus.retry_dropped(
                self._nc, self._ensure_streams, total_s=self.config.nats_timeout_s
            )
            self._journal = self.telemetry.journal = journal
            # Before the subscriptions: acks of commands from before a restart must find them pending.
            await self._recover()
            nc = self._nc
            self._telemetry_nc = await bus.connect(
                self.config.nats_url,
                name="torchloom-weaver-telemetry",
                connect_timeout_s=self.config.nats_timeout_s,
                credentials=self.config.nats_credentials,
                on_error=self._on_nats_error,
                on_disconnected=self.health.on_telemetry_lost,
                on_reconnected=self.health.on_telemetry_back,
            )
            self.submit_path.started_at_s = time.time()
            self._heartbeats = await self._subscribe_telemetry(
                subjects.heartbeats_all(), self.telemetry.on_heartbeat
            )
            await self._subscribe_telemetry(subjects.metrics_all(), self.telemetry.on_metrics)
            # Acks come through the durable consumer: those a previous weaver did not journal yet too.
            await bus.retry_dropped(self._nc, self.intake.feed.start, total_s=self.config.nats_timeout_s)
            # Launchers announce a stopping run here (only the weaver and launcher roles know the token).
            await nc.subscribe(journal.subject(subjects.events_all()), cb=self.telemetry.on_event)
            # Refusals of unverified commands (and acks of ranks without an ack token) are stored nowhere.
            await nc.subscribe(subjects.acks_all(), cb=self.intake.feed.on_live)
            await nc.subscribe(subjects.api_submit(), queue=QUEUE_GROUP, cb=api.on_submit)
            await nc.subscribe(subjects.api_status(), queue=QUEUE_GROUP, cb=api.on_status)
            await nc.subscribe(subjects.api_decide(), queue=QUEUE_GROUP, cb=api.on_decide)
            await nc.subscribe(subjects.api_feeds_all(), queue=QUEUE_GROUP, cb=api.on_feed)
            async with asyncio.timeout(self.config.nats_timeout_s):
                await nc.flush()
                await self._telemetry_nc.flush()
            self._runner = asyncio.create_task(self._run(), name="torchloom-weaver")
            await self._started.wait()
        except BaseException:
            await self.close()
            raise
        log.info("weaver up: nats %s", self.config.nats_url)

    async def _ensure_streams(self, js: JetStreamContext) -> JournalStream:
        await bus.remove_shared_commands(js)
        return await bus.ensure_streams(js, replicas=self.config.replicas, shared_commands=False)

    async def _on_reconnected(self) -> None:
        if self._consumers is not None:
            self._consumers.forget()

    async def _subscribe_telemetry(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> Any:
        assert self._telemetry_nc is not None
        return await self._telemetry_nc.subscribe(
            subject,
            cb=cb,
            pending_msgs_limit=TELEMETRY_PENDING_MSGS,
            pending_bytes_limit=TELEMETRY_PENDING_BYTES,
        )

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.health.run(), name="weaver-liveness")
                tg.create_task(self._outbox.run(self._publish), name="weaver-publisher")
                self._started.set()
        finally:
            self._tg = None
            self._started.set()
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once the weaver has stopped (after `close()`, or when a loop failed)."""
        await self._closed.wait()
        if self._runner is not None and self._runner.done() and not self._runner.cancelled():
            self._runner.result()  # re-raise the failure of a loop

    async def close(self) -> None:
        """Stop serving, cancel every task and drain NATS. Idempotent and safe to call concurrently."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await self.intake.feed.stop()
        for watcher in list(self._watchers):
            watcher.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self.submit_path.close()
        if self._telemetry_nc is not None and not self._telemetry_nc.is_closed:
            with contextlib.suppress(Exception):  # telemetry is not drained: nothing of it is kept
                await self._telemetry_nc.close()
        if self._nc is not None and not self._nc.is_closed:
            try:
                async with asyncio.timeout(self.config.nats_timeout_s):
                    await self._nc.drain()
            except Exception as exc:  # closing anyway; a dead server must not hang shutdown
                log.debug("nats drain failed: %s", exc)
                await self._nc.close()
        self._closed.set()

    # ---- carrying out ----------------------------------------------------------------------------

    def _backlog(self) -> int:
        """Heartbeats received but not read yet (the read clock's input)."""
        sub = self._heartbeats
        return sub.pending_msgs if sub is not None else 0

    async def _send_restart(self, job: str, request: RestartRequest) -> None:
        """Ask the job's launcher for a restart the health policy decided."""
        assert self._signer is not None, "the weaver is not started"
        data = wire.encode(request)
        # Signed: a launcher carries out only the weaver's restarts (signing.SIGNATURE_HEADER).
        signature = {signing.SIGNATURE_HEADER: self._signer.sign_restart(data)}
        await self.nats.publish(subjects.launcher(job), data, headers=signature)

    async def _publish(self, item: OutboxItem) -> None:
        """Publish one outbox message: to JetStream (stored once per msg id) when journaling, else to
        core NATS."""
        if self.config.journal and self._streams is not None:
            async with asyncio.timeout(self.config.nats_timeout_s):
                await self._streams.js.publish(
                    self._journal.subject(item.subject) if self._journal else item.subject,
                    item.payload,
                    headers={"Nats-Msg-Id": item.msg_id},
                )
        else:
            await self.nats.publish(item.subject, item.payload)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` in the TaskGroup; its failure is logged, never allowed to stop the weaver."""
        if self._tg is None:
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("weaver task %s failed", name)

        self._tg.create_task(guarded(), name=name)

    def _fan_out(self, ev: WatchEvent) -> None:
        for watcher in self._watchers:
            watcher.push(ev)

    def _announce(self, ev: JobEvent) -> None:
        if ev.kind in FIRED_KINDS:
            self.metrics.rule_fired(ev.job, ev.attrs.get("rule", ""))
        self._fan_out(ev)
        # An event about no job (a refused submit naming none) goes to the weaver's own subject.
        self._outbox.put(subjects.events(ev.job or admission.WEAVER_JOB), wire.encode(ev))

    def _refuse(
        self, kind: str, job: str, run_id: str, message: str, now: float, *, key: str = "", **attrs: str
    ) -> None:
        """Count a refused message and announce it, rate-limited (`admission.Refusals`)."""
        known = job in self.state.jobs
        ev = self.refusals.note(
            kind,
            job if known else admission.WEAVER_JOB,
            run_id if known else "",
            message,
            now,
            key=key,
            **attrs,
        )
        if ev is not None:
            log.warning("%s", ev.message)
            self._announce(ev)

    def refuse_call(self, message: str, *, job: str = "", key: str = "", **attrs: str) -> None:
        """Journal a request refused before it reached the weaver (the gRPC service's authentication),
        as a "refused" event, rate-limited like every refusal (`admission.Refusals`)."""
        known = self.state.jobs.get(job)
        self._refuse("call", job, known.run_id if known else "", message, time.time(), key=key, **attrs)

    async def _on_nats_error(self, exc: Exception) -> None:
        """The server's asynchronous errors: a refused publish or subscribe becomes a refusal event."""
        if "permissions violation" in str(exc).lower():
            self._refuse("permission", "", "", f"NATS refused the weaver: {exc}", time.time(), key="nats")

    def _foreign(self, kind: str, pattern: str, msg: Msg) -> bool:
        """True (and counted) when `msg` is not of the subjects `pattern` names: a JetStream
        delivery someone aimed at our subscription keeps its stored subject."""
        if subjects.matches(pattern, msg.subject):
            return False
        self._refuse(
            kind,
            "",
            "",
            f"{kind} subscription got a message of {msg.subject}: dropped",
            time.time(),
            key="foreign",
        )
        return True

    def _signed(self, cmd: Command) -> bool:
        return self._verifier is not None and self._verifier.verify(cmd)

    # ---- the API --------------------------------------------------------------------------------

    async def submit(self, req: SubmitRequest) -> Outcome:
        """Decide a command once and wait for every rank (`weaver.submit_path.SubmitPath.submit`).

        Returns:
            APPLIED, REJECTED (also at once, when the weaver refuses it) or TIMEOUT.

        Raises:
            NatsUnavailable: the command could not be made durable in JetStream (send it again with
                the same command id), or the weaver is still recovering.
        """
        return await self.submit_path.submit(req)

    def status(self, job: str = "") -> StatusReply:
        """A snapshot of one job, or of every job for an empty name. Liveness (alive, health, the
        heartbeat ages) is judged at the time up to which the weaver has read its heartbeats
        (`liveness.ReadClock`), as the health events are: its own lag is not blamed on ranks.

        Raises:
            JobNotFound: the weaver has not heard of that job.
        """
        return liveness.status(self.state, job, self.health.read_time(time.time()), self.config.policy())

    def set_policy(self, req: PolicyRequest) -> PolicyReply:
        """Run a job under an autopilot policy (`weaver.steering.Steering.set_policy_request`)."""
        return self.steering.set_policy_request(req, time.time(), self.config.dead_after_s)

    def get_policy(self, req: PolicyRequest) -> PolicyReply:
        return self.steering.get_policy_request(req, time.time(), self.config.dead_after_s)

    def decide_proposal(self, req: ProposalDecision, decided_by: str = "") -> JobEvent:
        """Approve or refuse an autopilot proposal (raises `KeyError` for an unknown one); the
        decision's journal event names `decided_by`, the caller's authenticated identity."""
        return self.steering.decide_request(req, time.time(), self.config.dead_after_s, decided_by=decided_by)

    async def submit_agent(self, req: SubmitRequest) -> Outcome:
        """An agent's submit: its job policy's guardrails, then `submit` (`weaver.agents.AgentGate`)."""
        return await self.agents.submit(req, time.time())

    def report_agent_refusal(self, identity: str, report: AgentRefusal) -> JobEvent:
        """Journal a model reply an agent refused (raises `ValueError`, `JobNotFound`)."""
        return self.agents.report_refusal(identity, report, time.time())

    def status_request(self, req: StatusRequest) -> StatusReply:
        return self.status(req.job)

    def watch(self, job: str = "") -> Watcher:
        """Subscribe to metrics, job events and final outcomes (of one job, or of all for "")."""
        watcher = Watcher(job, self.config.watch_queue_size)
        if self._closing is not None:
            watcher.close()
        else:
            self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        watcher.close()
        self._watchers.discard(watcher)

    async def iter_watch(self, job: str = "") -> AsyncIterator[WatchEvent]:
        """`watch()` as an async generator that unsubscribes when the consumer stops."""
        watcher = self.watch(job)
        try:
            async for ev in watcher:
                yield ev
        finally:
            self.unwatch(watcher)

    # ---- the journal ----------------------------------------------------------------------------

    async def journal(
        self, job: str = "", *, follow: bool = False, run_id: str = "", command_id: str = ""
    ) -> AsyncIterator[Outcome | JobEvent]:
        """The durable journal of one job (or of all for ""), oldest first; see `Streams.journal`.

        Args:
            run_id: only that run's entries.
            command_id: only that command's decision; ends after it (with `follow`, waits for it).
        """
        if command_id:
            done = self.state.decided.get(command_id)
            if done is not None and (not job or done.job == job):
                yield done
                return
        async for entry in self.streams.journal(job, follow=follow):
            if dedupe.journal_match(entry, run_id=run_id, command_id=command_id):
                yield entry
                if command_id:
                    return

    async def _recover(self) -> None:
        """Rebuild jobs, registries, seq floors and in-flight commands from the streams."""
        if not self.config.journal:
            return
        entries = [e async for e in self.streams.journal()]
        recovery.replay_journal(self.state, entries)
        self.steering.recover(entries)  # each job's journaled autopilot policy
        for job in list(self.state.jobs.values()):
            # Only what this weaver's key signed: every rank refused the rest.
            commands = [
                (c, s) for c, s in await self.streams.commands(job.job, job.run_id) if self._signed(c)
            ]
            recovery.replay_commands(self.state, job.job, job.run_id, commands)
            if job.pending:
                await self.intake.decide_recovered(job.job, job.run_id)
            log.info(
                "recovered job %s run %s: seq %d, %d checkpoint(s), %d in flight",
                job.job,
                job.run_id,
                job.last_seq,
                len(job.registry.checkpoints),
                len(job.pending),
            )
