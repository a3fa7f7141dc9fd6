"""A new weaver (a restart, a standby taking over) does not hold its predecessor's pending proposals:
it journals one `proposal_dropped` event for each proposal the journal shows pending, so the person
waiting on it is told; answered ones, ones already dropped, and ones a later policy_set took are left
alone. And an agent's free-text reason is journaled with its proposal, bounded and without control
characters."""

from __future__ import annotations

import json

from tests.unit.test_policy_persistence import steering
from torchloom.messages import (
    Action,
    ActionKind,
    Issuer,
    JobEvent,
    KnobSpec,
    KnobType,
    SetConfig,
    StepMetrics,
    SubmitRequest,
)
from weaver import agents, autopilot, rules
from weaver import signals as sg
from weaver.model import JobState

APPROVAL = (
    'name = "careful"\napproval = true\n[[rule]]\nname = "nan"\nwhen = "nonfinite"\ncooldown_s = 0.0\n'
    'max_per_hour = 100\ndo = [{set = {lr = "x0.5"}}]\n'
)


def job_state(job: str = "j") -> JobState:
    state = JobState(job=job, run_id="r1", world_size=1, started_at_s=0.0)
    state.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=0.1),)
    return state


def nan_report(job: str, step: int) -> sg.Sample:
    return sg.sample_of(
        StepMetrics(job=job, run_id="r1", rank=0, step=step, branch="main", values={"loss": float("nan")})
    )


def test_a_new_weaver_journals_each_pending_proposal_it_dropped_once() -> None:
    journal: list[object] = [JobEvent(job="j", kind="run_started")]
    job = job_state()
    pilot = autopilot.Pilot(policy=rules.parse(APPROVAL, source="careful.toml"), run_id="r1")
    proposals = []
    for step in (10, 20, 30):
        (firing,) = autopilot.on_metrics(pilot, job, nan_report("j", step), now=float(step)).firings
        assert firing.mode is autopilot.Mode.PROPOSED
        journal.append(firing.event)
        proposals.append(firing.proposal_id)
    journal.append(autopilot.approve(pilot, proposals[0], job, now=31.0).event)  # answered
    agent_req = SubmitRequest(
        body=SetConfig(values={"lr": 0.05}), job="j", issuer=Issuer(kind="agent", identity="agent:bot")
    )
    agent = agents.propose(pilot, job, agent_req, now=32.0)
    assert isinstance(agent, autopilot.Firing) and agent.mode is autopilot.Mode.PROPOSED
    journal.append(agent.event)
    # Job k's proposal went with its policy set again: the page already shows it expired.
    other = job_state("k")
    k_pilot = autopilot.Pilot(policy=rules.parse(APPROVAL, source="careful.toml"), run_id="r1")
    (k_firing,) = autopilot.on_metrics(k_pilot, other, nan_report("k", 5), now=5.0).firings
    journal += [k_firing.event, JobEvent(job="k", kind=autopilot.POLICY_SET, time_s=6.0)]

    announced: list[JobEvent] = []
    steering(announced).recover(journal)
    dropped = [e for e in announced if e.kind == autopilot.PROPOSAL_DROPPED]
    assert [e.attrs["proposal"] for e in dropped] == [proposals[1], proposals[2], agent.proposal_id]
    rule_drop, _, agent_drop = dropped
    assert rule_drop.job == "j" and rule_drop.run_id == "r1" and rule_drop.attrs["source"] == "rule"
    assert rule_drop.attrs["rule"] == "nan" and rule_drop.attrs["reason"] == "weaver_restarted"
    assert f"proposal {proposals[1]} of rule nan dropped: the weaver restarted" in rule_drop.message
    assert "nothing was sent" in rule_drop.message
    assert agent_drop.attrs["source"] == "agent" and agent_drop.attrs["agent"] == "agent:bot"
    assert agent_drop.command_id == agent_req.command_id
    # The next weaver reads those events too: nothing is dropped twice.
    again: list[JobEvent] = []
    steering(again).recover([*journal, *announced])
    assert not [e for e in again if e.kind == autopilot.PROPOSAL_DROPPED]


def test_an_agent_s_reason_is_journaled_with_its_proposal_bounded_and_printable() -> None:
    job = job_state()
    pilot = autopilot.Pilot(policy=autopilot.NO_RULES, run_id="r1")
    reason = "loss\x1b[31m plateaued\nsince step 200;\ttry a lower lr " + "x" * 900
    req = SubmitRequest(
        body=Action(kind=ActionKind.CHECKPOINT),
        job="j",
        issuer=Issuer(kind="agent", identity="agent:bot"),
        reason=reason,
    )
    sent = agents.propose(pilot, job, req, now=1.0)
    assert isinstance(sent, autopilot.Firing) and sent.mode is autopilot.Mode.SEND
    journaled = sent.event.attrs["agent_reason"]
    assert journaled.startswith("loss [31m plateaued since step 200; try a lower lr xxx")
    assert len(journaled) == agents.MAX_REASON_CHARS and journaled.isprintable()
    assert "the agent says: loss [31m plateaued since step 200" in sent.event.message
    # A refused proposal keeps the agent's reason beside the guardrail's.
    again = agents.propose(pilot, job, req, now=2.0)  # within the agent cool-down
    assert isinstance(again, JobEvent) and again.kind == "agent_refused"
    assert "cooling down" in again.attrs["reason"] and again.attrs["agent_reason"] == journaled
    assert json.loads(again.attrs["commands"]) == [{"action": "checkpoint"}]
    # No reason given: none journaled.
    plain = agents.propose(pilot, job_state(), SubmitRequest(body=req.body, job="j", issuer=req.issuer), 99.0)
    assert isinstance(plain, autopilot.Firing) and "agent_reason" not in plain.event.attrs


def test_the_reason_rides_the_submit_on_the_wire() -> None:
    from torchloom import wire

    req = SubmitRequest(
        body=SetConfig(values={"lr": 0.01}), job="j", command_id="c1", reason="the loss oscillates"
    )
    assert wire.decode_submit_request(wire.encode(req)) == req
