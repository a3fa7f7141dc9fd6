"""Something to roll back to from before the damage: a policy's `start` commands, sent with its
`[knobs]` and a resume to a run held at step 0 (and applied there by a replay), the update-to-weight
ratio measured from the first optimizer step, and the default's `runaway-update-rollback`, which goes
back to the last checkpoint before a catastrophic ratio and cuts lr by a factor derived from it.
Each fires on a scripted signal and sends exactly its commands."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

import threadlet
from tests.unit.factories import local_config
from threadlet import update_ratio as ur
from torchloom import naming, replay_file
from torchloom.messages import (
    Action,
    ActionKind,
    CheckpointInfo,
    KnobSpec,
    KnobType,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StepMetrics,
    SubmitRequest,
)
from weaver import autopilot, rules
from weaver import signals as sg
from weaver.model import JobState, WeaverState
from weaver.steering import Steering

JOB = "j"
RUN = "r1"
BAD_LR = 0.09
# The charlm benchmark's measured ratios (seed 0), every 25 steps from the first optimizer step.
GOOD_RATIOS = [0.0245, 0.0075, 0.0064, 0.0063, 0.0058, 0.0055]
BAD_RATIOS = [0.735, 0.0411, 0.0281, 0.0257, 0.0219, 0.0206]


def job_state(lr: float = BAD_LR, *, knobs: bool = True) -> JobState:
    job = JobState(job=JOB, run_id=RUN, world_size=2, started_at_s=0.0)
    if knobs:
        job.knobs = (
            KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, value=lr),
            KnobSpec(name=ur.KNOB, type=KnobType.INT, min=0, max=ur.MAX_EVERY, value=0),
        )
    return job


def report(step: int, *, branch: str = "main", held: bool = False, **values: float) -> sg.Sample:
    vals = {"loss": 2.0} | values
    if held:
        vals = {naming.HELD_AT_START: 1.0}
    return sg.sample_of(StepMetrics(job=JOB, run_id=RUN, rank=0, step=step, branch=branch, values=vals))


def measured(
    step: int,
    ratio: float,
    count: int,
    *,
    at: int | None = None,
    branch: str = "main",
    loss_then: float = 3.5,
    loss: float = 2.0,
) -> sg.Sample:
    """A report at `at` (default `step` + 3) of loss `loss`, carrying the measurement of the optimizer
    step from `step` and that step's loss `loss_then`."""
    values = {
        sg.UPDATE_RATIO: ratio,
        sg.UPDATE_RATIO_COUNT: float(count),
        sg.UPDATE_RATIO_STEP: float(step),
        sg.UPDATE_RATIO_LOSS: loss_then,
    }
    return report(step + 3 if at is None else at, branch=branch, loss=loss, **values)


def add_checkpoint(job: JobState, seq: int, step: int, branch: str = "main", tag: str = "") -> None:
    ckpt = CheckpointInfo(id=f"ckpt-{seq}", tag=tag, step=step, branch=branch, seq=seq, path="/x")
    job.registry.checkpoints[ckpt.id] = ckpt


def bodies(firing: autopilot.Firing) -> list[object]:
    return [r.body for r in firing.requests]


# ---- the policy's form ----------------------------------------------------------------------------


def test_start_and_target_over_value_parse_and_name_what_is_wrong() -> None:
    p = rules.parse(
        'start = [{action = "checkpoint"}, {set = {lr = 0.1}}]\n[[rule]]\nname = "r"\nwhen = "update_ratio"\n'
        'do = [{set = {lr = "x3e-2/value"}}]\n',
        source="t.toml",
    )
    assert p.start == (rules.ActionStep(kind=ActionKind.CHECKPOINT), rules.SetStep(values={"lr": 0.1}))
    assert p.holds_at_start
    assert rules.factor_of("x3e-2/value") == (3e-2, True) and rules.factor_of("x0.5") == (0.5, False)
    # Not held when nothing would be sent: a dry run, approval, or nothing to send at the start.
    assert not rules.parse('dry_run = true\nstart = [{action = "checkpoint"}]').holds_at_start
    assert not rules.parse("approval = true\n[knobs]\nreport_update_ratio = 5").holds_at_start
    assert not rules.parse('name = "x"').holds_at_start
    for text, message in [
        ('start = [{action = "rollback", checkpoint = "last_good"}]', "start[0]: a rollback at step 0"),
        ('start = [{set = {lr = "x2/value"}}]', 'start[0]: "xTARGET/value" needs the value of a signal'),
        ('start = [{action = "stop"}]', "start: action 'stop' is forbidden"),
        ("start = 3", "start: 3 rejected: expected a list of steps"),
        (
            '[[rule]]\nname = "r"\nwhen = "nonfinite"\ndo = [{set = {lr = "xq/value"}}]',
            '\'xq/value\' rejected: expected a number, "xFACTOR" or "xTARGET/value"',
        ),
    ]:
        with pytest.raises(rules.PolicyError) as info:
            rules.parse(text, source="t.toml")
        assert message in str(info.value), str(info.value)


# ---- the start commands ---------------------------------------------------------------------------


def test_a_held_run_gets_the_knobs_the_start_commands_and_a_resume_once_in_that_order() -> None:
    job = job_state()
    pilot = autopilot.Pilot(policy=rules.load("default"), run_id=RUN)
    d = autopilot.on_metrics(pilot, job, report(0, held=True), now=10.0)
    (firing,) = d.firings
    assert firing.mode is autopilot.Mode.SEND
    assert bodies(firing) == [
        SetConfig(values={ur.KNOB: 25}),
        Action(kind=ActionKind.CHECKPOINT, args={"tag": "start"}),
        Action(kind=ActionKind.RESUME),
    ]
    assert {r.issuer.identity for r in firing.requests} == {"rule:default"}
    ev = firing.event
    assert ev.kind == "rule_fired" and ev.attrs["signal"] == "start" and ev.attrs["step"] == "0"
    # The ranks report again while held (until the resume lands): nothing is sent twice, and the
    # [knobs] are not sent again at the first training report either.
    assert autopilot.on_metrics(pilot, job, report(0, held=True), now=10.1).firings == ()
    assert autopilot.on_metrics(pilot, job, report(3), now=10.2).firings == ()


def test_the_start_waits_for_the_heartbeats_that_bring_the_knobs_it_sets() -> None:
    job = job_state(knobs=False)
    pilot = autopilot.Pilot(policy=rules.load("default"), run_id=RUN)
    assert autopilot.on_metrics(pilot, job, report(0, held=True), now=10.0) == autopilot.Decision()
    job.knobs = job_state().knobs
    (firing,) = autopilot.on_metrics(pilot, job, report(0, held=True), now=10.5).firings
    assert bodies(firing)[-1] == Action(kind=ActionKind.RESUME)


def test_a_dry_run_journals_the_start_commands_and_still_ends_the_hold() -> None:
    policy = rules.parse('dry_run = true\nstart = [{action = "checkpoint"}]', source="dry.toml")
    job = job_state()
    d = autopilot.on_metrics(autopilot.Pilot(policy=policy, run_id=RUN), job, report(0, held=True), now=1.0)
    dry, release = d.firings
    assert dry.mode is autopilot.Mode.DRY_RUN and bodies(dry) == [Action(kind=ActionKind.CHECKPOINT)]
    assert release.mode is autopilot.Mode.SEND and bodies(release) == [Action(kind=ActionKind.RESUME)]


# ---- the update ratio's signal ----------------------------------------------------------------------


def test_the_measured_step_is_the_last_good_step_and_a_rollback_forgets_the_ratios() -> None:
    track = sg.Track()
    cond = sg.Condition(signal=sg.Signal.UPDATE_RATIO, above=0.1)
    sg.observe(track, measured(0, 0.735, 1, at=4))
    det = sg.detect(track, cond)
    # Reported at step 4, measured on the optimizer step from step 0: the weights of step 0 are good.
    assert det is not None and det.step == 4 and det.last_good_step == 0 and det.value == 0.735
    assert list(track.update_ratios) == [(0, 0.735, 3.5)]
    sg.observe(track, report(2, branch="b5"))  # the rollback's branch
    assert not track.update_ratios
    sg.observe(track, measured(20, 0.009, 2, branch="b5"))
    assert sg.detect(track, cond) is None


# ---- runaway-update-rollback ---------------------------------------------------------------------


def runaway() -> rules.Policy:
    base = rules.load("default")
    kept = tuple(r for r in base.rules if r.name in {"runaway-update-rollback", "hot-update-halve-lr"})
    return rules.Policy(name=base.name, rules=kept, guards=base.guards, knobs=base.knobs)


def test_runaway_ratio_rolls_back_to_the_start_checkpoint_and_cuts_lr_from_the_ratio() -> None:
    job = job_state()
    add_checkpoint(job, 2, 0, tag="start")
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    # Measured on the step from 0 (loss 3.5 there); the first report after it has a lower loss: not
    # confirmed yet. The next one's loss is over 3.5: the step wrecked the weights.
    assert autopilot.on_metrics(pilot, job, measured(0, 0.735, 1, at=1, loss=3.19), now=9.9).firings == ()
    d = autopilot.on_metrics(pilot, job, report(4, loss=7.8), now=10.0)
    (firing,) = d.firings  # the same report's other rules are not judged: the run goes back
    assert firing.rule == "runaway-update-rollback"
    rollback, cut = bodies(firing)
    assert rollback == Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "ckpt-2"})
    assert isinstance(cut, SetConfig) and cut.values["lr"] == pytest.approx(BAD_LR * 3e-2 / 0.735)
    assert firing.event.attrs["last_good_step"] == "0"
    assert json.loads(firing.event.attrs["commands"])[1] == {
        "set": {"lr": pytest.approx(BAD_LR * 3e-2 / 0.735)}
    }


def test_a_derived_cut_is_kept_within_the_bounds() -> None:
    job = job_state()
    add_checkpoint(job, 2, 0)
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    (firing,) = autopilot.on_metrics(pilot, job, measured(0, 1000.0, 1, loss=9.0), now=10.0).firings
    assert bodies(firing)[1] == SetConfig(values={"lr": pytest.approx(BAD_LR * 0.01)})  # bounds [0.01, 10]


def test_runaway_rule_without_a_checkpoint_before_the_trouble_is_refused() -> None:
    job = job_state()
    add_checkpoint(job, 4, 30)  # after the measured step
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    d = autopilot.on_metrics(pilot, job, measured(25, 0.5, 1, at=33, loss=9.0), now=10.0)
    assert d.firings == ()
    (refused,) = [e for e in d.events if e.kind == "rule_refused"]
    assert "no checkpoint taken at or before step 25" in refused.attrs["reason"]


@pytest.mark.parametrize("ratios", [GOOD_RATIOS, [0.0241, 0.007, 0.0066, 0.0062, 0.0056, 0.0053]])
def test_the_default_rules_do_not_fire_on_a_good_lr_s_ratios(ratios: list[float]) -> None:
    """Seeds 0 and 1 of the good lr: only the periodic checkpoint (step 100) fires."""
    job = job_state(lr=3e-3)
    add_checkpoint(job, 2, 0, tag="start")
    pilot = autopilot.Pilot(policy=rules.load("default"), run_id=RUN, knobs_given={ur.KNOB})
    fired = []
    for i, r in enumerate(ratios):
        d = autopilot.on_metrics(pilot, job, measured(25 * i, r, i + 1), now=10.0 + i)
        fired += [f.rule for f in d.firings]
    assert fired == ["periodic-checkpoint"]


def test_a_big_step_that_lowers_the_loss_is_not_runaway() -> None:
    """A small init far from its solution (tests/integration/scripts/nan_train.py: SGD moves the
    weights by 49% in its first step and the loss falls from 8.4): nothing fires, ever."""
    job = job_state(lr=0.05)
    add_checkpoint(job, 2, 0, tag="start")
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    samples = [measured(0, 0.49, 1, at=3, loss_then=8.4, loss=1.0), report(6, loss=0.3), report(9, loss=0.1)]
    assert [f for s in samples for f in autopilot.on_metrics(pilot, job, s, now=10.0).firings] == []


def test_runaway_fires_once_per_measurement() -> None:
    job = job_state()
    add_checkpoint(job, 2, 0, tag="start")
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    fired = autopilot.on_metrics(pilot, job, measured(0, 0.7, 1, at=3, loss=7.0), now=10.0).firings
    assert len(fired) == 1
    # Reports of the same branch before the rollback lands: the same measurement, not fired again.
    assert autopilot.on_metrics(pilot, job, report(5, loss=8.0), now=10.1).firings == ()


# ---- the threadlet: the hold, and a replay's step 0 ---------------------------------------------------


def test_a_held_rank_reports_held_and_trains_after_its_hold_when_no_resume_comes() -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = local_config()
    config = type(config)(**{**{f: getattr(config, f) for f in config.__slots__}, "start_hold_s": 0.2})
    t0 = time.monotonic()
    with threadlet.attach(config=config, model=model, optimizer=opt) as tl:
        assert time.monotonic() - t0 >= 0.2
        assert not tl.paused and tl.step_count == 0
        assert tl._link is not None and tl._link.metrics is not None
        assert tl._link.metrics.step == 0 and tl._link.metrics.values[naming.HELD_AT_START] == 1.0


def test_a_replay_applies_the_commands_of_step_0_before_the_first_optimizer_step(tmp_path: Path) -> None:
    commands = [
        {"seq": 1, "step": 0, "branch": "main", "kind": "set", "values": {ur.KNOB: 25}, "args": {}},
        {"seq": 2, "step": 0, "branch": "main", "kind": "checkpoint", "values": {}, "args": {"tag": "start"}},
        {"seq": 3, "step": 0, "branch": "main", "kind": "resume", "values": {}, "args": {}},
    ]
    path = replay_file.write(tmp_path / "run", {"job": JOB, "commands": commands})
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = threadlet.ThreadletConfig(
        job=JOB, run_id=RUN, replay_path=str(path), checkpoint_dir=str(tmp_path)
    )
    with threadlet.attach(config=config, model=model, optimizer=opt) as tl:
        assert [(d.seq, d.step, d.applied) for d in tl.applied] == [(1, 0, True), (2, 0, True), (3, 0, True)]
        assert tl.applied[1].detail["checkpoint_step"] == "0"
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        tl.step(loss=1.0)
        # The first optimizer step was measured, from step 0, with the loss the loop gave for it.
        ratio = tl._update_ratio
        assert ratio is not None and ratio.count == 1
        assert ratio.report()[ur.STEP] == 0.0 and ratio.report()[ur.LOSS] == 1.0


def test_run_holds_the_ranks_only_under_a_policy_with_start_commands_or_knobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchloom import env
    from torchloom.app import run_args

    monkeypatch.setenv(env.HOME, str(tmp_path))
    monkeypatch.delenv(env.START_HOLD_S, raising=False)
    dry = tmp_path / "dry.toml"
    dry.write_text('dry_run = true\nstart = [{action = "checkpoint"}]\n')

    def hold(*args: str) -> str | None:
        spec = run_args.split_run_args([*args, "t.py"])
        return run_args.child_env(spec, run_id="r", nats_url="nats://127.0.0.1:1", grpc="h:1").get(
            env.START_HOLD_S
        )

    assert hold("--policy", "default") == "30"
    assert hold("--policy", str(dry)) is None
    assert hold() is None
    monkeypatch.setenv(env.START_HOLD_S, "5")
    assert hold("--policy", "default") == "5"
    assert hold() is None  # nothing would end it


def _adam_losses(tmp_path: Path, commands: list[dict[str, object]], steps: int) -> list[tuple[str, float]]:
    """(branch, loss) of each step of a small Adam run replaying `commands`."""
    path = replay_file.write(tmp_path / "run", {"job": JOB, "commands": commands})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    config = threadlet.ThreadletConfig(
        job=JOB, run_id=RUN, replay_path=str(path), checkpoint_dir=str(tmp_path / "ckpt")
    )
    out = []
    with threadlet.attach(config=config, model=model, optimizer=opt) as tl:
        for _ in tl.range(steps):
            x = torch.randn(8, 4)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append((tl.branch, loss.item()))
            tl.step(loss=loss.item())
    return out


def test_a_checkpoint_before_the_first_step_changes_nothing_and_a_rollback_to_it_starts_afresh(
    tmp_path: Path,
) -> None:
    """DCP's state-dict helpers create an unstepped optimizer's state with a zero-gradient step (Adam's
    first real update would then be 0.74 x lr): the start checkpoint keeps it as it is."""
    plain = _adam_losses(tmp_path / "a", [], 4)
    ckpt = {"seq": 1, "step": 0, "branch": "main", "kind": "checkpoint", "values": {}, "args": {}}
    assert _adam_losses(tmp_path / "b", [ckpt], 4) == plain
    back = {
        "seq": 2,
        "step": 2,
        "branch": "main",
        "kind": "rollback",
        "values": {},
        "args": {"checkpoint": "ckpt-1"},
    }
    again = _adam_losses(tmp_path / "c", [ckpt, back], 4)
    assert again[:2] == plain[:2] and [loss for _, loss in again[2:]] == [loss for _, loss in plain]
    assert {branch for branch, _ in again[2:]} == {"b2"}


async def test_a_firing_s_commands_are_all_submitted_before_the_first_is_decided() -> None:
    """So the ranks decide the rollback and its lr cut at one boundary: the new branch's first step
    runs at the cut lr (one step at the old lr would do the damage again)."""
    job = job_state()
    add_checkpoint(job, 2, 0, tag="start")
    pilot = autopilot.Pilot(policy=runaway(), run_id=RUN, knobs_given={ur.KNOB})
    (firing,) = autopilot.on_metrics(pilot, job, measured(0, 0.735, 1, loss=7.8), now=10.0).firings
    started: list[object] = []
    decided = asyncio.Event()

    async def submit(req: SubmitRequest) -> Outcome:
        started.append(req.body)
        await decided.wait()
        return Outcome(command_id=req.command_id, job=JOB, status=OutcomeStatus.APPLIED)

    spawned: list[asyncio.Task[None]] = []
    steering = Steering(
        WeaverState(),
        None,
        announce=lambda ev: None,
        submit=submit,
        spawn=lambda coro, name: spawned.append(asyncio.create_task(coro, name=name)),
    )
    steering._carry_out(firing)
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == bodies(firing)  # both out, in order, before either was decided
    decided.set()
    await asyncio.wait_for(spawned[0], 5.0)
