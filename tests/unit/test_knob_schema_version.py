"""An idle rank's status is cheap: the knob board counts schema versions, and the `Reporter` hashes
the schema and sends it in full only after a version whose schema differs (for a few heartbeat
intervals, then again only after `_KNOBS_REFRESH_S`); between, a status reads the values alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tests.unit.factories import local_config
from threadlet import reports
from threadlet.optim_knobs import KnobBoard
from threadlet.reports import Reporter
from threadlet.state import RankContext, TrainingState
from torchloom import knobs
from torchloom.messages import Heartbeat, KnobSpec, KnobType, RankState

SPEC = KnobSpec(name="dropout", type=KnobType.FLOAT, min=0.0, max=1.0, description="p")
HB_S = local_config().heartbeat_interval_s
FULL_S = reports._KNOBS_FULL_INTERVALS * HB_S


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _board() -> KnobBoard:
    model = nn.Linear(4, 1)
    return KnobBoard(torch.optim.AdamW(model.parameters(), lr=1e-3))


def _reporter(board: KnobBoard, clock: Clock) -> Reporter:
    return Reporter(local_config(), RankContext.detect(), TrainingState(), board, None, clock=clock)


def _full(hb: Heartbeat) -> bool:
    return bool(hb.knobs)


def test_the_board_counts_a_version_per_schema_change_and_none_per_value_change() -> None:
    board = _board()
    v0 = board.schema_version
    board.apply({"lr": 0.5})
    board.values()
    assert board.schema_version == v0  # a value is not the schema
    board.register(SPEC, lambda: 0.1, lambda v: None)
    assert board.schema_version == v0 + 1
    board.training.enable(grad_clip_norm=1.0)
    assert board.schema_version == v0 + 2
    board.training.enable(grad_clip_norm=2.0)  # already enabled: a value only
    assert board.schema_version == v0 + 2
    board.training.fix(grad_accum_steps=2, reason="the trainer fixes it")
    assert board.schema_version == v0 + 3
    assert [s.name for s in board.schema_specs()] == sorted(board.schema)
    assert all(s.value is None for s in board.schema_specs())
    assert board.values() == {s.name: s.value for s in board.specs() if s.value is not None}


def test_values_follow_an_optimizer_whose_state_was_loaded() -> None:
    """A rollback loads the optimizer's state, which replaces its `param_groups` list: the values a
    heartbeat carries must be read from the optimizer as it is now, not from the list it had when the
    schema was built (test_search saw a stale lr in status after its rollback and set)."""
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    board = KnobBoard(opt)
    saved = opt.state_dict()
    board.apply({"lr": 0.5})
    assert board.values()["lr"] == 0.5
    opt.load_state_dict(saved)  # as a rollback does
    assert board.values()["lr"] == pytest.approx(1e-3)
    assert board.values()["betas"] == (0.9, 0.99)
    board.apply({"lr": 0.1})  # a set after the rollback
    assert board.values()["lr"] == pytest.approx(0.1) == opt.param_groups[0]["lr"]


def test_the_schema_rides_in_full_exactly_after_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[int] = []
    real_hash = knobs.schema_hash
    monkeypatch.setattr(knobs, "schema_hash", lambda specs: hashed.append(1) or real_hash(specs))
    board, clock = _board(), Clock()
    value = [0.1]
    board.register(SPEC, lambda: value[0], lambda v: None)
    rep = _reporter(board, clock)
    first = rep.status(RankState.RUNNING)
    assert _full(first) and first.knobs_hash == real_hash(board.schema_specs())
    assert {s.name: s.value for s in first.knobs}["dropout"] == 0.1
    clock.t += FULL_S  # the full window has passed
    # Many statuses with changing values over most of the refresh period: hash only, hashed once.
    for i in range(int((reports._KNOBS_REFRESH_S - FULL_S) / (HB_S / 2)) - 1):
        value[0] = i / 1000
        board.apply({"lr": 1e-3 * (i + 1)})
        rep.status_due()  # as the front does after a decided command: the values are read again
        hb = rep.status(RankState.RUNNING)
        assert not _full(hb) and hb.knobs_hash == first.knobs_hash
        assert hb.knob_values["dropout"] == value[0] and hb.knob_values["lr"] == pytest.approx(1e-3 * (i + 1))
        clock.t += HB_S / 2
    assert len(hashed) == 1
    # A knob registered: the schema rides in full at once, for the window, then its hash again.
    board.register(dataclasses.replace(SPEC, name="extra"), lambda: 1.0, lambda v: None)
    changed = rep.status(RankState.RUNNING)
    assert _full(changed) and {"dropout", "extra"} <= {s.name for s in changed.knobs}
    assert changed.knobs_hash != first.knobs_hash and len(hashed) == 2
    clock.t += FULL_S - 0.01
    assert _full(rep.status(RankState.RUNNING))
    clock.t += 0.02
    assert not _full(rep.status(RankState.RUNNING))


def test_a_new_version_of_the_same_schema_is_not_sent_again() -> None:
    board, clock = _board(), Clock()
    rep = _reporter(board, clock)
    assert _full(rep.status(RankState.RUNNING))
    clock.t += FULL_S
    reason = "the trainer fixes it"
    board.training.fix(grad_accum_steps=2, reason=reason)
    assert _full(rep.status(RankState.RUNNING))  # a new knob
    clock.t += FULL_S
    version = board.schema_version
    board.training.fix(grad_accum_steps=2, reason=reason)  # rebuilt, yet the same schema
    assert board.schema_version == version + 1
    assert not _full(rep.status(RankState.RUNNING))


def test_the_schema_rides_again_after_the_refresh_period() -> None:
    board, clock = _board(), Clock()
    rep = _reporter(board, clock)
    assert _full(rep.status(RankState.RUNNING))
    clock.t += reports._KNOBS_REFRESH_S - 0.01
    assert not _full(rep.status(RankState.RUNNING))
    clock.t += 0.02
    assert _full(rep.status(RankState.RUNNING))
