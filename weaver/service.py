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
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.aio.client import Client
from nats.aio.msg import Msg

from torchloom import bus, naming, signing, subjects, wire
from torchloom.errors import CommandRejected, JobNotFound, NatsUnavailable
from torchloom.messages import (
    Action,
    ActionKind,
    Command,
    JobEvent,
    Outcome,
    OutcomeStatus,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WatchEvent,
)
from weaver import admission, health_plan, liveness, outcomes, recovery, submits
from weaver import health_policy as hp
from weaver.config import WeaverConfig
from weaver.model import WeaverState
from weaver.streams import Outbox, SeqConflict, Streams

log = logging.getLogger(__name__)

QUEUE_GROUP = "torchloom-weaver"

__all__ = ["QUEUE_GROUP", "Watcher", "Weaver"]


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
        self._streams: Streams | None = None
        self._outbox = Outbox()
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
        self._next_eviction_s = 0.0

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
                self.config.nats_url, name="torchloom-weaver", connect_timeout_s=self.config.nats_timeout_s
            )
            js = self._nc.jetstream(timeout=self.config.nats_timeout_s)
            self._streams = Streams(js, self.config.nats_timeout_s)
            async with asyncio.timeout(self.config.nats_timeout_s):
                await bus.ensure_streams(js, replicas=self.config.replicas)
            # Before the subscriptions: acks of commands from before a restart must find them pending.
            await self._recover()
            nc = self._nc
            await nc.subscribe(subjects.heartbeats_all(), cb=self._on_heartbeat)
            await nc.subscribe(subjects.acks_all(), cb=self._on_ack)
            await nc.subscribe(subjects.metrics_all(), cb=self._on_metrics)
            await nc.subscribe(subjects.api_submit(), queue=QUEUE_GROUP, cb=self._on_api_submit)
            await nc.subscribe(subjects.api_status(), queue=QUEUE_GROUP, cb=self._on_api_status)
            async with asyncio.timeout(self.config.nats_timeout_s):
                await nc.flush()
            self._runner = asyncio.create_task(self._run(), name="torchloom-weaver")
            await self._started.wait()
        except BaseException:
            await self.close()
            raise
        log.info("weaver up: nats %s", self.config.nats_url)

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
        for watcher in list(self._watchers):
            watcher.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
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
        while True:
            await asyncio.sleep(self.config.liveness_interval_s)
            try:
                effects = health_plan.check_health(self.state, time.time(), policy)
            except Exception:  # a bug in a health decision must not take the weaver down
                log.exception("rank health check failed")
                continue
            for ev in effects.events:
                self._announce(ev)
            self._evict(time.time())
            for plan in effects.plans:
                self._spawn(self._carry_out(plan), name=f"weaver-health-{plan.job}")

    def _evict(self, now: float) -> None:
        """Forget dead jobs now and then (`admission.evict_dead_jobs`), so their slots free up."""
        if now < self._next_eviction_s:
            return
        self._next_eviction_s = now + min(60.0, self._limits.job_evict_after_s / 4)
        gone = admission.evict_dead_jobs(self.state, now, self.config.dead_after_s, self._limits)
        if gone:
            log.info("forgot %d dead job(s): %s", len(gone), ", ".join(gone[:10]))

    async def _carry_out(self, plan: health_plan.HealthPlan) -> None:
        """Issue the policy's commands in order, then ask the launcher for the restart."""
        checkpoint = checkpoint_path = ""
        for req in plan.submits:
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
        if plan.restart is None:
            return
        request = dataclasses.replace(plan.restart, time_s=time.time())
        if not request.checkpoint_id:
            request = dataclasses.replace(request, checkpoint_id=checkpoint, checkpoint_path=checkpoint_path)
        self._announce(health_plan.restart_event(request))
        await self.nats.publish(subjects.launcher(plan.job), wire.encode(request))
        health_plan.set_phase(self.state, plan.job, plan.run_id, hp.Phase.RESTARTING)

    async def _publish(self, subject: str, payload: bytes) -> None:
        """Publish one outbox message: to JetStream when journaling, else to core NATS."""
        if self.config.journal and self._streams is not None:
            async with asyncio.timeout(self.config.nats_timeout_s):
                await self._streams.js.publish(subject, payload)
        else:
            await self.nats.publish(subject, payload)

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
        self._fan_out(ev)
        self._outbox.put(subjects.events(ev.job), wire.encode(ev))

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

    def _signed(self, cmd: Command) -> bool:
        return self._verifier is not None and self._verifier.verify(cmd)

    def _finish(self, outcome: Outcome) -> None:
        """Deliver a final outcome: to its waiting submitter, watchers, the journal and the events."""
        fut = self._waiters.pop(outcome.command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
        self._fan_out(outcome)
        if self.config.journal:
            self._outbox.put(subjects.journal(outcome.job), wire.encode(outcome))
        self._announce(outcomes.outcome_event(outcome, time.time()))

    # ---- NATS callbacks -------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        now = time.time()
        if len(msg.data) > admission.MAX_MESSAGE_BYTES:
            self._refuse(
                "heartbeat", "", "", f"heartbeat of {len(msg.data)} bytes on {msg.subject} refused", now
            )
            return
        try:
            hb = wire.decode_heartbeat(msg.data)
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
        effects = liveness.observe_heartbeat(self.state, hb, now)
        for outcome in effects.dropped:
            self._finish(outcome)
        for ev in effects.events:
            self._announce(ev)
        if effects.new_run:
            self._spawn(self._load_seq_floor(hb.job, hb.run_id), name=f"weaver-seq-{hb.job}")

    async def _on_ack(self, msg: Msg) -> None:
        now = time.time()
        try:
            ack = wire.decode_ack(msg.data)
        except ValueError as exc:
            self._refuse("ack", "", "", f"malformed ack on {msg.subject} refused: {exc}", now)
            return
        reason = admission.check_ack(self.state, ack, msg.subject)
        if reason is not None:
            self._refuse("ack", ack.job, ack.run_id, f"ack on {msg.subject} refused: {reason}", now)
            return
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
            return
        outcome = outcomes.record_ack(self.state, ack, now)
        if outcome is not None:
            self._finish(outcome)

    async def _on_metrics(self, msg: Msg) -> None:
        if not self._watchers:
            return
        now = time.time()
        try:
            sm = wire.decode_metrics(msg.data)
        except ValueError as exc:
            self._refuse("metrics", "", "", f"malformed metrics on {msg.subject} refused: {exc}", now)
            return
        reason = admission.check_metrics(self.state, sm, msg.subject)
        if reason is not None:
            self._refuse("metrics", sm.job, sm.run_id, f"metrics on {msg.subject} refused: {reason}", now)
            return
        self._fan_out(sm)

    async def _on_api_submit(self, msg: Msg) -> None:
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
                outcome = submits.rejected_outcome(req, str(exc), time.time())
        with contextlib.suppress(Exception):  # the requester may be gone
            await msg.respond(wire.encode(outcome))

    async def _on_api_status(self, msg: Msg) -> None:
        try:
            req = wire.decode_status_request(msg.data)
            reply = self.status(req.job)
        except (ValueError, JobNotFound) as exc:
            # The NATS API has no error channel: an unknown job answers an empty reply.
            log.debug("status request: %s", exc)
            reply = StatusReply()
        with contextlib.suppress(Exception):
            await msg.respond(wire.encode(reply))

    # ---- the API --------------------------------------------------------------------------------

    async def _load_seq_floor(self, job: str, run_id: str) -> None:
        """Read the run's last command from the stream so seqs continue after a weaver restart.

        Eager, on a run's first heartbeat, and without the submit lock: a flood of new jobs must not
        queue a real submit behind their reads. A submit that needs the floor first reads it itself;
        whichever read lands first counts (see `_load_seq_floor_locked`).
        """
        current = self.state.jobs.get(job)
        if current is None or current.run_id != run_id or current.seq_known:
            return
        await self._load_seq_floor_locked(job, run_id)

    async def _load_seq_floor_locked(self, job: str, run_id: str) -> None:
        last, stream_seq = await self.streams.last_command(job, run_id)
        current = self.state.jobs.get(job)
        known = current.last_seq if current is not None and current.run_id == run_id else 0
        if last > known:
            # A seq this weaver did not hand out: count it only if our key signed it (a standby
            # weaver's), never a message someone published straight onto the subject, which every
            # rank refused.
            signed = [c.seq for c, _ in await self.streams.commands(job, run_id) if self._signed(c)]
            last = max(signed, default=0)
        current = self.state.jobs.get(job)
        if current is not None and current.run_id == run_id and current.seq_known:
            return  # another read landed first (no await from here on, so no command slipped in)
        submits.set_seq_floor(self.state, job, run_id, last, stream_seq)

    async def submit(self, req: SubmitRequest) -> Outcome:
        """Validate, sequence and publish a command, then wait for every rank's ack.

        Returns:
            APPLIED or REJECTED once every rank answered, REJECTED at once when validation fails
            (nothing is published), or TIMEOUT when the deadline passes first (the command stays in
            flight; its final outcome is journaled later).

        Raises:
            NatsUnavailable: the command could not be made durable in JetStream.
        """
        submitted = time.time()
        timeout_s = req.timeout_s if req.timeout_s > 0 else self.config.command_timeout_s
        dead_after = self.config.dead_after_s
        try:
            async with self._submit_lock:
                job = liveness.resolve_job(self.state, req.job, submitted, dead_after)
                for attempt in (1, 2):
                    if not job.seq_known:
                        await self._load_seq_floor_locked(job.job, job.run_id)
                    cmd = submits.plan_submit(self.state, req, submitted, dead_after)
                    fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
                    self._waiters[cmd.command_id] = fut
                    try:
                        await self._publish_command(cmd, job.last_stream_seq)
                        break
                    except SeqConflict as exc:
                        if attempt == 2:
                            raise NatsUnavailable(
                                f"command for {job.job} was not stored: another weaver keeps publishing "
                                f"commands of run {job.run_id} ({exc}); run one weaver per NATS cluster"
                            ) from exc
                        log.warning("seq %d of %s was taken by another writer: reloading", cmd.seq, job.job)
        except (CommandRejected, JobNotFound) as exc:
            return submits.rejected_outcome(req, str(exc), time.time())
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            return outcomes.timeout_outcome(self.state, cmd, timeout_s, time.time())
        finally:
            # Tracking goes on without a waiter; the final outcome still reaches the journal.
            self._waiters.pop(cmd.command_id, None)

    async def _publish_command(self, cmd: Command, expected_stream_seq: int) -> None:
        """Store `cmd` in JetStream, only if the run's subject still ends at `expected_stream_seq`.

        Raises:
            SeqConflict: another writer stored a command there first (the seq may be taken).
            NatsUnavailable: the command could not be stored.
        """
        submits.mark_published(self.state, cmd, time.time())
        try:
            assert self._signer is not None, "the weaver is not started"
            stream_seq = await self.streams.store_command(self._signer.sign(cmd), expected_stream_seq)
        except (SeqConflict, NatsUnavailable):
            submits.abandon(self.state, cmd)
            self._waiters.pop(cmd.command_id, None)
            raise
        submits.mark_stored(self.state, cmd, stream_seq)

    def status(self, job: str = "") -> StatusReply:
        """A snapshot of one job, or of every job for an empty name.

        Raises:
            JobNotFound: the weaver has not heard of that job.
        """
        return liveness.status(self.state, job, time.time(), self.config.policy())

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

    def journal(self, job: str = "", *, follow: bool = False) -> AsyncIterator[Outcome | JobEvent]:
        """The durable journal of one job (or of all for ""), oldest first; see `Streams.journal`."""
        return self.streams.journal(job, follow=follow)

    async def _recover(self) -> None:
        """Rebuild jobs, registries, seq floors and in-flight commands from the streams."""
        if not self.config.journal:
            return
        recovery.replay_journal(self.state, [e async for e in self.streams.journal()])
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
