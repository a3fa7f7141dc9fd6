"""Checkpoint save/load in one process (no process group): model, optimizer, scheduler, sampler and
RNG state come back exactly; a missing directory is a clear error."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from threadlet import checkpoint


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()


def test_save_then_load_restores_everything_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sampler = Counter()
    train(model, opt, sched, 3)
    sampler.n = 7
    path = tmp_path / "ckpt-1"
    checkpoint.save(
        path, rank=0, model=model, optimizer=opt, scheduler=sched, sampler=sampler,
        threadlet_state={"step": 3, "branch": "main", "knobs": "{}"},
    )  # fmt: skip
    params = [p.detach().clone() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]
    draws = (torch.rand(3), random.random(), np.random.rand())

    train(model, opt, sched, 4)
    sampler.n = 99
    state = checkpoint.load(
        path, rank=0, model=model, optimizer=opt, scheduler=sched, sampler=sampler,
        threadlet_keys={"step": 0, "branch": "", "knobs": ""},
    )  # fmt: skip
    assert state == {"step": 3, "branch": "main", "knobs": "{}"}
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 3 and sampler.n == 7
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_load_of_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope does not exist on rank 1"):
        checkpoint.load(tmp_path / "nope", rank=1, threadlet_keys={})
