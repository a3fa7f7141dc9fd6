"""The weaver's I/O shell: NATS connections and subscriptions, the submit path, acks, command
publishing and watchers. Its components handle the rest: `weaver.telemetry` (heartbeats, metrics,
launchers' events), `weaver.bus_api` (the request-reply API), `weaver.health_loop` (the liveness
tick) and `weaver.watchers` (the live feed's subscribers).

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
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.aio.client import Client
from nats.aio.msg import Msg

from torchloom import bus, signing, subjects, wire
from torchloom.errors import CommandRejected, JobNotFound, NatsUnavailable
from torchloom.messages import (
    Ack,
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
    notices,
    outcomes,
    recovery,
    submits,
    ui_feeds,
)
from weaver.acks import RETRY, AckFeed, CommandKey, Retry
from weaver.agents import AgentGate
from weaver.bus_api import DECIDE_FAILED, BusApi
from weaver.config import WeaverConfig
from weaver.health_loop import HealthLoop
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.steering import FIRED_KINDS, Steering
from weaver.streams import Outbox, OutboxItem, RankConsumers, SeqConflict, Streams
from weaver.telemetry import Telemetry
from weaver.watchers import Watcher

log = logging.getLogger(__name__)

QUEUE_GROUP = "torchloom-weaver"
# Acks are read from this long before a recovered command's publish time: the acks stream's clock is
# the server's, the command's that of the weaver that published it.
STORED_ACKS_SLACK_S = 60.0
WARM_UP_MIN_S = 5.0  # after a (re)start, a submit the ranks' reports could decide waits at least this
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
    `Outbox` of journal entries and events, `telemetry` (the heartbeat, metrics and event handlers),
    `health` (the liveness tick), `steering` (autopilot), `agents` and, once started, a `BusApi`.
    The gRPC Control service is served over it by the composition (`weaver.app.open_weaver`),
    through the methods `submit`, `status`, `iter_watch` and `journal`.
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
        self._acks = AckFeed(config.acks_consumer, self._take_ack, take_over=config.acks_take_over)
        self._started_at_s = time.time()
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._submit_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._watchers: set[Watcher] = set()
        self._signer: signing.Signer | None = None
        self._verifier: signing.Verifier | None = None
        self._limits = config.limits()
        self.refusals = admission.Refusals()
        self._notices = notices.Notices()
        self._job_streams: dict[str, bus.JobCommands] = {}  # command streams this weaver ensured
        self.metrics = WeaverMetrics(
            self.status, self.refusals.total, lambda: {n: len(j.pending) for n, j in self.state.jobs.items()}
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
            refuse=lambda req, why, now, job: self._refuse_submit(
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
            finish=self._finish,
            announce=self._announce,
            fan_out=self._fan_out,
            spawn=self._spawn,
            load_seq_floor=self._load_seq_floor,
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
            async with asyncio.timeout(self.config.nats_timeout_s):
                # Commands live in one stream per job (a threadlet's credential names its own); an
                # older store's shared stream would overlap them.
                await bus.remove_shared_commands(js)
                journal = await bus.ensure_streams(js, replicas=self.config.replicas, shared_commands=False)
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
            self._started_at_s = time.time()
            self._heartbeats = await self._subscribe_telemetry(
                subjects.heartbeats_all(), self.telemetry.on_heartbeat
            )
            await self._subscribe_telemetry(subjects.metrics_all(), self.telemetry.on_metrics)
            # Acks come through the durable consumer: those a previous weaver did not journal yet too.
            async with asyncio.timeout(self.config.nats_timeout_s):
                await self._acks.start(js)
            # Launchers announce a stopping run here (only the weaver and launcher roles know the token).
            await nc.subscribe(journal.subject(subjects.events_all()), cb=self.telemetry.on_event)
            # Refusals of unverified commands (and acks of ranks without an ack token) are stored nowhere.
            await nc.subscribe(subjects.acks_all(), cb=self._acks.on_live)
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
        await self._acks.stop()
        for watcher in list(self._watchers):
            watcher.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
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

    def _finish(self, outcome: Outcome) -> None:
        """Deliver a decision: to its waiting submitters, watchers, the journal and the events.

        The journal entry carries a msg id per seq (per command id for a refusal), so a decision
        published again (a retry, or a restarted weaver completing the same command) is stored once;
        the acks it was made of are acknowledged to JetStream only once it is stored.
        """
        dedupe.remember(self.state, outcome)
        self.metrics.observe_outcome(outcome)
        fut = self._waiters.pop(outcome.command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
        self._fan_out(outcome)
        cmd = outcome.command
        key: CommandKey | None = (cmd.job, cmd.run_id, cmd.seq) if cmd is not None else None

        async def release() -> None:
            if key is not None:
                await self._acks.release(key)

        if self.config.journal:
            if key is not None:
                self._acks.hold(key)
            subject = subjects.journal(outcome.job or admission.WEAVER_JOB)
            msg_id = dedupe.journal_msg_id(outcome)
            self._outbox.put(subject, wire.encode(outcome), msg_id=msg_id, keep=True, then=release)
        else:
            self._spawn(release(), name="weaver-release-acks")
        self._announce(outcomes.outcome_event(outcome, time.time()))
        searched = outcomes.search_event(outcome, time.time())
        if searched is not None:
            self._announce(searched)

    # ---- acks -----------------------------------------------------------------------------------

    def _take_ack(self, msg: Msg) -> CommandKey | Retry | None:
        """Fold one ack from the durable feed in. Returns the key of its command while that command's
        outcome is not journaled yet (the feed holds the message until then), RETRY while its rank
        has not reported since the weaver started, else None (acknowledged: of no more use)."""
        now = time.time()
        if self._foreign("ack", subjects.acks_all(), msg):
            return None
        try:
            ack = wire.decode_ack(msg.data)
        except ValueError as exc:
            self._refuse("ack", "", "", f"malformed ack on {msg.subject} refused: {exc}", now)
            return None
        job = self.state.jobs.get(ack.job)
        if job is not None and ack.rank not in job.ranks and self._warming_up(now):
            return RETRY  # an ack a previous weaver left: judge it once its rank has reported
        reason = admission.check_ack(self.state, ack, msg.subject)
        if reason is not None:
            self._refuse("ack", ack.job, ack.run_id, f"ack on {msg.subject} refused: {reason}", now)
            return None
        if ack.unverified:
            # A rank refused a message on its command subject that the weaver did not sign.
            self._refuse(
                "command",
                ack.job,
                ack.run_id,
                f"unsigned command refused on rank {ack.rank}: {ack.reason}",
                now,
                key=f"unsigned {ack.job} {ack.rank}",
                rank=str(ack.rank),
                seq=str(ack.seq),
                command_id=ack.command_id[:64],
            )
            return None
        if notices.is_notice(ack):  # a follow-up about a decided command, never an answer to it
            self._journal_notice(ack, now)
            return None
        key = (ack.job, ack.run_id, ack.seq)
        outcome = outcomes.record_ack(self.state, ack, now)
        if outcome is not None:
            self._finish(outcome)
            return key
        if self._acks.journaling(key):
            # Delivered again while the outcome's journal write is retried: acknowledged now, it
            # would be lost to the next weaver if this one died before the write landed.
            return key
        return key if job is not None and job.run_id == ack.run_id and ack.seq in job.pending else None

    def _journal_notice(self, ack: Ack, now: float) -> None:
        """Journal a rank's notice about a command as an event of its kind, rate-limited
        (`weaver.notices`); a redelivered one is stored once (its own Nats-Msg-Id)."""
        reason = notices.check_notice(ack)
        if reason is not None:
            self._refuse("ack", ack.job, ack.run_id, f"notice of rank {ack.rank} refused: {reason}", now)
            return
        ev = self._notices.note(ack, now)
        if ev is not None:
            log.warning("%s: %s", ev.kind, ev.message)
            self._fan_out(ev)
            self._outbox.put(subjects.events(ev.job), wire.encode(ev), msg_id=notices.msg_id(ack))

    # ---- the API --------------------------------------------------------------------------------

    async def _load_seq_floor(self, job: str, run_id: str) -> None:
        """Read the run's commands the weaver has not seen, so seqs continue after a weaver restart.

        Eager, on a run's first heartbeat, and without the submit lock: a flood of new jobs must not
        queue a real submit behind their reads. A submit that needs the floor first reads it itself;
        reading the tail twice is harmless (`recovery.replay_commands` skips what it already holds).
        """
        current = self.state.jobs.get(job)
        if current is None or current.run_id != run_id or current.seq_known:
            return
        await self._load_seq_floor_locked(job, run_id)

    async def _ensure_job_stream(self, job: str) -> bus.JobCommands:
        """Create the job's command stream once (the control plane may have made it at registration)
        and learn its capture subject."""
        known = self._job_streams.get(job)
        if known is not None:
            return known
        try:
            async with asyncio.timeout(self.config.nats_timeout_s):
                stream = await bus.ensure_job_commands(self.streams.js, job, replicas=self.config.replicas)
                await bus.ensure_ack_capture(self.streams.js, stream)
        except Exception as exc:  # nats-py raises several types for "not now"
            raise NatsUnavailable(f"cannot create the command stream of job {job}: {exc!r}") from exc
        self._job_streams[job] = stream
        return stream

    async def _load_seq_floor_locked(self, job_name: str, run_id: str) -> None:
        # The tail, not just the last command: every stored command the weaver lost track of (its own
        # publish whose answer was lost, a standby weaver's) becomes pending again, so its acks count
        # and a repeat of its id finds it. Only what our key signed counts: a message published
        # straight onto the subject was refused by every rank.
        job = self.state.jobs.get(job_name)
        after = job.last_stream_seq if job is not None and job.run_id == run_id else 0
        tail = await self.streams.commands_after(job_name, run_id, after)
        recovery.replay_commands(self.state, job_name, run_id, [(c, s) for c, s in tail if self._signed(c)])
        if job is not None and job.run_id == run_id and tail:
            # The next publish expects the subject's true last message, signed or not.
            job.last_stream_seq = max(job.last_stream_seq, tail[-1][1])

    def _warming_up(self, now: float) -> bool:
        # Right after a (re)start the weaver knows jobs from the journal but not yet their ranks and
        # knobs; a submit then would be refused for want of facts a heartbeat brings a moment later.
        # Long enough for every rank's first heartbeat; a knob schema it has not got yet is waited
        # for at any age (`submits.not_ready`), since ranks resend it only now and then.
        return now - self._started_at_s < max(WARM_UP_MIN_S, 3 * self.config.dead_after_s)

    async def submit(self, req: SubmitRequest) -> Outcome:
        """Decide a command once: validate, sequence, sign and publish it, then wait for every rank.

        A repeat of a command id (a client retrying after a lost answer or a weaver restart) is
        never sequenced again: it is answered with the decision, or waits for the command in flight.

        Returns:
            APPLIED or REJECTED once every rank answered; REJECTED at once when the weaver refuses it
            (nothing is published; the refusal is journaled with who asked and why); or TIMEOUT when
            the deadline passes first (the command stays in flight; its outcome is journaled later).

        Raises:
            NatsUnavailable: the command could not be made durable in JetStream (it may be stored:
                send it again with the same command id), or the weaver is still recovering.
        """
        submitted = time.time()
        self.metrics.observe_submit(req)
        if not req.command_id:
            req = dataclasses.replace(req, command_id=uuid.uuid4().hex)
        timeout_s = req.timeout_s if req.timeout_s > 0 else self.config.command_timeout_s
        known = dedupe.lookup(self.state, req.command_id)
        if known is None:
            async with self._submit_lock:
                known = dedupe.lookup(self.state, req.command_id)  # a concurrent repeat came first
                if known is None:
                    known = await self._sequence(req, submitted)
        if isinstance(known, Outcome):
            return known
        cmd = known
        # The ranks may have answered while the publish was being confirmed.
        done = self.state.decided.get(cmd.command_id)
        if done is not None:
            return done
        fut = self._waiters.get(cmd.command_id)
        if fut is None:
            fut = self._waiters[cmd.command_id] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            # Tracking goes on; the final outcome still reaches the journal and later repeats.
            timed_out = outcomes.timeout_outcome(self.state, cmd, timeout_s, time.time())
            self.metrics.observe_outcome(timed_out)
            return timed_out

    async def _sequence(self, req: SubmitRequest, now: float) -> Outcome | Command:
        """Under the submit lock: the refusal (journaled), or the stored command with its seq."""
        dead_after = self.config.dead_after_s
        try:
            job = liveness.resolve_job(self.state, req.job, now, dead_after)
        except JobNotFound as exc:
            recovering = any(not j.ranks for j in self.state.jobs.values())
            if not req.job and recovering and self._warming_up(now):
                raise NatsUnavailable(f"the weaver is starting up ({exc}); try again") from exc
            return self._refuse_submit(req, str(exc), now, job=req.job)
        waiting = submits.not_ready(job, req.body, warming_up=self._warming_up(now))
        if waiting is not None:
            raise NatsUnavailable(waiting)  # not a rejection: the client retries with the same id
        for _ in range(3):
            if not job.seq_known:
                await self._load_seq_floor_locked(job.job, job.run_id)
                found = dedupe.lookup(self.state, req.command_id)
                if found is not None:  # an earlier attempt of ours was stored after all
                    return found
            try:
                cmd = submits.plan_submit(self.state, req, now, dead_after, command_id=req.command_id)
            except (CommandRejected, JobNotFound) as exc:
                return self._refuse_submit(req, str(exc), now, job=job.job, run_id=job.run_id)
            assert self._signer is not None, "the weaver is not started"
            try:
                # Only a command that passed validation makes its job's stream: heartbeats of any
                # number of job names (the seq-floor read above reads, never creates) make none.
                stream = await self._ensure_job_stream(job.job)
                if self._consumers is not None:  # so each rank reads it as soon as it is stored
                    ranks = [(r, e.incarnation) for r, e in job.ranks.items()]
                    await self._consumers.ensure_run(job.job, job.run_id, ranks)
            except NatsUnavailable:
                submits.abandon(self.state, cmd)
                raise
            # Signed into it: where its ranks ack it (the acks stream stores only the job's token).
            cmd = dataclasses.replace(cmd, ack_token=stream.ack_token)
            held = job.pending.get(cmd.seq)
            if held is not None and held.command.command_id == cmd.command_id:
                held.command = cmd
            submits.mark_published(self.state, cmd, time.time())
            try:
                stream_seq, duplicate = await self.streams.store_command(
                    cmd, self._signer.encode_signed(cmd), job.last_stream_seq, stream=stream
                )
            except SeqConflict:
                submits.abandon(self.state, cmd)
                log.warning("seq %d of %s was taken by another writer: reloading", cmd.seq, job.job)
                continue
            except NatsUnavailable:
                submits.abandon(self.state, cmd)
                # The stream may have been made again (another token): learn it again next time.
                self._job_streams.pop(job.job, None)
                raise
            if duplicate:
                # This id was stored by an attempt whose answer was lost: read it back from the tail.
                submits.abandon(self.state, cmd)
                continue
            submits.mark_stored(self.state, cmd, stream_seq)
            return cmd
        raise NatsUnavailable(
            f"command for {job.job} was not stored: another weaver keeps publishing commands of run "
            f"{job.run_id}; run one weaver per NATS cluster"
        )

    def _refuse_submit(
        self, req: SubmitRequest, reason: str, now: float, *, job: str, run_id: str = ""
    ) -> Outcome:
        """Decide and journal a refused submit: nothing is published; a repeat gets the same answer."""
        try:
            subjects.check_token("job", job)
        except ValueError:
            job = ""  # journaled under the weaver's own name; `reason` says what was asked
        outcome = dedupe.refused_outcome(req, reason, now, job=job, run_id=run_id)
        self._finish(outcome)
        return outcome

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

    async def _decide_recovered(self, job: str, run_id: str) -> None:
        """Journal the outcomes of the run's recovered commands that the acks stream decides: a
        predecessor may have decided them and died before its journal write landed, or before every
        ack reached it, and the ranks will not answer again (their acks may be refused now: the
        processes that sent them may be gone). Those whose acks the stream may have dropped end as
        TIMEOUT, saying so."""
        pending = self.state.jobs[job].pending.values()
        since = min(p.published_at_s for p in pending) - STORED_ACKS_SLACK_S
        stored = await self.streams.stored_acks(job, since_s=since)
        now = time.time()
        decided = recovery.replay_acks(self.state, job, run_id, stored.acks, now)
        decided += recovery.unanswerable(
            self.state, job, run_id, stored.dropped_until_s, self.config.command_timeout_s, now
        )
        for outcome in decided:
            log.warning(
                "journaling the outcome of %s #%d, left undecided by a previous weaver",
                job,
                outcome.command.seq if outcome.command else 0,
            )
            self._finish(outcome)

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
                await self._decide_recovered(job.job, job.run_id)
            log.info(
                "recovered job %s run %s: seq %d, %d checkpoint(s), %d in flight",
                job.job,
                job.run_id,
                job.last_seq,
                len(job.registry.checkpoints),
                len(job.pending),
            )
