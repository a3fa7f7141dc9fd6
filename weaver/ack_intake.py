"""The weaver's ack intake and outcome delivery: each rank's ack from the durable feed (and the public
ack subject) checked by `weaver.admission` and folded into its command by `weaver.outcomes`, a rank's
notice about a decided command journaled (`weaver.notices`), a recovered run's commands decided from
the acks stream (`weaver.recovery`), and every decision delivered: to its waiting submitter, watchers,
the journal and the events, the acks it was made of acknowledged to JetStream only once it is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg

from torchloom import subjects, wire
from torchloom.messages import Ack, JobEvent, Outcome, WatchEvent
from weaver import admission, dedupe, notices, outcomes, recovery
from weaver.acks import RETRY, AckFeed, CommandKey, Retry
from weaver.config import WeaverConfig
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState
from weaver.streams import Outbox, Streams

log = logging.getLogger(__name__)

# Acks are read from this long before a recovered command's publish time: the acks stream's clock is
# the server's, the command's that of the weaver that published it.
STORED_ACKS_SLACK_S = 60.0

__all__ = ["STORED_ACKS_SLACK_S", "AckIntake"]


class AckIntake:
    """Takes the ranks' acks in and delivers the weaver's decisions (`finish`).

    Args:
        state: the weaver's state (acks fold into it; decisions are remembered in it).
        config: the weaver's config (journal, command_timeout_s, the acks consumer's name).
        metrics: the weaver's Prometheus metrics (every decision).
        outbox: where journal entries and events are queued for publishing.
        streams: the weaver's JetStream streams (asserts the weaver is started).
        answer: hand a decision to the submitter waiting for it.
        warming_up: whether the weaver started too recently to judge an ack of a rank not heard yet.
        foreign: count a message of a subject its subscription does not name, True if so.
        refuse: count and announce a refused message.
        fan_out: send a live event (not journaled) to watchers.
        announce: journal an event and send it to watchers.
        spawn: run a coroutine in the weaver's TaskGroup under a name.
    """

    def __init__(
        self,
        state: WeaverState,
        config: WeaverConfig,
        metrics: WeaverMetrics,
        outbox: Outbox,
        *,
        streams: Callable[[], Streams],
        answer: Callable[[Outcome], None],
        warming_up: Callable[[float], bool],
        foreign: Callable[[str, str, Msg], bool],
        refuse: admission.Refuse,
        fan_out: Callable[[WatchEvent], None],
        announce: Callable[[JobEvent], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self._state = state
        self._config = config
        self._metrics = metrics
        self._outbox = outbox
        self._streams = streams
        self._answer = answer
        self._warming_up = warming_up
        self._foreign = foreign
        self._refuse = refuse
        self._fan_out = fan_out
        self._announce = announce
        self._spawn = spawn
        self._notices = notices.Notices()
        # The durable acks feed (started and stopped by the weaver), each ack handed to `take_ack`.
        self.feed = AckFeed(config.acks_consumer, self.take_ack, take_over=config.acks_take_over)

    def finish(self, outcome: Outcome) -> None:
        """Deliver a decision: to its waiting submitters, watchers, the journal and the events.

        The journal entry carries a msg id per seq (per command id for a refusal), so a decision
        published again (a retry, or a restarted weaver completing the same command) is stored once;
        the acks it was made of are acknowledged to JetStream only once it is stored.
        """
        dedupe.remember(self._state, outcome)
        self._metrics.observe_outcome(outcome)
        self._answer(outcome)
        self._fan_out(outcome)
        cmd = outcome.command
        key: CommandKey | None = (cmd.job, cmd.run_id, cmd.seq) if cmd is not None else None

        async def release() -> None:
            if key is not None:
                await self.feed.release(key)

        if self._config.journal:
            if key is not None:
                self.feed.hold(key)
            subject = subjects.journal(outcome.job or admission.WEAVER_JOB)
            msg_id = dedupe.journal_msg_id(outcome)
            self._outbox.put(subject, wire.encode(outcome), msg_id=msg_id, keep=True, then=release)
        else:
            self._spawn(release(), "weaver-release-acks")
        self._announce(outcomes.outcome_event(outcome, time.time()))
        searched = outcomes.search_event(outcome, time.time())
        if searched is not None:
            self._announce(searched)

    def take_ack(self, msg: Msg) -> CommandKey | Retry | None:
        """Fold one ack from the durable feed in. Returns the key of its command while that command's
        outcome is not journaled yet (the feed holds the message until then), RETRY while its rank
        has not reported since the weaver started, else None (acknowledged: of no more use)."""
        now = time.time()
        if self._foreign("ack", subjects.acks_all(), msg):
            return None
        too_big = admission.oversized("ack", len(msg.data), msg.subject)
        if too_big is not None:
            self._refuse("ack", "", "", too_big, now)
            return None
        try:
            ack = wire.decode_ack(msg.data)
        except ValueError as exc:
            self._refuse("ack", "", "", f"malformed ack on {msg.subject} refused: {exc}", now)
            return None
        job = self._state.jobs.get(ack.job)
        if job is not None and ack.rank not in job.ranks and self._warming_up(now):
            return RETRY  # an ack a previous weaver left: judge it once its rank has reported
        reason = admission.check_ack(self._state, ack, msg.subject)
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
        outcome = outcomes.record_ack(self._state, ack, now)
        if outcome is not None:
            self.finish(outcome)
            return key
        if self.feed.journaling(key):
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

    async def decide_recovered(self, job: str, run_id: str) -> None:
        """Journal the outcomes of the run's recovered commands that the acks stream decides: a
        predecessor may have decided them and died before its journal write landed, or before every
        ack reached it, and the ranks will not answer again (their acks may be refused now: the
        processes that sent them may be gone). Those whose acks the stream may have dropped end as
        TIMEOUT, saying so."""
        pending = self._state.jobs[job].pending.values()
        since = min(p.published_at_s for p in pending) - STORED_ACKS_SLACK_S
        stored = await self._streams().stored_acks(job, since_s=since)
        now = time.time()
        decided = recovery.replay_acks(self._state, job, run_id, stored.acks, now)
        decided += recovery.unanswerable(
            self._state, job, run_id, stored.dropped_until_s, self._config.command_timeout_s, now
        )
        for outcome in decided:
            log.warning(
                "journaling the outcome of %s #%d, left undecided by a previous weaver",
                job,
                outcome.command.seq if outcome.command else 0,
            )
            self.finish(outcome)
