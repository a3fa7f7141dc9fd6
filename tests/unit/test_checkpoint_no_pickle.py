"""No code from data: a checkpoint's per-rank entry is JSON plus tensors, and loading a directory whose
items are crafted pickles runs nothing (the payload's marker file never appears)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from threadlet import checkpoint


class _Payload:
    """Unpickling this creates `marker`: what an attacker's checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _crafted(path: Path, state: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_save(state, checkpoint_id=str(path), no_dist=True)


@pytest.mark.parametrize("where", ["rank0", "threadlet"])
def test_crafted_pickles_in_a_checkpoint_run_nothing(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    state: dict[str, Any] = {"rank0": "{}", "threadlet": {"step": 1, "branch": "", "knobs": ""}}
    state[where] = (
        _Payload(marker) if where == "rank0" else {"step": _Payload(marker), "branch": "", "knobs": ""}
    )
    _crafted(tmp_path / "ckpt-1", state)
    with pytest.raises(checkpoint.CheckpointError, match="Weights only load failed"):
        checkpoint.load(tmp_path / "ckpt-1", rank=0, threadlet_keys={"step": 0, "branch": "", "knobs": ""})
    assert not marker.exists()


class _State:
    """A stateful object whose state has int keys, tuples, numpy values and tensors."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def test_per_rank_entry_round_trips_without_pickle(tmp_path: Path) -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    sched = _State()
    sched.state = {"last": (1, 2.5, None), "by_group": {0: [0.1, float("inf")]}, "t": torch.arange(4)}
    checkpoint.save(tmp_path / "c", rank=3, optimizer=opt, scheduler=sched, threadlet_state={"step": 2})
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.5)
    sched2 = _State()
    saved = checkpoint.load(
        tmp_path / "c", rank=3, optimizer=opt2, scheduler=sched2, threadlet_keys={"step": 0}
    )
    assert saved == {"step": 2}
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(
        opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert sched2.state["last"] == (1, 2.5, None)
    assert sched2.state["by_group"] == {0: [0.1, float("inf")]}
    assert torch.equal(sched2.state["t"], torch.arange(4))


def test_unsupported_per_rank_values_are_named(tmp_path: Path) -> None:
    sched = _State()
    sched.state = {"fn": object()}
    with pytest.raises(TypeError, match="cannot checkpoint a object in per-rank state"):
        checkpoint.save(tmp_path / "c", rank=0, scheduler=sched, threadlet_state={})
