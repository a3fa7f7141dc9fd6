"""The update-to-weight ratio on request: the computation (globally and per group), the threadlet
measuring one optimizer step every N steps once the `report_update_ratio` knob asks and reporting it
with its step metrics, nothing armed while it is off, and the weaver's `update_ratio` rule condition."""

from __future__ import annotations

import math
import time

import pytest
import torch

import threadlet
from tests.unit.factories import local_config, set_config
from threadlet import update_ratio as ur
from torchloom.messages import KnobSpec, KnobType, SetConfig, StepMetrics
from weaver import autopilot, rules
from weaver import signals as sg
from weaver.model import JobState

JOB = "j"


def test_measure_is_the_norm_of_the_update_over_the_norm_of_the_weights() -> None:
    before = [[torch.tensor([3.0, 0.0]), torch.tensor([[0.0]])], [torch.tensor([0.0, 4.0])]]
    after = [[torch.tensor([3.0, 0.3]), torch.tensor([[0.4]])], [torch.tensor([0.0, 4.0])]]
    got = ur.measure(after, before, ("body", "head"))
    assert got["update_ratio@body"] == pytest.approx(0.5 / 3.0)
    assert got["update_ratio@head"] == 0.0
    assert got["update_ratio"] == pytest.approx(0.5 / 5.0)
    # One group: only the global ratio.
    assert ur.measure(after[:1], before[:1], ("0",)) == {"update_ratio": pytest.approx(0.5 / 3.0)}
    assert ur.ratio(0.0, 0.0) == 0.0 and ur.ratio(1.0, 0.0) == math.inf


def test_one_optimizer_step_every_n_steps_is_measured_and_the_hooks_go_after_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ratio = ur.UpdateRatio(opt, ("0",))
    assert ratio.next_tick == ur.NEVER and ratio.report() == {}
    ratio.apply(2)
    assert ratio.next_tick == 0
    ratio.arm(5, step=3)
    assert ratio.next_tick == 7
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    want = math.sqrt(
        sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before, strict=True))
    )
    want /= math.sqrt(sum(float(b.square().sum()) for b in before))
    # The step the measured optimizer step started from rides with it (the rules' last good step).
    assert ratio.report() == {
        "update_ratio": pytest.approx(want),
        "update_ratio_count": 1.0,
        "update_ratio_step": 3.0,
    }
    # The hooks removed themselves: a later step is not measured until armed again.
    opt.step()
    assert ratio.count == 1
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    ratio.apply(0)
    assert ratio.next_tick == ur.NEVER


def train(tl: threadlet.Threadlet, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        tl.step(loss=1.0)


def test_the_knob_turns_measuring_on_and_the_ratio_rides_the_step_metrics() -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = local_config()
    with threadlet.attach(config=config, model=model, optimizer=opt) as tl:
        spec = tl._board.schema[ur.KNOB]
        assert (spec.type, spec.min, spec.max, spec.value) == (KnobType.INT, 0, ur.MAX_EVERY, None)
        assert {s.name: s.value for s in tl._board.specs()}[ur.KNOB] == 0
        train(tl, model, opt, 3)
        # Off: no hook is ever installed and no ratio is reported.
        assert not opt._optimizer_step_pre_hooks
        assert tl._link is not None and tl._link.metrics is not None
        assert "update_ratio" not in tl._link.metrics.values
        tl._agreement.file(set_config(1, report_update_ratio=2), time.time())
        tl._reporter.next_metrics_t = 0.0
        train(tl, model, opt, 5)
        assert tl.applied[-1].applied
        ratio = tl._update_ratio
        # Decided at tick 4: armed there, at 6 and at 8, each for the optimizer step that follows.
        assert ratio is not None and ratio.count == 2 and ratio.next_tick == 10
        tl._reporter.next_metrics_t = 0.0
        train(tl, model, opt, 1)
        assert ratio.count == 3
        values = tl._link.metrics.values
        assert values["update_ratio_count"] == 3.0 and 0.0 < values["update_ratio"] < 1.0


# ---- the weaver's condition -------------------------------------------------------------------


def sample(step: int, ratio: float | None, count: int, *, rank: int = 0) -> sg.Sample:
    values = {"loss": 1.0}
    if ratio is not None:
        values |= {sg.UPDATE_RATIO: ratio, sg.UPDATE_RATIO_COUNT: float(count)}
    return sg.sample_of(StepMetrics(job=JOB, run_id="r1", rank=rank, step=step, branch="main", values=values))


POLICY = """
name = "ratio"
[[rule]]
name = "ratio-halve-lr"
when = "update_ratio"
above = 1e-2
cooldown_s = 0.0
max_per_hour = 100
do = [{set = {lr = "x0.5"}}]
"""


def test_update_ratio_rule_fires_once_per_new_measurement_over_its_bound() -> None:
    job = JobState(job=JOB, run_id="r1", world_size=2, started_at_s=0.0)
    job.knobs = (KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=0.1),)
    pilot = autopilot.Pilot(policy=rules.parse(POLICY, source="ratio.toml"))
    fired = []
    script = [
        sample(1, None, 0),  # not measured
        sample(2, 5e-3, 1),  # measured, under the bound
        sample(3, 0.05, 2),  # over it: fires
        sample(4, 0.05, 2),  # the same measurement again: no second firing
        sample(5, 0.05, 2, rank=1),  # another rank's copy of it: not the lead's series
        sample(6, 0.02, 3),  # a new one over the bound: fires again
    ]
    for i, s in enumerate(script):
        d = autopilot.on_metrics(pilot, job, s, 1000.0 + i)
        fired += [(s.step, f) for f in d.firings]
    assert [step for step, _ in fired] == [3, 6]
    _, first = fired[0]
    assert [r.body for r in first.requests] == [SetConfig(values={"lr": 0.05})]
    assert first.event.attrs["signal"] == "update_ratio"
    assert first.event.attrs["value"] == "0.05" and first.event.attrs["threshold"] == "0.01"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rule]]\nname="a"\nwhen="update_ratio"\nabove=-1\ndo=[{action="checkpoint"}]',
            r"above: -1 rejected",
        ),
        ('[[rule]]\nname="a"\nwhen="plateau"\nabove=0.1\ndo=[{action="checkpoint"}]', r"above: not used by"),
    ],
)
def test_update_ratio_rule_form_is_checked(text: str, message: str) -> None:
    with pytest.raises(rules.PolicyError, match=message):
        rules.parse(text, source="t.toml")
    default = rules.parse('[[rule]]\nname="a"\nwhen="update_ratio"\ndo=[{action="checkpoint"}]')
    assert default.rules[0].condition.above == 1e-2
