"""The default policy's answer to a run that trains steadily at far too high an lr: its `[knobs]`
(report_update_ratio, set once per run by the weaver as issuer rule:<policy>), the
`hot-update-halve-lr` rule on two update-to-weight ratios in a row over 1e-2, and its cool-down in
steps; each fires on a scripted signal and sends exactly its commands."""

from __future__ import annotations

import pytest

from torchloom.messages import KnobSpec, KnobType, SetConfig, StepMetrics
from weaver import autopilot, rules
from weaver import signals as sg
from weaver.model import JobState

JOB = "j"
RATIO_KNOB = "report_update_ratio"


def job_state(lr: float = 0.09, every: int | None = 25, run_id: str = "r1") -> JobState:
    job = JobState(job=JOB, run_id=run_id, world_size=1, started_at_s=0.0)
    specs = [KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=lr)]
    if every is not None:
        specs.append(KnobSpec(name=RATIO_KNOB, type=KnobType.INT, min=0, max=10**6, value=every))
    job.knobs = tuple(specs)
    return job


def set_lr(job: JobState, lr: float) -> None:
    """What the ranks report once a set lr applied."""
    job.knobs = tuple(
        KnobSpec(name=k.name, type=k.type, min=k.min, value=lr) if k.name == "lr" else k for k in job.knobs
    )


def report(step: int, ratio: float | None = None, count: int = 0, branch: str = "main") -> sg.Sample:
    values = {"loss": 2.0}
    if ratio is not None:
        values |= {sg.UPDATE_RATIO: ratio, sg.UPDATE_RATIO_COUNT: float(count)}
    return sg.sample_of(StepMetrics(job=JOB, run_id="r1", rank=0, step=step, branch=branch, values=values))


def default_only(*names: str, **guards: object) -> rules.Policy:
    """The shipped default, keeping only the named rules (its [knobs] and bounds as shipped)."""
    base = rules.load("default")
    kept = tuple(r for r in base.rules if r.name in names)
    g = rules.Guards(**{"bounds": base.guards.bounds, **guards})  # type: ignore[arg-type]
    return rules.Policy(name=base.name, rules=kept, guards=g, knobs=base.knobs)


def measured(every: int, ratios: list[float], first: int = 3) -> list[sg.Sample]:
    """One report per measurement, `every` steps apart from step `first`, counts from 1."""
    return [report(first + i * every, r, i + 1) for i, r in enumerate(ratios)]


# ---- the policy's [knobs] ------------------------------------------------------------------------


def test_default_knobs_are_set_once_per_run_as_the_policy() -> None:
    job = job_state(every=0)
    pilot = autopilot.Pilot(policy=default_only())
    first = autopilot.on_metrics(pilot, job, report(1), 10.0)
    (firing,) = first.firings
    assert [r.body for r in firing.requests] == [SetConfig(values={RATIO_KNOB: 25})]
    assert {(r.issuer.kind, r.issuer.identity) for r in firing.requests} == {("rule", "rule:default")}
    assert firing.mode is autopilot.Mode.SEND
    ev = firing.event
    assert ev.kind == "rule_fired" and ev.attrs["rule"] == "default" and ev.attrs["signal"] == "knobs"
    assert ev.attrs["step"] == "1" and ev.attrs["commands"] == '[{"set": {"report_update_ratio": 25}}]'
    assert ev.command_id == firing.requests[0].command_id
    # Given once: later reports of the run (even before the set applied) send nothing more.
    assert autopilot.on_metrics(pilot, job, report(2), 11.0).firings == ()


def test_knobs_already_in_effect_are_not_sent_again() -> None:
    # A standby that took over starts its pilot afresh: the run already measures every 25 steps.
    pilot = autopilot.Pilot(policy=default_only())
    d = autopilot.on_metrics(pilot, job_state(every=25), report(40), 10.0)
    assert d.firings == () and d.events == ()


def test_a_knob_the_run_does_not_report_waits_and_is_named_once() -> None:
    job = job_state(every=None)  # e.g. no optimizer attached yet: no report_update_ratio knob
    pilot = autopilot.Pilot(policy=default_only())
    d = autopilot.on_metrics(pilot, job, report(1), 10.0)
    assert d.firings == ()
    (ev,) = d.events
    assert ev.kind == "policy_knobs_waiting" and ev.attrs["knobs"] == '["report_update_ratio"]'
    assert "report_update_ratio" in ev.message
    assert autopilot.on_metrics(pilot, job, report(2), 11.0).events == ()  # named once
    job.knobs = job_state(every=0).knobs  # the knob appears
    (firing,) = autopilot.on_metrics(pilot, job, report(3), 12.0).firings
    assert [r.body for r in firing.requests] == [SetConfig(values={RATIO_KNOB: 25})]


def test_knobs_follow_the_policy_mode() -> None:
    dry = autopilot.Pilot(policy=default_only(dry_run=True))
    (f,) = autopilot.on_metrics(dry, job_state(every=0), report(1), 10.0).firings
    assert f.mode is autopilot.Mode.DRY_RUN and f.event.kind == "rule_dry_run"
    held = autopilot.Pilot(policy=default_only(approval=True))
    (f,) = autopilot.on_metrics(held, job_state(every=0), report(1), 10.0).firings
    assert f.mode is autopilot.Mode.PROPOSED and f.proposal_id in held.proposals


def test_a_new_run_is_given_the_knobs_again() -> None:
    pilots = autopilot.Pilots(default_only())
    assert len(pilots.on_metrics(job_state(every=0), report(1), 10.0).firings) == 1
    assert pilots.on_metrics(job_state(every=0), report(2), 11.0).firings == ()
    assert len(pilots.on_metrics(job_state(every=0, run_id="r2"), report(1), 12.0).firings) == 1


# ---- hot-update-halve-lr ---------------------------------------------------------------------------


def run_rule(
    job: JobState, samples: list[sg.Sample], policy: rules.Policy | None = None
) -> autopilot.Decision:
    """Feed the reports; every set lr the rule sends is applied before the next report."""
    pilot = autopilot.Pilot(policy=policy or default_only("hot-update-halve-lr"))
    events: list[object] = []
    firings: list[autopilot.Firing] = []
    for i, s in enumerate(samples):
        d = autopilot.on_metrics(pilot, job, s, 1000.0 + i)
        events += d.events
        for f in d.firings:
            firings.append(f)
            for r in f.requests:
                assert isinstance(r.body, SetConfig)
                if "lr" in r.body.values:
                    set_lr(job, float(r.body.values["lr"]))  # type: ignore[arg-type]
    return autopilot.Decision(events=tuple(events), firings=tuple(firings))  # type: ignore[arg-type]


def test_hot_updates_halve_lr_at_each_measurement_after_two_in_a_row() -> None:
    # The first measurement alone (Adam's first steps: every weight moves by about lr) fires nothing.
    job = job_state(lr=0.09)
    d = run_rule(job, measured(25, [0.7, 0.04, 0.03, 0.02, 0.012, 0.008, 0.009]))
    assert [[r.body for r in f.requests] for f in d.firings] == [
        [SetConfig(values={"lr": pytest.approx(0.045)})],
        [SetConfig(values={"lr": pytest.approx(0.0225)})],
        [SetConfig(values={"lr": pytest.approx(0.01125)})],
        [SetConfig(values={"lr": pytest.approx(0.005625)})],
    ]
    assert [f.event.attrs["step"] for f in d.firings] == ["28", "53", "78", "103"]
    first = d.firings[0]
    assert {r.issuer.identity for r in first.requests} == {"rule:hot-update-halve-lr"}
    assert first.event.attrs["signal"] == "update_ratio" and first.event.attrs["threshold"] == "0.01"


def test_a_healthy_run_is_left_alone() -> None:
    # A good lr: over the bound only in Adam's first steps, then around 5e-3.
    job = job_state(lr=3e-3)
    d = run_rule(job, measured(25, [0.02, 0.0075, 0.011, 0.006, 0.005, 0.004]))
    assert d.firings == ()
    assert job.knobs[0].value == 3e-3


def test_halving_stops_at_the_lr_bound() -> None:
    # Six halvings fit in [0.01, 10] x the start value (1/64 > 1/100); the seventh is refused.
    job = job_state(lr=0.1)
    d = run_rule(job, measured(25, [0.5] * 9))
    assert len(d.firings) == 6 and job.knobs[0].value == pytest.approx(0.1 / 64)
    refused = [e for e in d.events if getattr(e, "kind", "") == "rule_refused"]
    assert refused and "within [0.001, 1]" in refused[0].attrs["reason"]


def test_cooldown_counts_steps_and_restarts_on_a_new_branch() -> None:
    job = job_state(lr=0.09)
    samples = [
        report(3, 0.5, 1),
        report(28, 0.5, 2),  # fires
        report(38, 0.5, 3),  # 10 steps later: cooling down (cooldown_steps = 20)
        report(48, 0.5, 4),  # 20 steps later: fires
        # A rollback's branch at an earlier step: its measurements and cool-down count afresh (the
        # discarded branch's ratios were of other weights), so the second one there fires.
        report(20, 0.5, 5, branch="b1"),
        report(45, 0.5, 6, branch="b1"),
    ]
    d = run_rule(job, samples)
    assert [f.event.attrs["step"] for f in d.firings] == ["28", "48", "45"]
    (refusal,) = [e for e in d.events if getattr(e, "kind", "") == "rule_refused"]
    assert refusal.attrs["step"] == "38"
    assert "cooldown_steps=20 (10 steps left)" in refusal.attrs["reason"]


# ---- the form ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[knobs]\nreport_update_ratio = [1]",
            r"knobs\.report_update_ratio: \[1\] rejected: expected a finite number",
        ),
        ("[knobs]\n'lr@' = 0.1", r"knobs\.lr@: 'lr@' is not a knob key"),
        ("[knobs]\nlr = nan", r"knobs\.lr: nan rejected"),
        ("knobs = 3", r"knobs: 3 rejected: expected a table KNOB = VALUE"),
        (
            '[[rule]]\nname="a"\nwhen="update_ratio"\nconsecutive=0\ndo=[{action="checkpoint"}]',
            r"rule 'a'\.consecutive: 0 rejected: expected an integer in \[1, 16\]",
        ),
        (
            '[[rule]]\nname="a"\nwhen="plateau"\nconsecutive=2\ndo=[{action="checkpoint"}]',
            r"rule 'a'\.consecutive: not used by when = 'plateau'",
        ),
        (
            '[[rule]]\nname="a"\nwhen="plateau"\ncooldown_steps=-1\ndo=[{action="checkpoint"}]',
            r"rule 'a'\.cooldown_steps: -1 rejected: expected an integer in \[0, ",
        ),
    ],
)
def test_new_fields_name_the_field_and_form(text: str, message: str) -> None:
    with pytest.raises(rules.PolicyError, match=r"^p\.toml: " + message):
        rules.parse(text, source="p.toml")


def test_knobs_and_step_cooldown_parse() -> None:
    p = rules.parse(
        "[knobs]\nreport_update_ratio = 10\nlr = 0.5\n"
        '[[rule]]\nname="a"\nwhen="update_ratio"\nconsecutive=3\ncooldown_steps=40\ndo=[{action="checkpoint"}]'
    )
    assert p.knobs == {"report_update_ratio": 10, "lr": 0.5}
    (rule,) = p.rules
    assert rule.condition.consecutive == 3 and rule.cooldown_steps == 40 and rule.cooldown_s == 60.0
