"""Optimizer knobs on SGD/Adam/AdamW/RMSprop, group scoping, lr=X under a scheduler, clip/accum helpers,
validate hooks that refuse before any state changes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from threadlet.optim_knobs import KnobBoard, TrainingKnobs
from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, validate_set
from torchloom.messages import KnobSpec, KnobType


def two_groups(cls: type[torch.optim.Optimizer], **kw: Any) -> torch.optim.Optimizer:
    body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    return cls(
        [{"params": body.parameters(), "name": "body"}, {"params": head.parameters(), "name": "head"}], **kw
    )


@pytest.mark.parametrize(
    ("cls", "kw", "knobs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"lr", "weight_decay", "momentum"}),
        (torch.optim.Adam, {"lr": 1e-3}, {"lr", "weight_decay", "betas", "eps"}),
        (torch.optim.AdamW, {"lr": 1e-3}, {"lr", "weight_decay", "betas", "eps"}),
        (torch.optim.RMSprop, {"lr": 1e-3}, {"lr", "weight_decay", "momentum", "eps"}),
    ],
)
def test_each_optimizer_reports_only_present_knobs_and_applies_them(
    cls: type[torch.optim.Optimizer], kw: dict[str, Any], knobs: set[str]
) -> None:
    opt = two_groups(cls, **kw)
    board = KnobBoard(opt)
    assert set(board.schema) == knobs
    raw = {"lr": "0.02", "weight_decay": "0.05", "momentum": "0.5", "betas": "0.8,0.99", "eps": "1e-6"}
    board.apply(board.validate({k: v for k, v in raw.items() if k in knobs}))
    for g in opt.param_groups:
        assert g["lr"] == 0.02 and g["weight_decay"] == 0.05
        if "momentum" in knobs:
            assert g["momentum"] == 0.5
        if "betas" in knobs:
            assert g["betas"] == (0.8, 0.99)
        if "eps" in knobs:
            assert g["eps"] == 1e-6
    # The optimizer still steps with the new values.
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    opt.step()
    specs = {s.name: s.value for s in board.specs()}
    assert specs["lr"] == 0.02
    if "betas" in knobs:
        assert specs["betas"] == (0.8, 0.99)


def test_group_scoping_changes_only_that_group() -> None:
    opt = two_groups(torch.optim.Adam, lr=1e-3)
    board = KnobBoard(opt)
    board.apply(board.validate({"betas@head": "0.5,0.9", "eps@body": 1e-4, "lr@head": 0.3}))
    body, head = opt.param_groups
    assert (body["betas"], head["betas"]) == ((0.9, 0.999), (0.5, 0.9))
    assert (body["eps"], head["eps"]) == (1e-4, 1e-8)
    assert (body["lr"], head["lr"]) == (1e-3, 0.3)
    assert board.group_values("betas") == {}
    with pytest.raises(CommandRejected, match="names no parameter group"):
        board.validate({"eps@tail": 1e-4})


def test_a_plain_weight_decay_keeps_the_groups_built_without_decay_at_0() -> None:
    """The HF Trainer (and most loops) put biases and norms in a group with weight_decay 0: a plain
    `set weight_decay=X` is meant for the decayed groups, and once overwrote that one too. A named
    group is set as named; with no group decayed at all, a plain set reaches every group."""
    body, norm = torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)
    opt = torch.optim.AdamW(
        [
            {"params": body.parameters(), "name": "decay", "weight_decay": 0.01},
            {"params": norm.parameters(), "name": "no_decay", "weight_decay": 0.0},
        ]
    )
    board = KnobBoard(opt)
    detail = board.apply(board.validate({"weight_decay": "0.2"}))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert detail == {"weight_decay@decay": "0.2", "weight_decay_kept_at_0": "no_decay"}
    board.apply(board.validate({"weight_decay@no_decay": "0.05"}))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.05]
    plain = two_groups(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
    KnobBoard(plain).apply({"weight_decay": 0.1})
    assert [g["weight_decay"] for g in plain.param_groups] == [0.1, 0.1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"betas": "0.9"},
            "betas='0.9' rejected: expected exactly 2 comma-separated floats (e.g. 0.9,0.999)",
        ),
        ({"betas": "0.9,0.99,0.9"}, "expected exactly 2 comma-separated floats"),
        ({"betas": "0.9,1.0"}, "betas=0.9,1.0 rejected: must be in [0, 1)"),
        ({"eps": "0"}, "eps=0 rejected: must be in (0, 1]"),
        ({"momentum": "1.5"}, "momentum=1.5 rejected: must be in [0, 1]"),
        ({"grad_clip_norm": "-1"}, "grad_clip_norm=-1 rejected: must be in [0, 1e+06]"),
        ({"grad_accum_steps": "0"}, "grad_accum_steps=0 rejected: must be in [1, 1024]"),
        ({"grad_accum_steps": "1.5"}, "grad_accum_steps='1.5' rejected: expected an integer"),
        ({"batch_size": "65537"}, "batch_size=65537 rejected: must be in [1, 65536]"),
    ],
)
def test_builtin_bounds_have_clear_messages(values: dict[str, str], message: str) -> None:
    with pytest.raises(CommandRejected) as info:
        validate_set(BUILTIN_SPECS, values)
    assert message in info.value.reason


def step_n(opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    for _ in range(n):
        opt.step()
        sched.step()


SCHEDULERS: list[tuple[str, Callable[[torch.optim.Optimizer], Any]]] = [
    ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)),
    ("lambda", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e))),
]


@pytest.mark.parametrize(("label", "make"), SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_lr_with_scheduler_is_x_now_and_scales_the_rest_of_the_schedule(
    label: str, make: Callable[[torch.optim.Optimizer], Any]
) -> None:
    """After lr@body=X at step 4, body's lr is X, then X / (the untouched lr at 4) times the untouched
    schedule; the scheduler's own hyper-parameters stay as they were (tests/unit/test_threadlet_lr.py
    covers every scheduler)."""
    ref_opt = two_groups(torch.optim.SGD, lr=0.1)
    ref = make(ref_opt)
    opt = two_groups(torch.optim.SGD, lr=0.1)
    sched = make(opt)
    board = KnobBoard(opt, sched)
    step_n(ref_opt, ref, 4)
    step_n(opt, sched, 4)
    at_set = ref_opt.param_groups[0]["lr"]
    board.apply(board.validate({"lr@body": "0.4"}))
    body, head = opt.param_groups
    assert body["lr"] == 0.4 and sched.get_last_lr()[0] == 0.4
    assert body["initial_lr"] == 0.1 and sched.base_lrs == [0.1, 0.1]
    for _ in range(10):
        step_n(ref_opt, ref, 1)
        step_n(opt, sched, 1)
        assert body["lr"] == pytest.approx(0.4 / at_set * ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        assert head["lr"] == pytest.approx(ref_opt.param_groups[1]["lr"], rel=1e-9, abs=1e-12)


def test_lr_without_scheduler_is_set_as_given() -> None:
    opt = two_groups(torch.optim.SGD, lr=0.1)
    KnobBoard(opt).apply({"lr": 0.3})
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]


def test_clip_helper_enables_knob_and_clips_to_current_value() -> None:
    board = KnobBoard(two_groups(torch.optim.SGD, lr=0.1))
    assert "grad_clip_norm" not in board.schema
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    assert board.training.clip_grad_([p]) is None  # default 0: disabled, but now reported
    assert board.schema["grad_clip_norm"].min == 0.0
    assert {s.name: s.value for s in board.specs()}["grad_clip_norm"] == 0.0
    board.apply(board.validate({"grad_clip_norm": "1.5"}))
    assert board.training.clip_grad_([p]) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.5, rel=1e-4)
    board.apply(board.validate({"grad_clip_norm": 0}))
    assert board.training.clip_grad_([p]) is None


def test_accum_property_enables_knob_and_follows_changes() -> None:
    board = KnobBoard()
    assert "grad_accum_steps" not in board.schema
    assert board.training.grad_accum_steps == 1
    assert board.schema["grad_accum_steps"].type is KnobType.INT
    board.apply(board.validate({"grad_accum_steps": "8"}))
    assert board.training.grad_accum_steps == 8
    with pytest.raises(CommandRejected, match=r"must be in \[1, 1024\]"):
        board.validate({"grad_accum_steps": 2048})


def test_training_knobs_enable_checks_bounds() -> None:
    changes: list[int] = []
    t = TrainingKnobs(on_schema_change=lambda: changes.append(1))
    t.enable(grad_clip_norm=1.0, grad_accum_steps=4)
    assert t.enabled == ("grad_clip_norm", "grad_accum_steps") and changes == [1]
    assert (t.grad_clip_norm, t.grad_accum_steps) == (1.0, 4)
    with pytest.raises(ValueError, match=r"grad_accum_steps=0 rejected: must be in \[1, 1024\]"):
        t.enable(grad_accum_steps=0)


def test_validate_hook_refuses_before_any_state_changes() -> None:
    opt = two_groups(torch.optim.SGD, lr=0.1)
    board = KnobBoard(opt)
    state = {"mode": "a"}

    def check(value: object) -> None:
        if value not in {"a", "b"}:
            raise ValueError(f"mode={value!r} rejected: expected a or b")

    board.register(
        KnobSpec(name="mode", type=KnobType.STR),
        get=lambda: state["mode"],
        apply=lambda v: state.update(mode=str(v)),
        validate=check,
    )
    with pytest.raises(CommandRejected, match="expected a or b") as info:
        board.validate({"lr": "0.5", "mode": "c"})
    assert info.value.key == "mode"
    # Even unvalidated, apply runs every hook first: lr (sorted before mode) stays untouched.
    with pytest.raises(ValueError, match="expected a or b"):
        board.apply({"lr": 0.5, "mode": "c"})
    assert opt.param_groups[0]["lr"] == 0.1 and state["mode"] == "a"
    board.apply(board.validate({"lr": "0.5", "mode": "b"}))
    assert opt.param_groups[0]["lr"] == 0.5 and state["mode"] == "b"


def test_user_knob_cannot_take_a_training_knob_name() -> None:
    board = KnobBoard()
    with pytest.raises(ValueError, match="already exists"):
        board.register(KnobSpec(name="grad_clip_norm", type=KnobType.FLOAT), get=lambda: 0.0, apply=print)
    assert math.isclose(board.training.grad_clip_norm, 0.0)


def test_a_fixed_knob_is_reported_and_every_set_refused_with_its_reason() -> None:
    board = KnobBoard()
    board.training.fix(grad_accum_steps=4, reason="grad_accum_steps cannot change live here: because")
    spec = board.schema["grad_accum_steps"]
    assert spec.description == "fixed: grad_accum_steps cannot change live here: because"
    assert {s.name: s.value for s in board.specs()} == {"grad_accum_steps": 4}
    with pytest.raises(CommandRejected, match="cannot change live here: because") as info:
        board.validate({"grad_accum_steps": "8"})
    assert info.value.key == "grad_accum_steps"
    with pytest.raises(CommandRejected, match="cannot change live here"):  # apply checks it too
        board.apply({"grad_accum_steps": 8})
    assert board.training.grad_accum_steps == 4
    board.training.enable(grad_clip_norm=1.0)  # other knobs stay settable
    board.apply(board.validate({"grad_clip_norm": "2"}))
    assert board.training.grad_clip_norm == 2.0
    with pytest.raises(ValueError, match="say why"):
        board.training.fix(grad_accum_steps=4, reason="")
    with pytest.raises(ValueError, match=r"must be in \[1, 1024\]"):
        board.training.fix(grad_accum_steps=0, reason="x")
