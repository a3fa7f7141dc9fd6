"""The weaver's I/O shell: NATS subscriptions, the request-reply API, command publishing and watchers.

Every decision is delegated to the pure functions and mutators of `weaver.liveness`, `weaver.submits`,
`weaver.outcomes`, `weaver.health_plan` and `weaver.recovery`; this module only feeds them messages
and carries out what they return. JetStream reads and writes go through `weaver.streams`. Callbacks
never block: slow work (JetStream publishes, request handling) runs in tasks owned by the weaver's
TaskGroup. The gRPC Control service is not started here: the composition (`weaver.app`) serves it
over a started `Weaver`.
"""

from __future__ import annotations

import asyncio
import collections
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

from torchloom import bus, naming, signing, subjects, wire
from torchloom.errors import CommandRejected, JobNotFound, NatsUnavailable
from torchloom.messages import (
    Ack,
    Action,
    ActionKind,
    AgentRefusal,
    Command,
    Heartbeat,
    JobEvent,
    Outcome,
    OutcomeStatus,
    PolicyReply,
    PolicyRequest,
    ProposalDecision,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
)
from weaver import (
    admission,
    dedupe,
    health_plan,
    knob_schemas,
    liveness,
    notices,
    outcomes,
    recovery,
    submits,
    ui_feeds,
)
from weaver import health_policy as hp
from weaver.acks import RETRY, AckFeed, CommandKey, Retry
from weaver.agents import AgentGate
from weaver.config import WeaverConfig
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.steering import FIRED_KINDS, Steering
from weaver.streams import Outbox, OutboxItem, RankConsumers, SeqConflict, Streams

log = logging.getLogger(__name__)

QUEUE_GROUP = "torchloom-weaver"
# The kind of api.decide's answer when no decision was made (unknown proposal or job, bad request).
DECIDE_FAILED = "proposal_not_decided"
# Who decides over api.decide on a bus whose role table the weaver was not told about.
NATS_ANONYMOUS = "nats:unauthenticated"
WARM_UP_MIN_S = 5.0  # after a (re)start, a submit the ranks' reports could decide waits at least this
# Heartbeats and metrics (15 messages per rank per second) come on a connection of their own, so a
# backlog of them never delays a JetStream answer (a stored command, a pub ack) or an API request,
# and a slow-consumer cut of it loses telemetry only. Its queues are bounded: past these, nats-py
# drops the newest message (the weaver is seconds behind; the read clock holds verdicts back).
TELEMETRY_PENDING_MSGS = 200_000
TELEMETRY_PENDING_BYTES = 256 * 1024 * 1024
# Unwatched, a rank's step metrics are read at most this often (the lead rank's, which the autopilot
# follows step by step, every time): Prometheus keeps its loss within this, and the autopilot's
# non-finite counts are cumulative, so a skipped report hides none.
METRICS_SAMPLE_S = 1.0
METRICS_SAMPLED_MAX = 65_536  # subjects remembered for that (a flood of made-up ranks starts it over)
# The full health check runs at least this often (and on every change of the silent ranks' count).
HEALTH_CHECK_INTERVAL_S = 0.5
# A liveness verdict judged this far behind the wall clock (the weaver's own lag) is logged.
LAG_WARN_S = 0.25

__all__ = ["DECIDE_FAILED", "QUEUE_GROUP", "Watcher", "Weaver"]


class Watcher:
    """One subscriber to the weaver's live feed, with a bounded queue that drops the oldest events.

    Iterate it with `async for`; it ends when the weaver closes or `close()` is called.
    """

    def __init__(self, job: str, maxlen: int) -> None:
        self.job = job
        self.dropped = 0
        self._queue: collections.deque[WatchEvent] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._closed = False

    def push(self, ev: WatchEvent) -> None:
        if self._closed or (self.job and ev.job != self.job):
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(ev)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()


class Weaver:
    """The central service. Use as `async with Weaver(config) as w:`.

    Entering connects to NATS, ensures the JetStream streams, recovers its state from them and
    subscribes to heartbeats, acks, metrics and the request-reply API. Its components: `state` (the
    `WeaverState` the decision modules read and update), the JetStream `Streams` (once started) and
    the `Outbox` of journal entries and events. The gRPC Control service is served over it by the
    composition (`weaver.app.open_weaver`), through the methods `submit`, `status`, `iter_watch` and
    `journal`.
    """

    def __init__(self, config: WeaverConfig) -> None:
        self.config = config
        self.state = WeaverState()
        self._nc: Client | None = None
        self._telemetry: Client | None = None  # heartbeats and metrics (TELEMETRY_PENDING_MSGS)
        self._heartbeats: Any = None  # their subscription (its backlog feeds the read clock)
        self._read_clock = liveness.ReadClock()
        self._metrics_read_at: dict[str, float] = {}  # metrics subject -> when last read unwatched
        self._lead_metrics: dict[str, str] = {}  # job's metrics subject prefix -> its lowest rank
        self._lagging_since: float | None = None  # when liveness was last judged in time
        self._lag_max_s = 0.0
        self._streams: Streams | None = None
        self._schemas: knob_schemas.KnobSchemas | None = None  # once connected
        self._hb_decoder = wire.HeartbeatDecoder()  # reuses a rank's unchanged schema and device
        self._consumers: RankConsumers | None = None  # each rank's command consumer (made here)
        self._feeds: ui_feeds.UiFeeds | None = None  # the web pages' journal feeds (made here)
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
        self._next_eviction_s = 0.0
        self._job_streams: set[str] = set()  # jobs whose command stream this weaver has ensured
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
            self._feeds = ui_feeds.UiFeeds(js, self.config.nats_timeout_s)
            async with asyncio.timeout(self.config.nats_timeout_s):
                # Commands live in one stream per job (a threadlet's credential names its own); an
                # older store's shared stream would overlap them.
                await bus.remove_shared_commands(js)
                await bus.ensure_streams(js, replicas=self.config.replicas, shared_commands=False)
            # Before the subscriptions: acks of commands from before a restart must find them pending.
            await self._recover()
            nc = self._nc
            self._telemetry = await bus.connect(
                self.config.nats_url,
                name="torchloom-weaver-telemetry",
                connect_timeout_s=self.config.nats_timeout_s,
                credentials=self.config.nats_credentials,
                on_error=self._on_nats_error,
                on_disconnected=self._on_telemetry_lost,
                on_reconnected=self._on_telemetry_back,
            )
            self._started_at_s = time.time()
            self._heartbeats = await self._subscribe_telemetry(subjects.heartbeats_all(), self._on_heartbeat)
            await self._subscribe_telemetry(subjects.metrics_all(), self._on_metrics)
            # Acks come through the durable consumer: those a previous weaver did not journal yet too.
            async with asyncio.timeout(self.config.nats_timeout_s):
                await self._acks.start(js)
            # Launchers announce a stopping run here (only the weaver and launcher roles may publish).
            await nc.subscribe(subjects.events_all(), cb=self._on_event)
            await nc.subscribe(subjects.api_submit(), queue=QUEUE_GROUP, cb=self._on_api_submit)
            await nc.subscribe(subjects.api_status(), queue=QUEUE_GROUP, cb=self._on_api_status)
            await nc.subscribe(subjects.api_decide(), queue=QUEUE_GROUP, cb=self._on_api_decide)
            await nc.subscribe(subjects.api_feeds_all(), queue=QUEUE_GROUP, cb=self._on_api_feed)
            async with asyncio.timeout(self.config.nats_timeout_s):
                await nc.flush()
                await self._telemetry.flush()
            self._runner = asyncio.create_task(self._run(), name="torchloom-weaver")
            await self._started.wait()
        except BaseException:
            await self.close()
            raise
        log.info("weaver up: nats %s", self.config.nats_url)

    async def _subscribe_telemetry(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> Any:
        assert self._telemetry is not None
        return await self._telemetry.subscribe(
            subject,
            cb=cb,
            pending_msgs_limit=TELEMETRY_PENDING_MSGS,
            pending_bytes_limit=TELEMETRY_PENDING_BYTES,
        )

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._liveness_loop(), name="weaver-liveness")
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
        if self._telemetry is not None and not self._telemetry.is_closed:
            with contextlib.suppress(Exception):  # telemetry is not drained: nothing of it is kept
                await self._telemetry.close()
        if self._nc is not None and not self._nc.is_closed:
            try:
                async with asyncio.timeout(self.config.nats_timeout_s):
                    await self._nc.drain()
            except Exception as exc:  # closing anyway; a dead server must not hang shutdown
                log.debug("nats drain failed: %s", exc)
                await self._nc.close()
        self._closed.set()

    # ---- loops ----------------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        policy = self.config.policy()
        interval = self.config.liveness_interval_s
        # Every tick counts the silent ranks (O(n), cheap); the full health check (blame, hung,
        # stragglers: most of a tick's cost at 1,000 ranks) runs when that count changed, or at
        # least every HEALTH_CHECK_INTERVAL_S, so a rank going silent is judged as fast as before.
        full_every = max(1, round(HEALTH_CHECK_INTERVAL_S / interval))
        tick, silent_before = 0, -1
        while True:
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            now = time.time()
            at = self._judged_at(now, tick_late_s=time.monotonic() - due)
            if at is None:
                continue
            tick += 1
            silent = liveness.silent_ranks(self.state, at, self.config.dead_after_s)
            if silent == silent_before and tick % full_every:
                continue
            silent_before = silent
            try:
                effects = health_plan.check_health(self.state, at, policy)
            except Exception:  # a bug in a health decision must not take the weaver down
                log.exception("rank health check failed")
                continue
            for ev in effects.events:
                self._announce(ev)
            self._evict(time.time())
            for plan in effects.plans:
                self._spawn(self._carry_out(plan), name=f"weaver-health-{plan.job}")

    def _judged_at(self, now: float, *, tick_late_s: float) -> float | None:
        """When to judge the ranks' liveness at (`liveness.ReadClock`): the weaver's own lag is not
        blamed on ranks. A lag is logged once when it starts and once, with its worst, when it ends."""
        sub = self._heartbeats
        backlog = sub.pending_msgs if sub is not None else 0
        at = self._read_clock.judged_at(
            now, backlog=backlog, tick_late_s=tick_late_s, dead_after_s=self.config.dead_after_s
        )
        lag = now - at if at is not None else max(tick_late_s, now - self._read_clock.caught_up_at)
        if at is None or lag > LAG_WARN_S:
            if self._lagging_since is None:
                self._lagging_since, self._lag_max_s = now, 0.0
                log.warning(
                    "the weaver is %.2f s behind its heartbeats (%d queued, tick %.2f s late%s): "
                    "liveness is judged at the time read up to",
                    lag,
                    backlog,
                    tick_late_s,
                    ", heartbeat connection down" if self._read_clock.disconnected_at is not None else "",
                )
            self._lag_max_s = max(self._lag_max_s, lag)
        elif self._lagging_since is not None:
            log.warning(
                "the weaver caught up with its heartbeats after %.1f s (at most %.2f s behind)",
                now - self._lagging_since,
                self._lag_max_s,
            )
            self._lagging_since = None
        return at

    def _read_time(self, now: float) -> float:
        """The time status judges liveness at: the read clock's (so status and the health events
        agree), else, with no verdict possible now, the last time every heartbeat was folded."""
        sub = self._heartbeats
        clock = self._read_clock
        at = clock.judged_at(
            now,
            backlog=sub.pending_msgs if sub is not None else 0,
            tick_late_s=0.0,
            dead_after_s=self.config.dead_after_s,
        )
        return at if at is not None else min(now, clock.caught_up_at or now)

    async def _on_telemetry_lost(self) -> None:
        if self._closing is not None:
            return  # closed on purpose
        log.warning("heartbeat connection lost: no liveness verdict until it is back")
        self._read_clock.disconnected(time.time())

    async def _on_telemetry_back(self) -> None:
        self._read_clock.reconnected(time.time(), self.config.dead_after_s)
        log.warning("heartbeat connection back after %.1f s", self._read_clock.gap_s)

    def _evict(self, now: float) -> None:
        """Forget dead jobs now and then (`admission.evict_dead_jobs`), so their slots free up."""
        if now < self._next_eviction_s:
            return
        self._next_eviction_s = now + min(60.0, self._limits.job_evict_after_s / 4)
        gone = admission.evict_dead_jobs(self.state, now, self.config.dead_after_s, self._limits)
        if gone:
            log.info("forgot %d dead job(s): %s", len(gone), ", ".join(gone[:10]))
            self.metrics.forget_jobs(gone)

    async def _carry_out(self, plan: health_plan.HealthPlan) -> None:
        """Issue the policy's commands in order, then ask the launcher for the restart."""
        checkpoint = checkpoint_path = ""
        for req in plan.submits:
            if health_plan.is_stopping(self.state, plan.job, plan.run_id):
                return
            outcome = await self.submit(req)
            taking = isinstance(req.body, Action) and req.body.kind is ActionKind.CHECKPOINT
            if taking and outcome.status is OutcomeStatus.APPLIED and outcome.command is not None:
                first = min(outcome.results, key=lambda r: r.rank, default=None)
                detail = first.detail if first is not None else {}
                checkpoint = detail.get("checkpoint_id") or naming.checkpoint_id(outcome.command.seq)
                checkpoint_path = detail.get("checkpoint_path", "")
            elif taking:
                # Restarting now would lose the state the checkpoint was to save: decide again later.
                log.warning("health checkpoint of %s did not apply: %s", plan.job, outcome.reason)
                health_plan.set_phase(self.state, plan.job, plan.run_id, hp.Phase.IDLE)
                return
        if plan.restart is None or health_plan.is_stopping(self.state, plan.job, plan.run_id):
            return
        request = dataclasses.replace(plan.restart, time_s=time.time())
        if not request.checkpoint_id:
            request = dataclasses.replace(request, checkpoint_id=checkpoint, checkpoint_path=checkpoint_path)
        self._announce(health_plan.restart_event(request))
        assert self._signer is not None, "the weaver is not started"
        data = wire.encode(request)
        # Signed: a launcher carries out only the weaver's restarts (signing.SIGNATURE_HEADER).
        signature = {signing.SIGNATURE_HEADER: self._signer.sign_restart(data)}
        await self.nats.publish(subjects.launcher(plan.job), data, headers=signature)
        health_plan.set_phase(self.state, plan.job, plan.run_id, hp.Phase.RESTARTING)

    async def _publish(self, item: OutboxItem) -> None:
        """Publish one outbox message: to JetStream (stored once per msg id) when journaling, else to
        core NATS."""
        if self.config.journal and self._streams is not None:
            async with asyncio.timeout(self.config.nats_timeout_s):
                await self._streams.js.publish(
                    item.subject, item.payload, headers={"Nats-Msg-Id": item.msg_id}
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
            subject = subjects.journal(outcome.job or admission.WEAVER_JOB)
            msg_id = dedupe.journal_msg_id(outcome)
            self._outbox.put(subject, wire.encode(outcome), msg_id=msg_id, keep=True, then=release)
        else:
            self._spawn(release(), name="weaver-release-acks")
        self._announce(outcomes.outcome_event(outcome, time.time()))
        searched = outcomes.search_event(outcome, time.time())
        if searched is not None:
            self._announce(searched)

    # ---- NATS callbacks -------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        now = time.time()
        if self._foreign("heartbeat", subjects.heartbeats_all(), msg):
            return
        if len(msg.data) > admission.MAX_MESSAGE_BYTES:
            self._refuse(
                "heartbeat", "", "", f"heartbeat of {len(msg.data)} bytes on {msg.subject} refused", now
            )
            return
        try:
            hb = self._hb_decoder.decode(msg.data)
        except ValueError as exc:
            self._refuse("heartbeat", "", "", f"malformed heartbeat on {msg.subject} refused: {exc}", now)
            return
        # Job and run become subject tokens of commands and events, ranks index the run's world:
        # whatever does not fit the subject and what the weaver knows changes nothing.
        reason = admission.check_heartbeat(
            self.state, hb, msg.subject, now, self.config.dead_after_s, self._limits
        )
        if reason is not None:
            self._refuse("heartbeat", hb.job, hb.run_id, f"heartbeat on {msg.subject} refused: {reason}", now)
            return
        hb, clamped = admission.clamp_last_seq(self.state, hb)
        if clamped is not None:
            self._refuse("heartbeat", hb.job, hb.run_id, f"heartbeat last_seq cut: {clamped}", now)
        hb = await self._with_schema(hb)
        effects = liveness.observe_heartbeat(self.state, hb, now)
        for outcome in effects.dropped:
            self._finish(outcome)
        for ev in effects.events:
            self._announce(ev)
        if effects.new_run:
            self._spawn(self._load_seq_floor(hb.job, hb.run_id), name=f"weaver-seq-{hb.job}")
        consumers = self._consumers
        if consumers is not None and consumers.wanted(hb.job, hb.run_id, hb.rank, hb.incarnation):
            # A rank may only pull from the consumer the weaver makes for it (docs/security.md).
            self._spawn(
                consumers.ensure(hb.job, hb.run_id, hb.rank, hb.incarnation), name=f"weaver-consumer-{hb.job}"
            )
        self._note_read(now)

    def _note_read(self, now: float) -> None:
        """After a heartbeat: with none left queued, every one received so far is folded in."""
        sub = self._heartbeats
        if sub is None or sub.pending_msgs == 0:
            self._read_clock.drained(now)

    async def _with_schema(self, hb: Heartbeat) -> Heartbeat:
        """Keep a schema sent in full (stored for the next weaver); give a hash-only heartbeat the
        schema of its hash while the weaver knows no knobs of its job (it just started)."""
        schemas = self._schemas
        if schemas is None:
            return hb
        if hb.knobs:
            if self._tg is not None and schemas.remember(hb):  # stored by a task of the TaskGroup
                self._spawn(schemas.store(hb), name=f"weaver-schema-{hb.job}")
            return hb
        job = self.state.jobs.get(hb.job)
        if not hb.knobs_hash or (job is not None and job.knobs):
            return hb
        specs = await schemas.lookup(hb.job, hb.knobs_hash)
        return knob_schemas.with_schema(hb, specs) if specs is not None else hb

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

    async def _on_metrics(self, msg: Msg) -> None:
        # Unwatched, metrics are read only for the exporter's loss, and quietly, as they were dropped.
        watched = bool(self._watchers)
        if not (watched or self.metrics.serving or self.steering.active) or (
            watched and self._foreign("metrics", subjects.metrics_all(), msg)
        ):
            return
        now = time.time()
        if not watched and not self._metrics_due(msg.subject, now):
            return
        try:
            sm = wire.decode_metrics(msg.data)
        except ValueError as exc:
            if watched:
                self._refuse("metrics", "", "", f"malformed metrics on {msg.subject} refused: {exc}", now)
            return
        reason = admission.check_metrics(self.state, sm, msg.subject)
        if reason is not None:
            if watched:
                self._refuse("metrics", sm.job, sm.run_id, f"metrics on {msg.subject} refused: {reason}", now)
            return
        self.metrics.observe_step_metrics(sm)
        if self.steering.active:
            self.steering.on_metrics(sm, now)
        self._fan_out(sm)

    def _metrics_due(self, subject: str, now: float) -> bool:
        """Unwatched, whether to read this report: a rank's at most every `METRICS_SAMPLE_S`, and
        while a policy runs, its job's lowest rank's (the series the autopilot follows) each time.
        Skipping costs a dict lookup, so the 10 Hz reports of 1,000 ranks are cheap to pass over."""
        if self.steering.active:
            prefix, _, token = subject.rpartition(".")  # <metrics of the job>.<rank>
            if token.isdigit():
                lead = self._lead_metrics.get(prefix)
                if lead is None or int(token) <= int(lead):
                    if len(self._lead_metrics) >= METRICS_SAMPLED_MAX:
                        self._lead_metrics.clear()
                    self._lead_metrics[prefix] = token
                    return True
        if now - self._metrics_read_at.get(subject, 0.0) < METRICS_SAMPLE_S:
            return False
        if len(self._metrics_read_at) >= METRICS_SAMPLED_MAX:  # made-up rank numbers: start over
            self._metrics_read_at.clear()
        self._metrics_read_at[subject] = now
        return True

    async def _on_event(self, msg: Msg) -> None:
        """A launcher's `naming.RUN_STOPPING` marks its run as stopping (`health_plan.note_stopping`);
        every other event here is the weaver's own or a launcher's report, journaled as it is."""
        if len(msg.data) > admission.MAX_MESSAGE_BYTES:
            return
        try:
            ev = wire.decode_event(msg.data)
            if ev.kind != naming.RUN_STOPPING or msg.subject != subjects.events(ev.job):
                return
        except ValueError:
            return  # not ours to judge: the journal keeps it as published
        noted = health_plan.note_stopping(self.state, ev, time.time())
        if noted is not None:
            log.info("%s", noted.message)
            self._announce(noted)

    def _not_a_request(self, kind: str, subject: str, msg: Msg) -> bool:
        """True (and counted) unless `msg` is a request on `subject` whose reply goes to an inbox:
        an answer is published with the weaver's rights, so it must not land on a subject of its
        requester's choice."""
        if msg.subject == subject and (msg.reply or "").startswith(f"{subjects.INBOX}."):
            return False
        self._refuse(
            kind,
            "",
            "",
            f"{kind} request on {msg.subject} with reply subject {msg.reply or '(none)'!r} dropped: "
            f"expected {subject} with a reply to an {subjects.INBOX}. subject",
            time.time(),
            key="reply",
        )
        return True

    async def _on_api_submit(self, msg: Msg) -> None:
        if self._not_a_request("api", subjects.api_submit(), msg):
            return
        # A submit waits for every rank; run it apart so other requests are not queued behind it.
        self._spawn(self._serve_api_submit(msg), name="weaver-api-submit")

    async def _serve_api_submit(self, msg: Msg) -> None:
        try:
            req = wire.decode_submit_request(msg.data)
        except ValueError as exc:
            outcome = Outcome(command_id="", job="", status=OutcomeStatus.REJECTED, reason=str(exc))
        else:
            identity = self.config.api_submit_identity
            if identity is not None:
                # Only that role may publish on api.submit (the server's role table): it is the issuer.
                req = dataclasses.replace(req, issuer=dataclasses.replace(req.issuer, identity=identity))
            try:
                outcome = await self.submit(req)
            except NatsUnavailable as exc:
                # Not a rejection: the command may be stored. Not known yet; a repeat with the same
                # command id is answered with its decision.
                outcome = Outcome(
                    command_id=req.command_id,
                    job=req.job,
                    status=OutcomeStatus.TIMEOUT,
                    reason=f"not known yet: {exc}; send it again with the same command id",
                )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(wire.encode(outcome))

    async def _on_api_status(self, msg: Msg) -> None:
        if self._not_a_request("api", subjects.api_status(), msg):
            return
        try:
            req = wire.decode_status_request(msg.data)
            reply = self.status(req.job)
        except (ValueError, JobNotFound) as exc:
            # The NATS API has no error channel: an unknown job answers an empty reply.
            log.debug("status request: %s", exc)
            reply = StatusReply()
        with contextlib.suppress(Exception):
            await msg.respond(wire.encode(reply))

    async def _on_api_decide(self, msg: Msg) -> None:
        """The page's answer to a proposal: `decide_proposal`, decided by the NATS api identity. A
        decision that cannot be made is answered with a `DECIDE_FAILED` event (not journaled), the
        reason in its message: the NATS API has no error channel."""
        if self._not_a_request("api", subjects.api_decide(), msg):
            return
        try:
            req = wire.decode_proposal_decision(msg.data)
        except ValueError as exc:
            answer = JobEvent(job="", kind=DECIDE_FAILED, message=str(exc), time_s=time.time())
        else:
            try:
                answer = self.decide_proposal(
                    req, decided_by=self.config.api_submit_identity or NATS_ANONYMOUS
                )
            except (ValueError, JobNotFound, KeyError) as exc:
                answer = JobEvent(
                    job=req.job,
                    kind=DECIDE_FAILED,
                    message=str(exc.args[0]) if exc.args else str(exc),
                    time_s=time.time(),
                    attrs={"proposal": req.proposal_id},
                )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(wire.encode(answer))

    async def _on_api_feed(self, msg: Msg) -> None:
        """A web page asks for its journal history: `ui_feeds` makes a feed that delivers to an inbox
        of the role named by the subject (only that role may publish there)."""
        owner = msg.subject.rpartition(".")[2]
        expected = subjects.api_feed(owner) if owner in ui_feeds.OWNERS else subjects.api_feeds_all()
        if self._not_a_request("api", expected, msg):
            return
        self._spawn(self._serve_api_feed(owner, msg), name="weaver-api-feed")

    async def _serve_api_feed(self, owner: str, msg: Msg) -> None:
        assert self._feeds is not None  # subscribed only once started
        reply = await self._feeds.answer(owner, msg.data)
        if reply.refused:
            self._refuse(
                "api", "", "", f"journal feed for {owner} refused: {reply.error}", time.time(), key="feed"
            )
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(reply.encode())

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

    async def _ensure_job_stream(self, job: str) -> None:
        """Create the job's command stream once (the control plane may have made it at registration)."""
        if job in self._job_streams:
            return
        try:
            async with asyncio.timeout(self.config.nats_timeout_s):
                await bus.ensure_job_commands(self.streams.js, job, replicas=self.config.replicas)
        except Exception as exc:  # nats-py raises several types for "not now"
            raise NatsUnavailable(f"cannot create the command stream of job {job}: {exc!r}") from exc
        self._job_streams.add(job)

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
        # Long enough for a rank's next full knob schema (threadlets resend it every 2 s).
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
                await self._ensure_job_stream(job.job)
                if self._consumers is not None:  # so each rank reads it as soon as it is stored
                    ranks = [(r, e.incarnation) for r, e in job.ranks.items()]
                    await self._consumers.ensure_run(job.job, job.run_id, ranks)
            except NatsUnavailable:
                submits.abandon(self.state, cmd)
                raise
            submits.mark_published(self.state, cmd, time.time())
            try:
                stream_seq, duplicate = await self.streams.store_command(
                    self._signer.sign(cmd), job.last_stream_seq
                )
            except SeqConflict:
                submits.abandon(self.state, cmd)
                log.warning("seq %d of %s was taken by another writer: reloading", cmd.seq, job.job)
                continue
            except NatsUnavailable:
                submits.abandon(self.state, cmd)
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
        return liveness.status(self.state, job, self._read_time(time.time()), self.config.policy())

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
            log.info(
                "recovered job %s run %s: seq %d, %d checkpoint(s), %d in flight",
                job.job,
                job.run_id,
                job.last_seq,
                len(job.registry.checkpoints),
                len(job.pending),
            )
