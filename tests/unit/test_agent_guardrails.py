"""Guardrails for agents: the policy's [agent] table, an agent's proposal judged by it (bounds from
the start value, forbidden actions, per-agent cool-down and hourly limit, dry run, approval, a
retry of a held proposal), a person's answer to an agent's proposal, and the agent token role."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from torchloom import tokens
from torchloom.messages import Action, ActionKind, Issuer, KnobSpec, KnobType, SetConfig, SubmitRequest
from weaver import agents, autopilot, rules
from weaver.autopilot import Firing, Mode
from weaver.model import JobState

AGENT = Issuer(kind="agent", identity="agent:bob")


def job_state(lr: float = 0.1) -> JobState:
    job = JobState(job="j", run_id="r1", world_size=2, started_at_s=0.0)
    job.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=lr),)
    return job


def pilot_of(text: str = "") -> autopilot.Pilot:
    policy = rules.parse(text, source="t.toml") if text else autopilot.NO_RULES
    return autopilot.Pilot(policy=policy, run_id="r1")


def req(body: SetConfig | Action, command_id: str = "c1", who: Issuer = AGENT) -> SubmitRequest:
    return SubmitRequest(body=body, job="j", issuer=who, command_id=command_id)


def set_lr(value: float, command_id: str = "c1") -> SubmitRequest:
    return req(SetConfig(values={"lr": value}), command_id)


# ---- the [agent] table -------------------------------------------------------------------------


def test_agent_guards_default_to_the_policy_and_override_it() -> None:
    policy = rules.parse(
        'approval = true\nallow = ["stop"]\n[bounds]\nlr = [0.5, 2.0]\nmomentum = [0.9, 1.0]\n'
        "[agent]\ncooldown_s = 0.0\nmax_per_hour = 3\n[agent.bounds]\nlr = [0.1, 1.0]\n",
        source="p.toml",
    )
    agent = policy.agent
    assert agent.cooldown_s == 0.0 and agent.max_per_hour == 3
    assert agent.guards.approval and agent.guards.allow == frozenset({ActionKind.STOP})
    assert agent.guards.bounds_of("lr") == (0.1, 1.0) and agent.guards.bounds_of("momentum") == (0.9, 1.0)
    assert policy.guards.bounds_of("lr") == (0.5, 2.0)  # the rules keep theirs
    plain = rules.parse('[agent]\ndry_run = true\nallow = ["fault_inject"]\n', source="q.toml")
    assert plain.agent.guards.dry_run and not plain.guards.dry_run
    assert plain.agent.cooldown_s == 10.0 and plain.agent.max_per_hour == 60


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nspeed = 1\n", "agent: unknown field(s) speed"),
        ("agent = 3\n", "expected a table [agent]"),
        ("[agent]\ncooldown_s = -1.0\n", "agent.cooldown_s"),
        ("[agent]\nmax_per_hour = 0\n", "agent.max_per_hour"),
        ('[agent]\nallow = ["pause"]\n', "agent: allow"),
        ("[agent.bounds]\nlr = [2.0, 3.0]\n", "agent: bounds.lr"),
    ],
)
def test_a_bad_agent_table_is_refused_naming_the_field(text: str, needle: str) -> None:
    with pytest.raises(rules.PolicyError, match=r"^p\.toml: ") as err:
        rules.parse(text, source="p.toml")
    assert needle in str(err.value)


# ---- a proposal judged -------------------------------------------------------------------------


def test_within_bounds_an_agent_proposal_is_sent_and_counted() -> None:
    pilot, job = pilot_of("[agent]\ncooldown_s = 0.0\n"), job_state(lr=0.1)
    result = agents.propose(pilot, job, set_lr(0.05), 100.0)
    assert isinstance(result, Firing) and result.mode is Mode.SEND and result.source == "agent"
    assert result.requests == (set_lr(0.05),)
    assert result.event.kind == "agent_sent" and result.event.attrs["agent"] == "agent:bob"
    assert list(pilot.fired_at["agent:bob"]) == [100.0]
    assert pilot.starts == {"lr": 0.1}


def test_bounds_are_factors_of_the_start_value_not_of_the_current_one() -> None:
    pilot, job = pilot_of("[agent]\ncooldown_s = 0.0\n[agent.bounds]\nlr = [0.5, 2.0]\n"), job_state(lr=0.1)
    assert isinstance(agents.propose(pilot, job, set_lr(0.2), 1.0), Firing)
    job.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=0.2),)  # it applied
    refused = agents.propose(pilot, job, set_lr(0.4, "c2"), 2.0)  # 2 x current, 4 x start
    assert not isinstance(refused, Firing)
    assert refused.kind == "agent_refused" and refused.attrs["stage"] == "guardrails"
    assert "lr=0.4 refused" in refused.attrs["reason"] and "[0.05, 0.2]" in refused.attrs["reason"]
    assert refused.attrs["agent"] == "agent:bob" and refused.command_id == "c2"
    assert json.loads(refused.attrs["commands"]) == [{"set": {"lr": 0.4}}]
    assert len(pilot.fired_at["agent:bob"]) == 1  # a refusal is not counted


def test_without_a_policy_the_default_bounds_and_forbidden_actions_hold() -> None:
    pilot, job = pilot_of(), job_state(lr=0.1)
    too_far = agents.propose(pilot, job, set_lr(5.0), 1.0)
    assert not isinstance(too_far, Firing) and "[0.001, 1]" in too_far.attrs["reason"]
    stop = agents.propose(pilot, job, req(Action(kind=ActionKind.STOP), "c2"), 2.0)
    assert not isinstance(stop, Firing)
    assert "action 'stop' is forbidden to automated issuers" in stop.attrs["reason"]


def test_an_allowed_action_goes_ahead() -> None:
    pilot = pilot_of('[agent]\ncooldown_s = 0.0\nallow = ["stop"]\n')
    result = agents.propose(pilot, job_state(), req(Action(kind=ActionKind.STOP)), 1.0)
    assert isinstance(result, Firing) and result.mode is Mode.SEND


def test_the_agent_cooldown_and_hourly_limit_are_per_agent() -> None:
    pilot, job = pilot_of("[agent]\ncooldown_s = 30.0\nmax_per_hour = 2\n"), job_state()
    assert isinstance(agents.propose(pilot, job, set_lr(0.11, "a"), 0.0), Firing)
    soon = agents.propose(pilot, job, set_lr(0.12, "b"), 10.0)
    assert not isinstance(soon, Firing)
    assert (
        "agent 'agent:bob' is cooling down" in soon.attrs["reason"]
        and "cooldown_s=30" in soon.attrs["reason"]
    )
    other = req(SetConfig(values={"lr": 0.12}), "c", Issuer(kind="agent", identity="agent:eve"))
    assert isinstance(agents.propose(pilot, job, other, 10.0), Firing)  # another agent's own limit
    assert isinstance(agents.propose(pilot, job, set_lr(0.13, "d"), 40.0), Firing)
    third = agents.propose(pilot, job, set_lr(0.14, "e"), 80.0)
    assert not isinstance(third, Firing) and "max_per_hour=2" in third.attrs["reason"]
    assert isinstance(agents.propose(pilot, job, set_lr(0.14, "f"), 3601.0), Firing)


def test_dry_run_journals_what_would_have_been_sent() -> None:
    pilot = pilot_of("[agent]\ndry_run = true\n")
    result = agents.propose(pilot, job_state(), set_lr(0.05), 1.0)
    assert isinstance(result, Firing) and result.mode is Mode.DRY_RUN
    assert result.event.kind == "agent_dry_run" and "would have sent (dry run)" in result.event.message
    assert not pilot.proposals


def test_approval_holds_the_proposal_until_a_person_answers() -> None:
    pilots = autopilot.Pilots(rules.parse("[agent]\napproval = true\n", source="t.toml"))
    job = job_state()
    pilot = pilots.agent_pilot(job)
    result = agents.propose(pilot, job, set_lr(0.05), 1.0)
    assert isinstance(result, Firing) and result.mode is Mode.PROPOSED
    assert result.event.kind == "agent_proposed" and result.event.attrs["proposal"] == result.proposal_id
    assert agents.held(pilot, "c1") is result and agents.held(pilot, "other") is None
    assert [e.kind for e in pilots.view("j").proposals] == ["agent_proposed"]
    approved = pilots.decide(job, result.proposal_id, approve_it=True, now=2.0)
    assert isinstance(approved, Firing) and approved.mode is Mode.SEND
    assert approved.requests == (set_lr(0.05),) and approved.event.kind == "agent_approved"
    assert "of agent agent:bob approved" in approved.event.message
    again = agents.propose(pilot, job, set_lr(0.06, "c2"), 100.0)
    assert isinstance(again, Firing)
    refused = pilots.decide(job, again.proposal_id, approve_it=False, now=101.0)
    assert not isinstance(refused, Firing) and refused.kind == "agent_refused_by_operator"


def test_a_job_without_a_policy_keeps_an_agent_pilot_and_a_policy_replaces_it() -> None:
    pilots, job = autopilot.Pilots(), job_state()
    pilot = pilots.agent_pilot(job)
    assert pilot.policy is autopilot.NO_RULES and pilots.agent_pilot(job) is pilot
    assert pilots.pilot(job) is None  # no rules are evaluated for it
    pilots.set_policy("j", rules.parse("[agent]\ncooldown_s = 1.0\n", source="t.toml"))
    assert pilots.agent_pilot(job).policy.agent.cooldown_s == 1.0


# ---- the agent token role ----------------------------------------------------------------------


def test_add_agent_writes_a_private_table_and_the_weaver_reads_it_again(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / tokens.FILE_NAME
    table = tokens.TokenTable.load_or_create(path)
    assert {e.role for e in table.entries} == set(tokens.BUILT_IN_ROLES)
    live = tokens.TokenFile(table, path)
    identity, token = tokens.add_agent("bob", path)
    assert identity == "agent:bob"
    assert (
        stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    )
    entry = live.table.entry(token)
    assert entry is not None and entry.role is tokens.TokenRole.AGENT and entry.identity == "agent:bob"
    assert live.table.entry(table.token(tokens.TokenRole.OPERATOR)) is not None
    _, second = tokens.add_agent("bob", path)  # a new token replaces the old one
    assert live.table.entry(token) is None and live.table.identify(second) == "agent:bob"
    assert tokens.remove_agent("bob", path) and not tokens.remove_agent("bob", path)
    assert live.table.entry(second) is None


def test_a_broken_table_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / tokens.FILE_NAME
    table = tokens.TokenTable.load_or_create(path)
    live = tokens.TokenFile(table, path)
    _, token = tokens.add_agent("bob", path)
    assert live.table.identify(token) == "agent:bob"
    path.write_text("{not json")
    assert live.table.identify(token) == "agent:bob"


@pytest.mark.parametrize("name", ["", "-x", "a b", "a:b", "x" * 65])
def test_a_bad_agent_name_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(tokens.TokenError, match="agent name"):
        tokens.add_agent(name, tmp_path / tokens.FILE_NAME)


def test_a_table_whose_agent_identity_lacks_the_prefix_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / tokens.FILE_NAME
    tokens.TokenTable.load_or_create(path)
    data = json.loads(path.read_text())
    data["tokens"].append({"role": "agent", "identity": "operator:me@host", "token": "t" * 40})
    path.write_text(json.dumps(data))
    with pytest.raises(tokens.TokenError, match="must start with 'agent:'"):
        tokens.TokenTable.load(path)
