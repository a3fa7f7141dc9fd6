"""`set lr=X` means X (threadlet.lr): for every scheduler in torch.optim.lr_scheduler and the
transformers schedules, with random hyper-parameters, set points and values, the next optimizer step
uses exactly X and the rest of the schedule is the untouched schedule times X / its value at the set;
state_dict round trips keep the factor; ReduceLROnPlateau reduces from X; a scheduler the threadlet
was not given is named in the ack and noticed when it overwrites the value."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as sch

from threadlet import lr
from threadlet.optim_knobs import KnobBoard

Factory = Callable[[torch.optim.Optimizer], Any]
GROUPS = ("body", "head")


def make_optimizer() -> torch.optim.Optimizer:
    body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    return torch.optim.SGD(
        [
            {"params": body.parameters(), "name": "body"},
            {"params": head.parameters(), "name": "head", "lr": 0.05},
        ],
        lr=0.1,
        momentum=0.9,  # CyclicLR and OneCycleLR cycle it
    )


def transformers_schedule(name: str, warmup: int, total: int) -> Factory:
    optimization = pytest.importorskip("transformers.optimization")
    fn = getattr(optimization, name)
    return lambda o: fn(o, num_warmup_steps=warmup, num_training_steps=total)


@st.composite
def schedules(draw: st.DrawFn, horizon: int) -> tuple[str, Factory]:
    """A scheduler kind with random hyper-parameters, valid for `horizon` steps."""
    kind = draw(
        st.sampled_from(
            [
                "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
                "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
                "CyclicLR", "OneCycleLR", "SequentialLR", "ChainedScheduler",
                "linear_warmup", "cosine_warmup",
            ]
        )
    )  # fmt: skip
    gamma = draw(st.floats(0.5, 0.99))
    n = draw(st.integers(2, 2 * horizon))
    f: Factory
    if kind == "LambdaLR":
        a = draw(st.floats(0.01, 1.0))
        f = lambda o: sch.LambdaLR(o, lambda e: 1.0 / (1.0 + a * e))  # noqa: E731
    elif kind == "MultiplicativeLR":
        f = lambda o: sch.MultiplicativeLR(o, lambda e: gamma)  # noqa: E731
    elif kind == "StepLR":
        size = draw(st.integers(1, 6))
        f = lambda o: sch.StepLR(o, step_size=size, gamma=gamma)  # noqa: E731
    elif kind == "MultiStepLR":
        ms = sorted(draw(st.sets(st.integers(1, 2 * horizon), min_size=1, max_size=4)))
        f = lambda o: sch.MultiStepLR(o, milestones=ms, gamma=gamma)  # noqa: E731
    elif kind == "ConstantLR":
        factor = draw(st.floats(0.1, 1.0))
        f = lambda o: sch.ConstantLR(o, factor=factor, total_iters=n)  # noqa: E731
    elif kind == "LinearLR":
        start, end = draw(st.floats(0.05, 1.0)), draw(st.floats(0.05, 1.0))
        f = lambda o: sch.LinearLR(o, start_factor=start, end_factor=end, total_iters=n)  # noqa: E731
    elif kind == "ExponentialLR":
        f = lambda o: sch.ExponentialLR(o, gamma=gamma)  # noqa: E731
    elif kind == "PolynomialLR":
        power = draw(st.floats(0.5, 3.0))
        f = lambda o: sch.PolynomialLR(o, total_iters=n, power=power)  # noqa: E731
    elif kind == "CosineAnnealingLR":
        eta = draw(st.sampled_from([0.0, 1e-3]))
        f = lambda o: sch.CosineAnnealingLR(o, T_max=n, eta_min=eta)  # noqa: E731
    elif kind == "CosineAnnealingWarmRestarts":
        t0, mult, eta = draw(st.integers(1, 8)), draw(st.integers(1, 3)), draw(st.sampled_from([0.0, 1e-3]))
        f = lambda o: sch.CosineAnnealingWarmRestarts(o, T_0=t0, T_mult=mult, eta_min=eta)  # noqa: E731
    elif kind == "CyclicLR":
        mode = draw(st.sampled_from(["triangular", "triangular2", "exp_range"]))
        up = draw(st.integers(1, 8))
        f = lambda o: sch.CyclicLR(  # noqa: E731
            o, base_lr=[0.01, 0.005], max_lr=[0.2, 0.1], step_size_up=up, mode=mode, gamma=gamma
        )
    elif kind == "OneCycleLR":
        pct = draw(st.floats(0.1, 0.6))
        strategy = draw(st.sampled_from(["cos", "linear"]))
        total = 2 * horizon + 2
        f = lambda o: sch.OneCycleLR(  # noqa: E731
            o, max_lr=[0.5, 0.2], total_steps=total, pct_start=pct, anneal_strategy=strategy
        )
    elif kind == "SequentialLR":
        warm = draw(st.integers(1, horizon))
        f = lambda o: sch.SequentialLR(  # noqa: E731
            o,
            [sch.LinearLR(o, start_factor=0.1, total_iters=warm), sch.CosineAnnealingLR(o, T_max=n)],
            milestones=[warm],
        )
    elif kind == "ChainedScheduler":
        f = lambda o: sch.ChainedScheduler(  # noqa: E731
            [sch.ConstantLR(o, factor=0.5, total_iters=n), sch.ExponentialLR(o, gamma=gamma)]
        )
    else:
        name = (
            "get_linear_schedule_with_warmup"
            if kind == "linear_warmup"
            else "get_cosine_schedule_with_warmup"
        )
        f = transformers_schedule(name, draw(st.integers(0, horizon)), 2 * horizon + 2)
    return kind, f


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def step(opt: torch.optim.Optimizer, sched: Any) -> None:
    opt.step()
    sched.step()


HORIZON = 20


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=schedules(HORIZON),
    at=st.integers(0, HORIZON),
    after=st.integers(1, HORIZON),
    x=st.floats(1e-4, 1.0),
    key=st.sampled_from(["lr", "lr@body", "lr@head"]),
)
def test_set_lr_is_x_and_scales_the_rest_of_every_schedule(
    schedule: tuple[str, Factory], at: int, after: int, x: float, key: str
) -> None:
    kind, make = schedule
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref, sched = make(ref_opt), make(opt)
    board = KnobBoard(opt, sched)
    for _ in range(at):
        step(ref_opt, ref)
        step(opt, sched)
    assert lrs(opt) == lrs(ref_opt), "attaching changed the schedule before any set"
    touched = [i for i, g in enumerate(GROUPS) if key == "lr" or key == f"lr@{g}"]
    original = lrs(ref_opt)
    if any(original[i] == 0 for i in touched):
        # Nothing scales a schedule standing at 0 (a warmup start, the end of a decay) to X.
        with pytest.raises(ValueError, match="the schedule stands at lr 0"):
            board.apply(board.validate({key: x}))
        assert lrs(opt) == original
        return
    detail = board.apply(board.validate({key: x}))
    factor = [x / original[i] if i in touched else 1.0 for i in range(len(GROUPS))]
    for i, g in enumerate(GROUPS):
        expected = x if i in touched else original[i]
        assert lrs(opt)[i] == expected, (kind, g)  # exactly X for the next optimizer step
        assert sched.get_last_lr()[i] == expected
        if i in touched:
            assert detail[f"lr@{g}"] == repr(x) and float(detail[f"lr_scale@{g}"]) == factor[i]
    assert detail["lr_schedule"] == "scaled"
    for k in range(after):
        step(ref_opt, ref)
        step(opt, sched)
        for i, g in enumerate(GROUPS):
            assert lrs(opt)[i] == pytest.approx(lrs(ref_opt)[i] * factor[i], rel=1e-9, abs=1e-15), (
                kind,
                g,
                k,
            )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=schedules(HORIZON), at=st.integers(1, HORIZON), x=st.floats(1e-3, 1.0), later=st.integers(1, 10)
)
def test_state_dict_round_trip_keeps_the_factor(
    schedule: tuple[str, Factory], at: int, x: float, later: int
) -> None:
    """A checkpoint after a set, loaded into a fresh optimizer and scheduler (as a rollback or resume
    does), continues the scaled schedule; one from before the set brings the factor back to 1."""
    _, make = schedule
    opt = make_optimizer()
    sched = make(opt)
    board = KnobBoard(opt, sched)
    before = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    for _ in range(at):
        step(opt, sched)
    if min(lrs(opt)) == 0:
        return
    board.apply({"lr": x})
    saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    assert saved[1][lr.SCALE_ATTR] == lr.scale_of(sched)
    for _ in range(later):
        step(opt, sched)
    expected = lrs(opt)
    opt2 = make_optimizer()
    sched2 = make(opt2)
    KnobBoard(opt2, sched2)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    for _ in range(later):
        step(opt2, sched2)
    assert lrs(opt2) == pytest.approx(expected, rel=1e-12)
    # Rolling back to before the set: the factor comes back with the scheduler's state.
    opt.load_state_dict(before[0])
    sched.load_state_dict(before[1])
    assert lr.scale_of(sched) == [1.0, 1.0]


@settings(max_examples=100, deadline=None)
@given(
    losses=st.lists(st.floats(0.0, 10.0), min_size=4, max_size=40),
    at=st.integers(0, 20),
    x=st.floats(1e-3, 1.0),
    patience=st.integers(0, 3),
)
def test_reduce_on_plateau_reduces_from_x(losses: list[float], at: int, x: float, patience: int) -> None:
    def make(o: torch.optim.Optimizer) -> Any:
        return sch.ReduceLROnPlateau(o, factor=0.5, patience=patience, eps=0.0)

    ref_opt, opt = make_optimizer(), make_optimizer()
    ref, sched = make(ref_opt), make(opt)
    board = KnobBoard(opt, sched)
    at = min(at, len(losses))
    for loss in losses[:at]:
        ref.step(loss)
        sched.step(loss)
    original = lrs(ref_opt)
    detail = board.apply({"lr": x})
    assert lrs(opt) == [x, x] and sched.get_last_lr() == [x, x]
    assert detail["lr_schedule"] == "plateau" and detail["lr@body"] == repr(x)
    for loss in losses[at:]:
        ref.step(loss)
        sched.step(loss)
        for got, want, orig in zip(lrs(opt), lrs(ref_opt), original, strict=True):
            assert got == pytest.approx(x * want / orig, rel=1e-9)


def test_a_scheduler_never_set_is_bit_identical_to_the_plain_one() -> None:
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref = sch.OneCycleLR(ref_opt, max_lr=0.3, total_steps=50)
    sched = sch.OneCycleLR(opt, max_lr=0.3, total_steps=50)
    KnobBoard(opt, sched)
    assert isinstance(sched, sch.OneCycleLR) and type(sched).__name__ == "OneCycleLR"
    for _ in range(40):
        step(ref_opt, ref)
        step(opt, sched)
        assert lrs(opt) == lrs(ref_opt)
    assert sched.state_dict()[lr.SCALE_ATTR] == [1.0, 1.0]


def test_a_scheduler_not_given_is_named_in_the_ack_and_noticed_when_it_overwrites() -> None:
    opt = make_optimizer()
    sched = sch.OneCycleLR(opt, max_lr=0.3, total_steps=50)  # the loop steps it; the threadlet never saw it
    board = KnobBoard(opt)
    for _ in range(5):
        step(opt, sched)
    detail = board.apply({"lr": 0.01})
    assert detail["lr_schedule"] == "not_given"
    assert "pass scheduler=... to threadlet.attach" in detail["warning"]
    assert lrs(opt) == [0.01, 0.01] and board.lr_overwritten() == []  # the optimizer step uses it
    step(opt, sched)
    notices = board.lr_overwritten()
    assert len(notices) == 2 and all("pass scheduler=... to threadlet.attach" in n for n in notices)
    assert notices[0].startswith("lr@body=0.01 set by torchloom was changed to ")
    step(opt, sched)
    assert board.lr_overwritten() == []  # reported once


def test_a_large_factor_warns_what_the_schedules_high_point_becomes_and_it_does() -> None:
    """A tester set lr near the end of a warm-restart cycle: the factor was 22.6 and every restart
    then ran at 22x the configured lr, with no word of it in the ack. The ack now says what the
    configured lr becomes, and the restart shows it is true; a set at an ordinary point says nothing."""
    opt = make_optimizer()  # body 0.1, head 0.05
    sched = sch.CosineAnnealingWarmRestarts(opt, T_0=10)
    board = KnobBoard(opt, sched)
    for _ in range(9):  # the cycle's last step: the schedule is near 0
        step(opt, sched)
    detail = board.apply({"lr@head": 0.02})
    factor = float(detail["lr_scale@head"])
    assert factor > lr.STEEP_SCALE
    assert f"head: x{factor:.3g}, so its configured 0.05 becomes {0.05 * factor:.3g}" in detail["warning"]
    step(opt, sched)  # the warm restart
    assert lrs(opt)[1] == pytest.approx(0.05 * factor)
    opt2 = make_optimizer()
    calm = KnobBoard(opt2, sch.StepLR(opt2, step_size=100))
    assert "warning" not in calm.apply({"lr": 0.2})  # x2 and x4: nothing to warn


def test_without_any_scheduler_the_value_stays() -> None:
    opt = make_optimizer()
    board = KnobBoard(opt)
    assert board.apply({"lr@head": 0.3}) == {"lr_schedule": "none", "lr@head": "0.3"}
    opt.step()
    assert lrs(opt) == [0.1, 0.3] and board.lr_overwritten() == []


def test_tensor_lr_stays_the_same_tensor() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    sched = sch.ExponentialLR(opt, gamma=0.5)
    tensor = opt.param_groups[0]["lr"]
    board = KnobBoard(opt, sched)
    board.apply({"lr": 0.2})
    assert opt.param_groups[0]["lr"] is tensor and float(tensor) == pytest.approx(0.2)
    step(opt, sched)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)


def test_a_scheduler_that_is_not_a_torch_scheduler_is_refused() -> None:
    class Custom:
        def step(self) -> None: ...

    with pytest.raises(ValueError, match=r"expected a torch\.optim\.lr_scheduler LRScheduler"):
        KnobBoard(make_optimizer(), Custom())
