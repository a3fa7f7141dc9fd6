"""The weaver's own lag is never blamed on a rank: liveness is judged at the time up to which every
heartbeat received was folded in (`liveness.ReadClock`), and a silent rank is still found dead. And
unwatched step metrics are read at a bounded rate per rank, the autopilot's lead rank every time
(`Telemetry.metrics_due`). No bus: the weaver is constructed, never started."""

from __future__ import annotations

import time
import types

from tests.unit.factories import heartbeat
from torchloom.messages import RankState
from weaver import health_plan, liveness
from weaver.config import WeaverConfig
from weaver.model import WeaverState
from weaver.service import Weaver
from weaver.telemetry import METRICS_SAMPLE_S

DEAD_S = 0.8


def test_in_time_the_clock_is_now() -> None:
    clock = liveness.ReadClock()
    clock.drained(100.0)
    assert clock.judged_at(101.0, backlog=0, tick_late_s=0.0, dead_after_s=DEAD_S) == 101.0


def test_with_a_backlog_the_clock_stays_where_the_queue_was_last_empty() -> None:
    clock = liveness.ReadClock()
    clock.drained(100.0)
    assert clock.judged_at(103.0, backlog=5000, tick_late_s=0.0, dead_after_s=DEAD_S) == 100.0
    # Behind since the start: no time is known to be read up to, so no verdict.
    assert liveness.ReadClock().judged_at(103.0, backlog=1, tick_late_s=0.0, dead_after_s=DEAD_S) is None


def test_a_late_tick_or_a_lost_connection_gives_no_verdict_then_the_gap_is_forgiven_once() -> None:
    clock = liveness.ReadClock()
    clock.drained(100.0)
    assert clock.judged_at(100.5, backlog=0, tick_late_s=DEAD_S, dead_after_s=DEAD_S) is None
    clock.disconnected(101.0)
    assert clock.judged_at(103.0, backlog=0, tick_late_s=0.0, dead_after_s=DEAD_S) is None
    clock.reconnected(104.0, DEAD_S)  # heartbeats of those 3 s are lost, not late
    assert clock.judged_at(104.5, backlog=0, tick_late_s=0.0, dead_after_s=DEAD_S) == 101.5
    assert clock.judged_at(105.0, backlog=0, tick_late_s=0.0, dead_after_s=DEAD_S) == 105.0


def test_a_rank_whose_heartbeat_waits_in_the_queue_is_not_dead_and_a_silent_one_is() -> None:
    state = WeaverState()
    policy = WeaverConfig(dead_after_s=DEAD_S).policy()
    for rank in (0, 1):
        liveness.observe_heartbeat(state, heartbeat(rank, world=2), 100.0)
    clock = liveness.ReadClock()
    clock.drained(100.0)
    # At 102 the weaver is 2 s behind: rank 0's heartbeats are queued; nothing is dead at the read clock.
    at = clock.judged_at(102.0, backlog=10_000, tick_late_s=0.0, dead_after_s=DEAD_S)
    assert at is not None
    assert [e for e in health_plan.check_health(state, at, policy).events if e.kind == "rank_dead"] == []
    # Caught up at 102.5: rank 0's heartbeat was in the queue, rank 1 really went silent at 100.
    liveness.observe_heartbeat(state, heartbeat(0, world=2), 102.5)
    clock.drained(102.5)
    at = clock.judged_at(102.6, backlog=0, tick_late_s=0.0, dead_after_s=DEAD_S)
    assert at is not None
    dead = [e for e in health_plan.check_health(state, at, policy).events if e.kind == "rank_dead"]
    assert [e.attrs.get("rank") for e in dead] == ["1"]


def test_unwatched_metrics_are_read_once_per_interval_per_rank() -> None:
    w = Weaver(WeaverConfig())
    subject0, subject1 = "torchloom.v1.metrics.j.0", "torchloom.v1.metrics.j.1"
    assert w.telemetry.metrics_due(subject0, 10.0) and w.telemetry.metrics_due(subject1, 10.0)
    assert not w.telemetry.metrics_due(subject0, 10.0 + METRICS_SAMPLE_S / 2)
    assert w.telemetry.metrics_due(subject0, 10.0 + METRICS_SAMPLE_S)


def test_while_a_policy_runs_the_lowest_rank_is_read_every_time() -> None:
    w = Weaver(WeaverConfig(autopilot_policy="default"))
    assert w.steering.active
    lead, other = "torchloom.v1.metrics.j.0", "torchloom.v1.metrics.j.3"
    assert all(w.telemetry.metrics_due(lead, 10.0 + k * 0.1) for k in range(5))
    assert w.telemetry.metrics_due(other, 10.0) and not w.telemetry.metrics_due(other, 10.1)


def test_silent_ranks_counts_unfinished_ranks_past_the_limit() -> None:
    state = WeaverState()
    for rank in range(3):
        liveness.observe_heartbeat(state, heartbeat(rank, world=3), 100.0)
    liveness.observe_heartbeat(state, heartbeat(0, world=3), 101.0)
    assert liveness.silent_ranks(state, 100.5, DEAD_S) == 0
    assert liveness.silent_ranks(state, 101.5, DEAD_S) == 2
    liveness.observe_heartbeat(state, heartbeat(1, world=3, state=RankState.FINISHED), 100.0)
    assert liveness.silent_ranks(state, 101.5, DEAD_S) == 1  # a finished rank stopped on purpose


def test_status_judges_liveness_at_the_read_clock_like_the_health_events() -> None:
    w = Weaver(WeaverConfig(dead_after_s=DEAD_S))
    now = time.time()
    for rank in (0, 1):
        liveness.observe_heartbeat(w.state, heartbeat(rank, world=2), now - 2.0)
    assert [r.alive for r in w.status().jobs[0].ranks] == [False, False]  # in time: both silent 2 s
    # 2 s behind with heartbeats queued (a subscription's backlog, as nats-py counts it): not dead.
    w._read_clock.drained(now - 2.0)
    w._heartbeats = types.SimpleNamespace(pending_msgs=5000)
    ranks = w.status().jobs[0].ranks
    assert [r.alive for r in ranks] == [True, True] and all(r.last_heartbeat_s < 0.5 for r in ranks)
