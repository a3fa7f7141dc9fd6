"""The autopilot's pure parts: signals from scripted metrics, the shipped default rules (each fires on
its signal and sends exactly its commands), policy validation and the guardrails (rate, bounds,
forbidden actions, dry run, approval)."""

from __future__ import annotations

import json
import math

import pytest

from torchloom.messages import Action, ActionKind, CheckpointInfo, KnobSpec, KnobType, SetConfig, StepMetrics
from weaver import autopilot, guardrails, rules
from weaver import signals as sg
from weaver.model import JobState

JOB = "j"


def job_state(lr: float = 0.1, checkpoints: tuple[tuple[str, int], ...] = ()) -> JobState:
    job = JobState(job=JOB, run_id="r1", world_size=2, started_at_s=0.0)
    job.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=lr),)
    for cid, step in checkpoints:
        job.registry.checkpoints[cid] = CheckpointInfo(id=cid, step=step, branch="main", seq=step)
    return job


def metrics(step: int, loss: float, *, rank: int = 0, bad: int = 0, step_time: float = 0.1) -> sg.Sample:
    values = {"loss": loss, "step_time_s": step_time, sg.NONFINITE_LOSS: float(bad)}
    return sg.sample_of(StepMetrics(job=JOB, run_id="r1", rank=rank, step=step, branch="main", values=values))


def policy(text: str) -> rules.Policy:
    return rules.parse(text, source="test.toml")


def only_rule(name: str, **guards: object) -> rules.Policy:
    base = rules.load("default")
    kept = tuple(r for r in base.rules if r.name == name)
    return rules.Policy(name="t", rules=kept, guards=rules.Guards(**{"bounds": base.guards.bounds, **guards}))  # type: ignore[arg-type]


def feed(
    pilot: autopilot.Pilot, job: JobState, samples: list[sg.Sample], t0: float = 1000.0
) -> autopilot.Decision:
    events: list[object] = []
    firings: list[autopilot.Firing] = []
    for i, s in enumerate(samples):
        d = autopilot.on_metrics(pilot, job, s, t0 + i)
        events.extend(d.events)
        firings.extend(d.firings)
    return autopilot.Decision(events=tuple(events), firings=tuple(firings))  # type: ignore[arg-type]


def bodies(decision: autopilot.Decision) -> list[list[object]]:
    return [[r.body for r in f.requests] for f in decision.firings]


# ---- the default rules ------------------------------------------------------------------------


def test_default_nonfinite_rolls_back_to_last_good_checkpoint_and_halves_lr() -> None:
    job = job_state(lr=0.1, checkpoints=(("ckpt-1", 10), ("ckpt-2", 30)))
    pilot = autopilot.Pilot(policy=only_rule("nonfinite-rollback"))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(10, 26, 2)] + [metrics(28, math.nan, bad=1)])
    assert bodies(d) == [
        [Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "ckpt-1"}), SetConfig(values={"lr": 0.05})]
    ]
    (firing,) = d.firings
    assert firing.mode is autopilot.Mode.SEND
    assert {r.issuer.kind for r in firing.requests} == {"rule"}
    assert {r.issuer.identity for r in firing.requests} == {"rule:nonfinite-rollback"}
    ev = firing.event
    assert ev.kind == "rule_fired" and ev.attrs["rule"] == "nonfinite-rollback"
    assert ev.attrs["signal"] == "nonfinite" and ev.attrs["last_good_step"] == "24"
    assert json.loads(ev.attrs["window"])[-1] == [28, None]
    assert json.loads(ev.attrs["commands"]) == [
        {"action": "rollback", "checkpoint": "ckpt-1"},
        {"set": {"lr": 0.05}},
    ]
    assert ev.command_id == firing.requests[0].command_id


def test_nonfinite_on_another_rank_counts_once_per_new_step() -> None:
    job = job_state(checkpoints=(("ckpt-1", 0),))
    pilot = autopilot.Pilot(policy=only_rule("nonfinite-rollback", bounds={}))
    d = feed(pilot, job, [metrics(1, 1.0), metrics(1, 1.0, rank=1, bad=1), metrics(2, 1.0, rank=1, bad=1)])
    assert len(d.firings) == 1  # the count did not rise again


def test_default_spike_halves_lr() -> None:
    job = job_state(lr=0.2)
    pilot = autopilot.Pilot(policy=only_rule("spike-halve-lr"))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(1, 10)] + [metrics(10, 5.0)])
    assert bodies(d) == [[SetConfig(values={"lr": 0.1})]]
    assert any(e.kind == "signal" and e.attrs["signal"] == "loss_spike" for e in d.events)


def test_default_plateau_decays_lr() -> None:
    job = job_state(lr=0.1)
    pilot = autopilot.Pilot(policy=only_rule("plateau-decay-lr"))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(0, 520, 10)])
    assert bodies(d) == [[SetConfig(values={"lr": pytest.approx(0.03)})]]
    assert d.firings[0].event.attrs["step"] == "500"


def test_default_periodic_checkpoint_every_100_steps() -> None:
    job = job_state()
    pilot = autopilot.Pilot(policy=only_rule("periodic-checkpoint"))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(0, 310, 25)])
    assert bodies(d) == [[Action(kind=ActionKind.CHECKPOINT)]] * 3
    assert [f.event.attrs["step"] for f in d.firings] == ["100", "200", "300"]


def test_divergence_and_throughput_drop_signals() -> None:
    track = sg.Track()
    for s in range(10):
        sg.observe(track, metrics(s, 1.0))
    for s in range(10, 60):
        sg.observe(track, metrics(s, 50.0, step_time=0.5))
    assert sg.detect(track, sg.Condition(signal=sg.Signal.DIVERGENCE, factor=10.0)) is not None
    assert sg.detect(track, sg.Condition(signal=sg.Signal.THROUGHPUT_DROP, factor=2.0)) is not None
    steady = sg.Track()
    for s in range(30):
        sg.observe(steady, metrics(s, 1.0))
    assert sg.detect(steady, sg.Condition(signal=sg.Signal.DIVERGENCE, factor=10.0)) is None
    assert sg.detect(steady, sg.Condition(signal=sg.Signal.THROUGHPUT_DROP, factor=2.0)) is None


def test_rollback_resets_the_series() -> None:
    track = sg.Track()
    for s in range(10):
        sg.observe(track, metrics(s, 1.0))
    sg.observe(
        track,
        sg.sample_of(StepMetrics(job=JOB, run_id="r1", rank=0, step=3, branch="b-9", values={"loss": 9.0})),
    )
    assert len(track.samples) == 1 and track.branch == "b-9"
    assert sg.detect(track, sg.Condition(signal=sg.Signal.LOSS_SPIKE, factor=3.0)) is None


# ---- guardrails ---------------------------------------------------------------------------------


def test_cooldown_and_max_per_hour_refuse() -> None:
    job = job_state(checkpoints=(("ckpt-1", 0),))
    pilot = autopilot.Pilot(policy=only_rule("nonfinite-rollback", bounds={"lr": (0.0001, 10.0)}))
    fired = 0
    refusals = []
    for i in range(1, 40):
        d = autopilot.on_metrics(pilot, job, metrics(i, math.nan, bad=i), 1000.0 + 5 * i)
        fired += len(d.firings)
        refusals += [e for e in d.events if e.kind == "rule_refused"]
    assert fired == 6  # cooldown 10 s at one report each 5 s would allow 19; max_per_hour=6
    assert refusals and "cooling down" in refusals[0].attrs["reason"]
    assert any("max_per_hour=6" in e.attrs["reason"] for e in refusals)


def test_bounds_refuse_moving_lr_below_start_over_100() -> None:
    job = job_state(lr=0.1, checkpoints=(("ckpt-1", 0),))
    pilot = autopilot.Pilot(policy=only_rule("spike-halve-lr"))
    autopilot.note_starts(pilot, job)
    job.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, value=0.0015),)  # halving gives 0.00075 < 0.001
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(1, 10)] + [metrics(10, 5.0)])
    assert d.firings == ()
    (refused,) = [e for e in d.events if e.kind == "rule_refused"]
    assert "within [0.001, 1]" in refused.attrs["reason"]


def test_forbidden_actions() -> None:
    guards = rules.Guards()
    assert guardrails.action_refusal(Action(kind=ActionKind.STOP), guards) is not None
    assert guardrails.action_refusal(Action(kind=ActionKind.DATA_ADD), guards) is not None
    assert guardrails.action_refusal(Action(kind=ActionKind.FAULT_INJECT), guards) is not None
    assert guardrails.action_refusal(Action(kind=ActionKind.CHECKPOINT), guards) is None
    allowed = rules.Guards(allow=frozenset({ActionKind.STOP}))
    assert guardrails.action_refusal(Action(kind=ActionKind.STOP), allowed) is None
    bad = '[[rule]]\nname = "s"\nwhen = "nonfinite"\ndo = [{action = "stop"}]\n'
    with pytest.raises(rules.PolicyError, match=r'forbidden to rules; add it to allow = \["stop"\]'):
        policy(bad)
    assert policy('allow = ["stop"]\n' + bad).rules[0].do == (rules.ActionStep(kind=ActionKind.STOP),)


def test_dry_run_sends_nothing_and_journals_what_it_would_have_sent() -> None:
    job = job_state(lr=0.2)
    pilot = autopilot.Pilot(policy=only_rule("spike-halve-lr", dry_run=True))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(1, 10)] + [metrics(10, 5.0)])
    (firing,) = d.firings
    assert firing.mode is autopilot.Mode.DRY_RUN
    assert firing.event.kind == "rule_dry_run" and "would have sent" in firing.event.message
    assert json.loads(firing.event.attrs["commands"]) == [{"set": {"lr": 0.1}}]


def test_approval_waits_for_a_person() -> None:
    job = job_state(lr=0.2)
    pilot = autopilot.Pilot(policy=only_rule("spike-halve-lr", approval=True))
    d = feed(pilot, job, [metrics(s, 1.0) for s in range(1, 10)] + [metrics(10, 5.0)])
    (firing,) = d.firings
    assert firing.mode is autopilot.Mode.PROPOSED and firing.event.kind == "rule_proposed"
    pid = firing.proposal_id
    assert firing.event.attrs["proposal"] == pid and set(pilot.proposals) == {pid}
    approved = autopilot.approve(pilot, pid, job, 2000.0)
    assert approved.mode is autopilot.Mode.SEND and approved.requests == firing.requests
    assert approved.event.kind == "rule_approved"
    with pytest.raises(KeyError):
        autopilot.approve(pilot, pid, job, 2001.0)
    d2 = feed(pilot, job, [metrics(s, 1.0) for s in range(11, 20)] + [metrics(20, 50.0)], t0=5000.0)
    refused = autopilot.refuse(pilot, d2.firings[0].proposal_id, job, 6000.0)
    assert refused.kind == "rule_refused_by_operator" and not pilot.proposals


def test_rollback_without_checkpoint_is_refused_with_reason() -> None:
    job = job_state()
    pilot = autopilot.Pilot(policy=only_rule("nonfinite-rollback"))
    d = feed(pilot, job, [metrics(5, 1.0), metrics(6, math.inf, bad=1)])
    assert d.firings == ()
    assert "no checkpoint taken at or before step 5" in d.events[-1].attrs["reason"]


# ---- policy validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[rule]]\nname = 'a'\nwhen = 'bogus'\ndo = [{action = 'checkpoint'}]",
            "when: 'bogus' rejected: expected one of",
        ),
        (
            "[[rule]]\nname = 'a'\nwhen = 'loss_spike'\nfactor = 0.5\ndo = [{action = 'checkpoint'}]",
            "factor: 0.5 rejected",
        ),
        ("[[rule]]\nname = 'a'\nwhen = 'nonfinite'\ndo = []", "do: [] rejected: expected a non-empty list"),
        ("[[rule]]\nname = 'a'\nwhen = 'nonfinite'\ndo = [{set = {lr = 'half'}}]", "set.lr: 'half' rejected"),
        (
            "[[rule]]\nname = 'a'\nwhen = 'nonfinite'\ndo = [{action = 'rollback'}]",
            "rollback needs checkpoint",
        ),
        (
            "[[rule]]\nname = 'a'\nwhen = 'nonfinite'\ncooldown = 1\ndo = [{action = 'eval'}]",
            "unknown field(s) cooldown",
        ),
        ("[bounds]\nlr = [2.0, 3.0]", "LOW <= 1 <= HIGH"),
        ("dry_run = 'yes'", "dry_run: 'yes' rejected: expected true or false"),
        ("not toml [", "not TOML"),
    ],
)
def test_policy_errors_name_the_field_and_form(text: str, message: str) -> None:
    with pytest.raises(rules.PolicyError, match=r"^test\.toml: ") as info:
        policy(text)
    assert message in str(info.value)


def test_default_policy_is_the_issue_s_list() -> None:
    p = rules.load("default")
    assert {r.name: r.condition.signal for r in p.rules} == {
        "periodic-checkpoint": sg.Signal.EVERY_STEPS,
        "nonfinite-rollback": sg.Signal.NONFINITE,
        "spike-halve-lr": sg.Signal.LOSS_SPIKE,
        "plateau-decay-lr": sg.Signal.PLATEAU,
        "runaway-update-rollback": sg.Signal.UPDATE_RATIO,
        "hot-update-halve-lr": sg.Signal.UPDATE_RATIO,
    }
    assert p.knobs == {"report_update_ratio": 25}  # what the update ratio rules read
    # A checkpoint before the first optimizer step, which runaway-update-rollback goes back to.
    assert p.start == (rules.ActionStep(kind=ActionKind.CHECKPOINT, args={"tag": "start"}),)
    assert p.holds_at_start
    assert not p.guards.dry_run and not p.guards.approval and p.guards.bounds["lr"] == (0.01, 10.0)


# ---- wire, config and command line ------------------------------------------------------------


def test_policy_messages_roundtrip() -> None:
    from torchloom import wire
    from torchloom.messages import JobEvent, PolicyReply, PolicyRequest, ProposalDecision

    req = PolicyRequest(job="j", text="name = 'x'\n")
    assert wire.decode_policy_request(wire.encode(req)) == req
    ev = JobEvent(
        job="j", run_id="r", kind="rule_proposed", message="m", time_s=1.0, attrs={"proposal": "p1"}
    )
    reply = PolicyReply(job="j", name="x", text="t", proposals=(ev,))
    assert wire.decode_policy_reply(wire.encode(reply)) == reply
    dec = ProposalDecision(job="j", proposal_id="p1", approve=True)
    assert wire.decode_proposal_decision(wire.encode(dec)) == dec


def test_weaver_config_checks_its_policy(tmp_path: object) -> None:
    from pathlib import Path

    from weaver.config import WeaverConfig

    assert WeaverConfig(autopilot_policy="default").autopilot() is not None
    assert WeaverConfig().autopilot() is None
    bad = Path(str(tmp_path)) / "bad.toml"
    bad.write_text("[[rule]]\nname = 'a'\nwhen = 'nope'\ndo = [{action = 'checkpoint'}]\n")
    with pytest.raises(ValueError, match=r"bad\.toml: rule 'a'\.when: 'nope' rejected"):
        WeaverConfig(autopilot_policy=str(bad))


def test_run_policy_option() -> None:
    from torchloom.app import run_args
    from torchloom.app.health_options import UsageError

    spec = run_args.split_run_args(["--policy", "default", "train.py"])
    assert spec.policy == "default"
    with pytest.raises(UsageError, match=r"--policy /nonexistent\.toml: policy file"):
        run_args.split_run_args(["--policy", "/nonexistent.toml", "train.py"])


def test_pilots_follow_set_policy_and_default() -> None:
    default = rules.load("default")
    pilots = autopilot.Pilots(default)
    job = job_state(checkpoints=(("ckpt-1", 0),))
    assert pilots.active and pilots.policy_of(JOB) is default
    pilots.set_policy(JOB, None)  # a replay: no rules even under a default
    assert pilots.on_metrics(job, metrics(1, math.nan, bad=1), 1.0).firings == ()
    assert pilots.view(JOB).name == ""
    pilots.set_policy(JOB, only_rule("nonfinite-rollback"))
    assert len(pilots.on_metrics(job, metrics(2, math.nan, bad=2), 2.0).firings) == 1
    with pytest.raises(KeyError, match="no pending proposal 'nope'"):
        pilots.decide(job, "nope", approve_it=True, now=3.0)
