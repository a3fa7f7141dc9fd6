"""A person's answer to an autopilot proposal is journaled with who gave it: the gRPC caller's or the
NATS api's authenticated identity (`decided_by`), for an approval (whose commands then go out) and
for a refusal alike."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest

from torchloom.messages import JobEvent, Outcome, ProposalDecision, StepMetrics, SubmitRequest
from weaver.model import JobState, WeaverState
from weaver.steering import Steering

JOB = "j"
POLICY = (
    "approval = true\n"
    '[[rule]]\nname = "ckpt"\nwhen = "every_steps"\nsteps = 2\ncooldown_s = 0.0\nmax_per_hour = 100\n'
    'do = [{action = "checkpoint"}]\n'
)


def proposals(announced: list[JobEvent]) -> list[str]:
    return [e.attrs["proposal"] for e in announced if e.kind == "rule_proposed"]


def test_the_decision_event_names_who_decided() -> None:
    announced: list[JobEvent] = []
    spawned: list[str] = []

    async def submit(req: SubmitRequest) -> Outcome:
        raise AssertionError("spawn closes the send: nothing is submitted here")

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        spawned.append(name)
        coro.close()

    state = WeaverState()
    state.jobs[JOB] = JobState(job=JOB, run_id="r1", world_size=1, started_at_s=0.0)
    steering = Steering(state, None, announce=announced.append, submit=submit, spawn=spawn)
    steering.set_policy(JOB, POLICY)
    for step in range(1, 5):
        sm = StepMetrics(job=JOB, run_id="r1", rank=0, step=step, branch="main", values={"loss": 1.0})
        steering.on_metrics(sm, 100.0 + step)
    first, second = proposals(announced)
    assert not spawned  # held: nothing goes out before a person answers

    approved = steering.decide_request(
        ProposalDecision(job=JOB, proposal_id=first, approve=True), 200.0, 5.0, decided_by="ui-operator"
    )
    assert approved.kind == "rule_approved" and approved.attrs["decided_by"] == "ui-operator"
    assert approved.attrs["proposal"] == first and "decided by ui-operator" in approved.message
    assert announced[-1] == approved and spawned == ["weaver-rule-ckpt"]  # journaled, then sent

    refused = steering.decide_request(
        ProposalDecision(job=JOB, proposal_id=second, approve=False), 201.0, 5.0, decided_by="operator:me@h"
    )
    assert refused.kind == "rule_refused_by_operator" and refused.attrs["decided_by"] == "operator:me@h"
    assert announced[-1] == refused and len(spawned) == 1
    with pytest.raises(KeyError, match="no pending proposal"):
        steering.decide_request(ProposalDecision(job=JOB, proposal_id=first, approve=True), 202.0, 5.0)
