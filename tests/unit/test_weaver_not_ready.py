"""A weaver that just (re)started answers "not ready, try again" (never a rejection) for a submit its
ranks' next reports would decide: no rank reported yet, or a config change before any knob schema."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit import factories
from torchloom.errors import CommandRejected
from torchloom.messages import Action, ActionKind, KnobSpec, KnobType, SetConfig, SubmitRequest
from weaver import submits
from weaver.model import JobState, WeaverState

LR = KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, max=10.0, min_exclusive=True, value=0.01)
SET_LR = SetConfig(values={"lr": "0.005"})


def _job(s: WeaverState) -> JobState:
    return s.jobs[factories.JOB]


def test_a_job_known_only_from_the_journal_is_not_ready_while_warming_up() -> None:
    s = WeaverState()
    s.jobs[factories.JOB] = JobState(job=factories.JOB, run_id=factories.RUN, world_size=2, started_at_s=0.0)
    reason = submits.not_ready(_job(s), SET_LR, warming_up=True)
    assert reason is not None and "has not reported yet" in reason and "try again" in reason
    assert submits.not_ready(_job(s), Action(kind=ActionKind.CHECKPOINT), warming_up=True) is not None
    assert submits.not_ready(_job(s), SET_LR, warming_up=False) is None  # then the facts stand


def test_a_set_before_the_knob_schema_is_not_ready_not_unknown() -> None:
    s = factories.running()  # ranks heartbeat, but with no schema yet (it comes in full now and then)
    reason = submits.not_ready(_job(s), SET_LR, warming_up=True)
    assert reason is not None and "has not reported its knobs yet" in reason and "lr" in reason
    # What it spares the client: the definite rejection the same submit would get.
    with pytest.raises(CommandRejected, match="none reported yet"):
        submits.validate_body(_job(s), SET_LR)
    # An action needs no knobs: it is judged at once.
    assert submits.not_ready(_job(s), Action(kind=ActionKind.CHECKPOINT), warming_up=True) is None
    # Warmed up, a job without that knob is told so (the rejection stands).
    assert submits.not_ready(_job(s), SET_LR, warming_up=False) is None


def test_once_the_schema_came_a_set_is_judged_even_while_warming_up() -> None:
    s = factories.running(knobs=(LR,))
    assert submits.not_ready(_job(s), SET_LR, warming_up=True) is None
    assert submits.not_ready(_job(s), SetConfig(values={"lr": "-1"}), warming_up=True) is None
    with pytest.raises(CommandRejected, match="lr"):
        submits.plan_submit(
            s, SubmitRequest(job=factories.JOB, body=SetConfig(values={"lr": "-1"})), 100.0, 5.0
        )


def test_a_set_to_a_job_whose_schema_hash_the_weaver_lacks_is_not_ready_at_any_age() -> None:
    """Ranks send the schema in full only after a change and every few seconds: a weaver past its
    warm-up that still lacks it (the schema bucket did not answer during a server restart) must not
    reject `set lr` as an unknown knob of a job that has it (the chaos test saw such false
    rejections)."""
    s = factories.running()
    for entry in _job(s).ranks.values():
        entry.heartbeat = dataclasses.replace(entry.heartbeat, knobs_hash=0x1234)
    reason = submits.not_ready(_job(s), SET_LR, warming_up=False)
    assert reason is not None and "0000000000001234" in reason and "try again" in reason
    assert submits.not_ready(_job(s), Action(kind=ActionKind.CHECKPOINT), warming_up=False) is None
    s_known = factories.running(knobs=(LR,))
    for entry in _job(s_known).ranks.values():
        entry.heartbeat = dataclasses.replace(entry.heartbeat, knobs_hash=0x1234)
    assert submits.not_ready(_job(s_known), SET_LR, warming_up=False) is None  # known: judged
