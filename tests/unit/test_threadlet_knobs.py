"""Built-in optimizer knobs and user knobs: schema, group scoping, lr under a scheduler, local decisions."""

from __future__ import annotations

import time

import pytest
import torch

import threadlet
from tests.unit.factories import action, command, local_config
from threadlet.optim_knobs import KnobBoard, knob_type
from torchloom.knobs import validate_set
from torchloom.messages import ActionKind, KnobType, SetConfig


def make_optimizer(**group_extra: object) -> torch.optim.Optimizer:
    body = torch.nn.Linear(2, 2)
    head = torch.nn.Linear(2, 1)
    return torch.optim.AdamW(
        [
            {"params": body.parameters(), "name": "body", **group_extra},
            {"params": head.parameters(), "name": "head"},
        ],
        lr=1e-3,
        weight_decay=0.01,
    )


def test_schema_reports_groups_and_only_present_knobs() -> None:
    board = KnobBoard(make_optimizer())
    assert set(board.schema) == {"lr", "weight_decay", "betas", "eps"}
    assert board.schema["lr"].groups == ("body", "head")
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sgd.param_groups[0].pop("weight_decay")
    assert set(KnobBoard(sgd).schema) == {"lr", "momentum"}
    assert KnobBoard(sgd).schema["lr"].groups == ("0",)


def test_apply_every_group_and_one_group() -> None:
    opt = make_optimizer()
    board = KnobBoard(opt)
    board.apply(validate_set(board.schema, {"lr": "0.02"}))
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]
    board.apply(validate_set(board.schema, {"lr@head": 0.5, "weight_decay@body": 0.0}))
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.01]
    assert board.group_values("lr") == {"body": 0.02, "head": 0.5}
    specs = {s.name: s for s in board.specs()}
    assert specs["lr"].value == 0.02


def test_lr_is_x_under_a_scheduler_and_the_schedule_follows() -> None:
    opt = make_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    board = KnobBoard(opt, sched)
    board.apply({"lr@body": 0.1})
    assert opt.param_groups[0]["lr"] == 0.1 and sched.base_lrs == [1e-3, 1e-3]
    opt.step()
    sched.step()
    # The scheduler's next step keeps X (its schedule is flat) instead of putting 5e-4 back.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-4)


def test_duplicate_group_names_are_rejected() -> None:
    p = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [p[0]], "name": "a"}, {"params": [p[1]], "name": "a"}], lr=0.1)
    with pytest.raises(ValueError, match="must be unique"):
        KnobBoard(opt)


def test_knob_type_accepts_enum_name_and_python_type() -> None:
    assert knob_type(KnobType.INT) is KnobType.INT
    assert knob_type("bool") is KnobType.BOOL
    assert knob_type(float) is KnobType.FLOAT
    with pytest.raises(ValueError, match="expected one of float"):
        knob_type(dict)


def test_local_threadlet_decides_user_knob_and_rejections_at_next_step() -> None:
    """World size 1: commands filed by the bus side are decided locally at the next boundary."""
    opt = make_optimizer()
    cfg = local_config()
    tl = threadlet.attach(optimizer=opt, config=cfg)
    try:
        state = {"batch": 8}
        tl.knob(
            "batch", int, min=1, max=64, get=lambda: state["batch"], apply=lambda v: state.update(batch=v)
        )
        with pytest.raises(ValueError, match="already exists"):
            tl.knob("lr", float, get=lambda: 0.0, apply=lambda v: None)
        tl.step(loss=1.0)
        # The link thread would call this on receipt; doing it here keeps the test free of a bus.
        now = time.time()
        tl._agreement.file(command(1, SetConfig(values={"batch": "16", "lr@head": 0.2})), now)
        tl._agreement.file(command(2, SetConfig(values={"batch": 100})), now)
        tl._agreement.file(action(3, ActionKind.EVAL), now)
        tl._agreement.file(command(1, SetConfig(values={"batch": 2})), now)  # duplicate seq: ignored
        tl.step(loss=1.0)
        assert state["batch"] == 16
        assert opt.param_groups[1]["lr"] == 0.2
        assert [(a.seq, a.status, a.step) for a in tl.applied] == [
            (1, "applied", 2),
            (2, "rejected", 2),
        ]
        assert "must be in [1, 64]" in tl.applied[1].reason
        assert tl.applied[1].reason.startswith("rank 0 refused: ")
        tl.step()
        assert (
            tl.applied[2].reason == "rank 0 refused: no eval function registered: pass eval_fn= to attach()"
        )
        tl._agreement.file(command(1, SetConfig(values={"batch": 2})), now)  # already decided: ignored
        tl.step()
        assert len(tl.applied) == 3 and tl.step_count == 4
    finally:
        tl.close()
        tl.close()


def test_local_mode_without_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHLOOM_NATS_URL", raising=False)
    with threadlet.attach(optimizer=make_optimizer()) as tl:
        for _ in range(3):
            tl.step(loss=0.5)
        assert tl.step_count == 3 and tl.applied == []
        assert tl.config.local


def test_user_knob_spec_bounds_checked() -> None:
    tl = threadlet.attach(config=threadlet.ThreadletConfig())
    with pytest.raises(ValueError, match="min=2 must be <= max=1"):
        tl.knob("x", float, min=2, max=1, get=lambda: 1.0, apply=lambda v: None)
    with pytest.raises(ValueError, match="'@' is reserved"):
        tl.knob("x@y", float, get=lambda: 1.0, apply=lambda v: None)
    assert [s.name for s in tl._board.specs()] == []
    tl.close()
