"""The weaver's submit path: a submit decided once (validated, given its run's next seq, signed and
stored in its job's command stream), its submitters waiting for the outcome, and the seq floors read
back from the command streams so seqs stay unique across weaver restarts and rival weavers.

The decisions are `weaver.submits` and `weaver.dedupe`'s; this component carries them out over the
weaver's JetStream streams and hands every decision (refusals included) to the weaver's `finish`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

from torchloom import bus, signing, subjects
from torchloom.errors import CommandRejected, JobNotFound, NatsUnavailable
from torchloom.messages import Command, Outcome, SubmitRequest
from weaver import admission, dedupe, liveness, outcomes, recovery, submits
from weaver.config import WeaverConfig
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.streams import RankConsumers, SeqConflict, Streams

log = logging.getLogger(__name__)

WARM_UP_MIN_S = 5.0  # after a (re)start, a submit the ranks' reports could decide waits at least this

__all__ = ["WARM_UP_MIN_S", "SubmitPath"]


class SubmitPath:
    """Decides submits and keeps their submitters waiting until the outcome (`Weaver.submit`).

    Args:
        state: the weaver's state (the decisions of `weaver.submits` read and update it).
        config: the weaver's config (dead_after_s, command_timeout_s, nats_timeout_s, replicas).
        metrics: the weaver's Prometheus metrics (every submit and every timed-out answer).
        signer: the weaver's signing key, once started (else None).
        streams: the weaver's JetStream streams (asserts the weaver is started).
        consumers: the ranks' command consumers, once the weaver is connected (else None).
        signed: whether a stored command was signed by this weaver's key.
        finish: deliver a decision (a refusal here; `answer` brings back the others).
    """

    def __init__(
        self,
        state: WeaverState,
        config: WeaverConfig,
        metrics: WeaverMetrics,
        *,
        signer: Callable[[], signing.Signer | None],
        streams: Callable[[], Streams],
        consumers: Callable[[], RankConsumers | None],
        signed: Callable[[Command], bool],
        finish: Callable[[Outcome], None],
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        self._signer = signer
        self._streams = streams
        self._consumers = consumers
        self._signed = signed
        self._finish = finish
        self.started_at_s = time.time()  # set again once the weaver has subscribed (`warming_up`)
        self._submit_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._job_streams: dict[str, bus.JobCommands] = {}  # command streams this weaver ensured

    def answer(self, outcome: Outcome) -> None:
        """Hand a decision to the submitter waiting for it, if any."""
        fut = self._waiters.pop(outcome.command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def close(self) -> None:
        """Cancel every waiting submitter (the weaver is closing)."""
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()

    async def load_seq_floor(self, job: str, run_id: str) -> None:
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
                stream = await bus.ensure_job_commands(self._streams().js, job, replicas=self.config.replicas)
                await bus.ensure_ack_capture(self._streams().js, stream)
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
        tail = await self._streams().commands_after(job_name, run_id, after)
        recovery.replay_commands(self.state, job_name, run_id, [(c, s) for c, s in tail if self._signed(c)])
        if job is not None and job.run_id == run_id and tail:
            # The next publish expects the subject's true last message, signed or not.
            job.last_stream_seq = max(job.last_stream_seq, tail[-1][1])

    def warming_up(self, now: float) -> bool:
        # Right after a (re)start the weaver knows jobs from the journal but not yet their ranks and
        # knobs; a submit then would be refused for want of facts a heartbeat brings a moment later.
        # Long enough for every rank's first heartbeat; a knob schema it has not got yet is waited
        # for at any age (`submits.not_ready`), since ranks resend it only now and then.
        return now - self.started_at_s < max(WARM_UP_MIN_S, 3 * self.config.dead_after_s)

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
        malformed = admission.check_submit(req)
        if malformed is not None:
            # Journaled under an id and kind of the weaver's: those given may be anything (escapes,
            # 100 KB); the reason quotes their start.
            issuer = (
                dataclasses.replace(req.issuer, kind="?") if admission.issuer_kind_bad(req) else req.issuer
            )
            bad = dataclasses.replace(req, command_id=uuid.uuid4().hex, issuer=issuer)
            return self.refuse(bad, malformed, submitted, job=req.job)
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
            if not req.job and recovering and self.warming_up(now):
                raise NatsUnavailable(f"the weaver is starting up ({exc}); try again") from exc
            return self.refuse(req, str(exc), now, job=req.job)
        waiting = submits.not_ready(job, req.body, warming_up=self.warming_up(now))
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
                return self.refuse(req, str(exc), now, job=job.job, run_id=job.run_id)
            signer = self._signer()
            assert signer is not None, "the weaver is not started"
            try:
                # Only a command that passed validation makes its job's stream: heartbeats of any
                # number of job names (the seq-floor read above reads, never creates) make none.
                stream = await self._ensure_job_stream(job.job)
                consumers = self._consumers()
                if consumers is not None:  # so each rank reads it as soon as it is stored
                    ranks = [(r, e.incarnation) for r, e in job.ranks.items()]
                    await consumers.ensure_run(job.job, job.run_id, ranks)
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
                stream_seq, duplicate = await self._streams().store_command(
                    cmd, signer.encode_signed(cmd), job.last_stream_seq, stream=stream
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

    def refuse(self, req: SubmitRequest, reason: str, now: float, *, job: str, run_id: str = "") -> Outcome:
        """Decide and journal a refused submit: nothing is published; a repeat gets the same answer."""
        try:
            subjects.check_token("job", job)
        except ValueError:
            job = ""  # journaled under the weaver's own name; `reason` says what was asked
        outcome = dedupe.refused_outcome(req, reason, now, job=job, run_id=run_id)
        self._finish(outcome)
        return outcome
