"""The weaver believes only what fits: heartbeats, acks and metrics that contradict their subject or what
the weaver knows are refused with a reason (and change nothing); refusals are announced rate-limited;
dead jobs are evicted."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.factories import JOB, RUN, ack, heartbeat, running, set_config
from torchloom import subjects
from torchloom.messages import AckStatus, StepMetrics
from weaver import admission as ad
from weaver import liveness
from weaver.model import Pending

NOW = 100.0
DEAD = 1.0
LIMITS = ad.Limits(max_jobs=3, max_ranks_per_job=8, max_ranks_total=9, job_evict_after_s=60.0)


def _hb_check(state: object, hb: object, subject: str | None = None) -> str | None:
    assert not isinstance(hb, str)
    subject = subject or subjects.heartbeat(hb.job, hb.rank)  # type: ignore[attr-defined]
    return ad.check_heartbeat(state, hb, subject, NOW, DEAD, LIMITS)  # type: ignore[arg-type]


def test_a_fitting_heartbeat_is_admitted() -> None:
    assert _hb_check(running(), heartbeat(1)) is None


@pytest.mark.parametrize(
    ("hb", "subject", "reason"),
    [
        (heartbeat(1), subjects.heartbeat(JOB, 0), "does not match the body"),
        (heartbeat(1), subjects.heartbeat("other", 1), "does not match the body"),
        (heartbeat(7), None, r"rank 7 is outside \[0, 1\]"),
        (heartbeat(-5), None, r"rank -5 is outside"),
        (heartbeat(0, world=9), None, r"world_size=9 is outside \[1, 8\]"),
        (heartbeat(0, world=0), None, r"world_size=0 is outside"),
        (heartbeat(0, world=4), None, "differs from run r1's 2"),
        (heartbeat(0, run="evil"), None, "is not an attempt of run r1, which has live ranks"),
    ],
)
def test_heartbeats_that_do_not_fit_are_refused(hb: object, subject: str | None, reason: str) -> None:
    with_reason = _hb_check(running(), hb, subject)
    assert with_reason is not None
    import re

    assert re.search(reason, with_reason), with_reason


def test_an_attempt_of_the_run_or_a_run_of_a_dead_job_is_admitted() -> None:
    state = running()
    assert _hb_check(state, heartbeat(0, run=f"{RUN}-a1")) is None
    for entry in state.jobs[JOB].ranks.values():
        entry.last_seen_s = NOW - 10 * DEAD
    assert _hb_check(state, heartbeat(0, run="fresh")) is None


def test_new_jobs_and_ranks_beyond_the_limits_are_refused() -> None:
    state = running()
    for name in ("b", "c"):
        liveness.observe_heartbeat(state, heartbeat(0, job=name, world=4), NOW)
    assert "max_jobs" in (_hb_check(state, heartbeat(0, job="d")) or "")
    for r in range(1, 4):
        liveness.observe_heartbeat(state, heartbeat(r, job="b", world=4), NOW)
    for r in range(1, 3):
        liveness.observe_heartbeat(state, heartbeat(r, job="c", world=4), NOW)
    assert "max_ranks_total" in (_hb_check(state, heartbeat(3, job="c", world=4)) or "")
    assert _hb_check(state, heartbeat(2, job="c", world=4)) is None  # a known rank is no new entry


def test_last_seq_beyond_the_published_one_is_clamped() -> None:
    state = running()
    hb, reason = ad.clamp_last_seq(state, heartbeat(0, last_seq=1_000_000))
    assert hb.last_seq == 0 and reason is not None and "1000000" in reason
    same, none = ad.clamp_last_seq(state, heartbeat(0, last_seq=0))
    assert none is None and same.last_seq == 0


def _pending(state: object, seq: int = 1) -> None:
    job = state.jobs[JOB]  # type: ignore[attr-defined]
    job.last_seq = seq
    job.pending[seq] = Pending(command=set_config(seq, lr=0.1), world_size=2, submitted_at_s=NOW)


def test_acks_count_only_from_the_current_incarnation_for_a_published_seq() -> None:
    state = running()
    _pending(state)
    good = ack(1, 0, command_id=f"{RUN}-c1")
    assert ad.check_ack(state, good, subjects.acks(JOB)) is None
    refusals = {
        "subject": ad.check_ack(state, good, subjects.acks("other")),
        "incarnation": ad.check_ack(
            state, ack(1, 0, inc="forged", command_id=f"{RUN}-c1"), subjects.acks(JOB)
        ),
        "rank": ad.check_ack(state, ack(1, 5, command_id=f"{RUN}-c1"), subjects.acks(JOB)),
        "seq": ad.check_ack(state, ack(9, 0), subjects.acks(JOB)),
        "command id": ad.check_ack(state, ack(1, 0, command_id="other"), subjects.acks(JOB)),
    }
    assert all(reason is not None for reason in refusals.values()), refusals
    assert "never published" in (refusals["seq"] or "")
    assert "incarnation" in (refusals["incarnation"] or "")


def test_unverified_reports_from_a_current_rank_are_admitted_for_journaling() -> None:
    state = running()
    report = ack(5, 1, AckStatus.REJECTED, "bad signature", unverified=True)
    assert ad.check_ack(state, report, subjects.acks(JOB)) is None


def test_metrics_must_name_a_known_rank_on_their_own_subject() -> None:
    state = running()
    sm = StepMetrics(job=JOB, run_id=RUN, rank=1, step=3)
    assert ad.check_metrics(state, sm, subjects.metrics(JOB, 1)) is None
    assert ad.check_metrics(state, sm, subjects.metrics(JOB, 0)) is not None
    assert ad.check_metrics(state, dataclasses.replace(sm, rank=6), subjects.metrics(JOB, 6)) is not None


def test_dead_jobs_are_evicted_after_the_grace_period() -> None:
    state = running()
    assert ad.evict_dead_jobs(state, NOW + 30, DEAD, LIMITS) == ()
    _pending(state)
    assert ad.evict_dead_jobs(state, NOW + 61, DEAD, LIMITS) == ()  # a command in flight keeps it
    state.jobs[JOB].pending.clear()
    assert ad.evict_dead_jobs(state, NOW + 61, DEAD, LIMITS) == (JOB,)
    assert JOB not in state.jobs


def test_refusals_are_announced_once_per_interval_with_a_count() -> None:
    log = ad.Refusals(interval_s=1.0)
    first = log.note("heartbeat", "j", "r", "heartbeat refused: bad", NOW)
    assert first is not None and first.kind == "refused" and first.job == "j"
    assert first.message == "heartbeat refused: bad"
    assert all(log.note("heartbeat", f"x{i}", "r", "bad", NOW + 0.1) is None for i in range(1000))
    later = log.note("heartbeat", "nope.job", "", "bad", NOW + 1.5)
    assert later is not None and later.attrs["count"] == "1001" and later.job == ad.WEAVER_JOB
    assert "1000 more like it" in later.message
    assert log.total["heartbeat"] == 1002
    assert log.note("ack", "j", "r", "bad", NOW + 1.6) is not None  # kinds are limited apart
    assert log.note("ack", "j", "r", "bad", NOW + 1.7, key="ack rank 1") is not None  # and keys


def test_a_second_live_incarnation_of_a_rank_is_refused() -> None:
    state = running()
    assert "is alive as incarnation inc1" in (_hb_check(state, heartbeat(1, inc="forged")) or "")
    state.jobs[JOB].ranks[1].last_seen_s = NOW - 10 * DEAD
    assert _hb_check(state, heartbeat(1, inc="restarted")) is None


def test_a_message_over_the_bound_is_refused_naming_it() -> None:
    limit = ad.MAX_MESSAGE_BYTES
    assert ad.oversized("ack", limit, "torchloom.v1.ack.j") is None
    assert ad.oversized("ack", limit + 1, "torchloom.v1.ack.j") == (
        f"ack of {limit + 1} bytes on torchloom.v1.ack.j refused: at most {limit} bytes"
    )
