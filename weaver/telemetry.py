"""What the ranks and launchers report to the weaver over core NATS: heartbeats (folded into the state
by `weaver.liveness`, after `weaver.admission` checked them), step metrics (for watchers, Prometheus
and the autopilot; read at a bounded rate when nobody watches) and a launcher's run-stopping and
run-ended events.

Heartbeats and metrics arrive on the weaver's telemetry connection; the handlers never block: slow
work (storing a knob schema, reading a new run's commands, making a rank's consumer) is spawned in
the weaver's TaskGroup.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg

from torchloom import bus, naming, subjects, wire
from torchloom.messages import Heartbeat, JobEvent, KnobSpec, Outcome, RankState, WatchEvent
from weaver import admission, health_plan, knob_schemas, liveness
from weaver.config import WeaverConfig
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.steering import Steering
from weaver.streams import RankConsumers

log = logging.getLogger(__name__)

# Unwatched, a rank's step metrics are read at most this often (the lead rank's, which the autopilot
# follows step by step, every time): Prometheus keeps its loss within this, and the autopilot's
# non-finite counts are cumulative, so a skipped report hides none.
METRICS_SAMPLE_S = 1.0
METRICS_SAMPLED_MAX = 65_536  # subjects remembered for that (a flood of made-up ranks starts it over)

__all__ = ["METRICS_SAMPLED_MAX", "METRICS_SAMPLE_S", "Telemetry", "heartbeat_subject", "mark_run_ended"]


def heartbeat_subject(subject: str, prefix: str) -> bool:
    """Whether `subject` is `<prefix><job>.<rank>` (prefix: `subjects.heartbeats_all()` without its
    `*.*`): what `subjects.matches(subjects.heartbeats_all(), subject)` answers, in a fifth of its
    time, for the heartbeat path's first test (a False still goes to the full test)."""
    return subject.startswith(prefix) and subject.count(".", len(prefix)) == 1


def mark_run_ended(state: WeaverState, event: JobEvent) -> tuple[int, ...]:
    """Mark every rank of the run a launcher's `naming.RUN_ENDED` event names as finished, so status
    stops calling the ranks of a run that is over running (their processes are gone). The event
    counts for the job's current run or a torchrun restart inside it; anything else is stale.
    The rank whose failure ended the run (`failed_rank`, torchrun's first failure) is left as it
    is: it did not finish, and its health says how it ended (dead: no heartbeat since). The others
    are over too, mostly stopped by torchrun after it (the event says how each ended).

    Returns:
        The ranks marked (none when the event is not an end, names no run the weaver follows, or
        every rank had finished already).
    """
    job = state.jobs.get(event.job)
    if event.kind != naming.RUN_ENDED or job is None or not naming.is_attempt_of(job.run_id, event.run_id):
        return ()
    failed = event.attrs.get("failed_rank", "")
    marked = []
    for rank, entry in sorted(job.ranks.items()):
        if str(rank) != failed and entry.heartbeat.state is not RankState.FINISHED:
            entry.heartbeat = dataclasses.replace(entry.heartbeat, state=RankState.FINISHED)
            entry.finished_reported = True  # the launcher's event says it: no rank_finished of our own
            marked.append(rank)
    return tuple(marked)


class Telemetry:
    """The handlers of the weaver's heartbeat, metrics and event subscriptions.

    Args:
        state: the weaver's state (heartbeats fold into it; metrics and events are checked against it).
        config: the weaver's config (dead_after_s).
        limits: the weaver's bounds on jobs and ranks (a heartbeat beyond them is refused).
        metrics: the weaver's Prometheus metrics (fed every admitted step report).
        steering: the autopilot (fed every admitted step report while a policy runs).
        clock: how far the weaver has read its heartbeats (moved on when none is left queued).
        backlog: how many heartbeats are received but not read yet.
        schemas: the knob schemas' store, once the weaver is connected (else None).
        consumers: the ranks' command consumers, once the weaver is connected (else None).
        running: whether the weaver's TaskGroup runs (spawned work is kept, not dropped).
        watched: whether anybody watches the weaver's live feed.
        foreign: count a message of a subject its subscription does not name, True if so.
        refuse: count and announce a refused message.
        finish: deliver a decided outcome.
        announce: journal an event and send it to watchers.
        fan_out: send a live event (not journaled) to watchers.
        spawn: run a coroutine in the weaver's TaskGroup under a name.
        load_seq_floor: read a new run's stored commands (job, run id).
    """

    def __init__(
        self,
        state: WeaverState,
        config: WeaverConfig,
        limits: admission.Limits,
        metrics: WeaverMetrics,
        steering: Steering,
        clock: liveness.ReadClock,
        *,
        backlog: Callable[[], int],
        schemas: Callable[[], knob_schemas.KnobSchemas | None],
        consumers: Callable[[], RankConsumers | None],
        running: Callable[[], bool],
        watched: Callable[[], bool],
        foreign: Callable[[str, str, Msg], bool],
        refuse: admission.Refuse,
        finish: Callable[[Outcome], None],
        announce: Callable[[JobEvent], None],
        fan_out: Callable[[WatchEvent], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        load_seq_floor: Callable[[str, str], Coroutine[Any, Any, None]],
    ) -> None:
        self._state = state
        # The journal stream, once the weaver has made it: launchers' events arrive on its capture
        # subjects (None: on the public ones, a weaver without JetStream).
        self.journal: bus.JournalStream | None = None
        self._config = config
        self._limits = limits
        self._metrics = metrics
        self._steering = steering
        self._read_clock = clock
        self._backlog = backlog
        self._schemas = schemas
        self._consumers = consumers
        self._running = running
        self._watched = watched
        self._foreign = foreign
        self._refuse = refuse
        self._finish = finish
        self._announce = announce
        self._fan_out = fan_out
        self._spawn = spawn
        self._load_seq_floor = load_seq_floor
        # Decodes only what changed since a rank process's last heartbeat, and gives a hash-only
        # heartbeat the schema this weaver knows for it.
        self._hb_decoder = wire.HeartbeatDecoder(schema=self._known_schema)
        self._heartbeats_all = subjects.heartbeats_all()
        # The heartbeat subjects' prefix: `heartbeat_subject` tests a subject without splitting it.
        self._hb_prefix = self._heartbeats_all.removesuffix("*.*")
        self._metrics_read_at: dict[str, float] = {}  # metrics subject -> when last read unwatched
        self._lead_metrics: dict[str, str] = {}  # job's metrics subject prefix -> its lowest rank

    async def on_heartbeat(self, msg: Msg) -> None:
        now = time.time()
        if not heartbeat_subject(msg.subject, self._hb_prefix) and self._foreign(
            "heartbeat", self._heartbeats_all, msg
        ):
            return
        too_big = admission.oversized("heartbeat", len(msg.data), msg.subject)
        if too_big is not None:
            self._refuse("heartbeat", "", "", too_big, now)
            return
        try:
            hb, schema_sent = self._hb_decoder.decode(msg.data)
        except ValueError as exc:
            self._refuse("heartbeat", "", "", f"malformed heartbeat on {msg.subject} refused: {exc}", now)
            return
        # Job and run become subject tokens of commands and events, ranks index the run's world:
        # whatever does not fit the subject and what the weaver knows changes nothing.
        reason = admission.check_heartbeat(
            self._state, hb, msg.subject, now, self._config.dead_after_s, self._limits
        )
        if reason is not None:
            self._refuse("heartbeat", hb.job, hb.run_id, f"heartbeat on {msg.subject} refused: {reason}", now)
            return
        hb, clamped = admission.clamp_last_seq(self._state, hb)
        if clamped is not None:
            self._refuse("heartbeat", hb.job, hb.run_id, f"heartbeat last_seq cut: {clamped}", now)
        self._keep_schema(hb, schema_sent)
        effects = liveness.observe_heartbeat(self._state, hb, now)
        for outcome in effects.dropped:
            self._finish(outcome)
        for ev in effects.events:
            self._announce(ev)
        if effects.new_run:
            self._spawn(self._load_seq_floor(hb.job, hb.run_id), f"weaver-seq-{hb.job}")
        consumers = self._consumers()
        if consumers is not None and consumers.wanted(hb.job, hb.run_id, hb.rank, hb.incarnation):
            # A rank may only pull from the consumer the weaver makes for it (docs/security.md).
            self._spawn(
                consumers.ensure(hb.job, hb.run_id, hb.rank, hb.incarnation), f"weaver-consumer-{hb.job}"
            )
        self._note_read(now)

    def _note_read(self, now: float) -> None:
        """After a heartbeat: with none left queued, every one received so far is folded in."""
        if self._backlog() == 0:
            self._read_clock.drained(now)

    def _known_schema(
        self, job: str, rank: int, incarnation: str, knobs_hash: int
    ) -> tuple[KnobSpec, ...] | None:
        """The schema a heartbeat that sent only its hash gets (asked by the decoder once per change
        of the hash or values): its rank process's last (`liveness.known_schema`), else the one this
        weaver or its predecessor kept for that hash (a weaver that just started, or a last heartbeat
        without the schema, e.g. one another holder of the job's credential sent)."""
        state = self._state.jobs.get(job)
        specs = liveness.known_schema(state, rank, incarnation, knobs_hash) if state is not None else None
        if specs is None and (schemas := self._schemas()) is not None:
            specs = schemas.known(job, knobs_hash)
        return specs

    def _keep_schema(self, hb: Heartbeat, sent: bool) -> None:
        """Keep a schema sent in full (stored for the next weaver). For a hash-only heartbeat whose
        schema neither the rank's last heartbeat nor memory has, ask the bucket, off this path (a
        bucket that does not answer must not hold up heartbeats): the rank sends it in full only
        after a change and every 10 s, and its next heartbeat, 0.2 s on, finds it in memory."""
        schemas = self._schemas()
        if schemas is None:
            return
        if sent:
            if schemas.remember(hb) and self._running():  # stored by a task of the TaskGroup
                self._spawn(schemas.store(hb), f"weaver-schema-{hb.job}")
        elif hb.knobs_hash and not hb.knobs and self._running() and schemas.want(hb.job, hb.knobs_hash):
            self._spawn(schemas.fetch(hb.job, hb.knobs_hash), f"weaver-schema-{hb.job}")

    async def on_metrics(self, msg: Msg) -> None:
        # Unwatched, metrics are read only for the exporter's loss, and quietly, as they were dropped.
        watched = self._watched()
        if not (watched or self._metrics.serving or self._steering.active) or (
            watched and self._foreign("metrics", subjects.metrics_all(), msg)
        ):
            return
        now = time.time()
        if not watched and not self.metrics_due(msg.subject, now):
            return
        try:
            sm = wire.decode_metrics(msg.data)
        except ValueError as exc:
            if watched:
                self._refuse("metrics", "", "", f"malformed metrics on {msg.subject} refused: {exc}", now)
            return
        reason = admission.check_metrics(self._state, sm, msg.subject)
        if reason is not None:
            if watched:
                self._refuse("metrics", sm.job, sm.run_id, f"metrics on {msg.subject} refused: {reason}", now)
            return
        self._metrics.observe_step_metrics(sm)
        if self._steering.active:
            self._steering.on_metrics(sm, now)
        self._fan_out(sm)

    def metrics_due(self, subject: str, now: float) -> bool:
        """Unwatched, whether to read this report: a rank's at most every `METRICS_SAMPLE_S`, and
        while a policy runs, its job's lowest rank's (the series the autopilot follows) each time.
        Skipping costs a dict lookup, so the 10 Hz reports of 1,000 ranks are cheap to pass over."""
        if self._steering.active:
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

    async def on_event(self, msg: Msg) -> None:
        """A launcher's `naming.RUN_STOPPING` marks its run as stopping (`health_plan.note_stopping`),
        its `naming.RUN_ENDED` marks the run's ranks finished (`mark_run_ended`); every other event
        here is the weaver's own or a launcher's report, journaled as it is. Events come on the
        journal's capture subjects (`journal`), which only the weaver and launcher roles know: an
        answer aimed at the public subject through a reply subject never gets here."""
        if len(msg.data) > admission.MAX_MESSAGE_BYTES:
            return
        try:
            ev = wire.decode_event(msg.data)
            public = subjects.events(ev.job)
            if ev.kind not in (naming.RUN_STOPPING, naming.RUN_ENDED) or msg.subject != (
                self.journal.subject(public) if self.journal else public
            ):
                return
        except ValueError:
            return  # not ours to judge: the journal keeps it as published
        if ev.kind == naming.RUN_ENDED:
            marked = mark_run_ended(self._state, ev)
            if marked:
                log.info("run %s of job %s ended: ranks %s are no longer running", ev.run_id, ev.job, marked)
            return
        noted = health_plan.note_stopping(self._state, ev, time.time())
        if noted is not None:
            log.info("%s", noted.message)
            self._announce(noted)
