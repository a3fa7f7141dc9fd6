"""threadlet.integrations.common (the framework callbacks' shared parts) and attach's unwrapping of
accelerate's prepare() outputs, on real accelerate objects in one process."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

import threadlet
from threadlet.integrations.common import CommandLog, Throttle, numeric_metrics, scalar
from threadlet.state import Decided
from torchloom.messages import AckStatus


def _decided(seq: int, kind: str, status: AckStatus = AckStatus.APPLIED, **kw: object) -> Decided:
    return Decided(seq=seq, command_id=f"c{seq}", kind=kind, status=status, step=7, branch="main", **kw)


def test_command_log_writes_one_numeric_row_per_boundary_and_each_command_once() -> None:
    log = CommandLog()
    applied = [_decided(1, "set", values={"lr": 0.01, "betas": (0.8, 0.99), "mix": "a:1", "on": True})]
    assert log.row(applied) == {
        "torchloom/seq": 1.0,
        "torchloom/set/lr": 0.01,
        "torchloom/set/betas/0": 0.8,
        "torchloom/set/betas/1": 0.99,
    }
    assert log.row(applied) == {}  # nothing new
    applied += [_decided(2, "checkpoint"), _decided(3, "rollback", AckStatus.REJECTED, reason="no")]
    assert log.row(applied) == {"torchloom/seq": 3.0, "torchloom/checkpoint": 2.0, "torchloom/rejected": 3.0}


def test_numeric_metrics_keeps_finite_scalars_and_leaves_the_threadlets_own_names() -> None:
    logs = {
        "grad_norm": 0.5,
        "epoch": 1,
        "val_loss": torch.tensor(2.0),
        "loss": 3.0,  # the threadlet reports loss itself
        "lr": 0.1,
        "torchloom/seq": 4.0,  # our own rows never loop back
        "flag": True,
        "nan": float("nan"),
        "vector": torch.ones(2),
        "name": "x",
    }
    assert numeric_metrics(logs) == {"grad_norm": 0.5, "epoch": 1.0, "val_loss": 2.0}
    assert scalar(torch.tensor([1.5])) == 1.5 and scalar(None) is None


def test_throttle_is_due_first_then_once_per_interval() -> None:
    throttle = Throttle(3600.0)
    assert throttle.due() and not throttle.due()
    assert all(Throttle(0.0).due() for _ in range(3))
    with pytest.raises(ValueError, match="interval_s=-1"):
        Throttle(-1)


def test_attach_unwraps_what_accelerate_prepare_returns() -> None:
    accelerator = Accelerator(cpu=True)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model, p_opt, p_sched = accelerator.prepare(net, opt, sched)
    assert type(p_opt).__name__ == "AcceleratedOptimizer" and type(p_sched).__name__ == "AcceleratedScheduler"
    assert threadlet.unwrap_optimizer(p_opt) is opt
    assert threadlet.unwrap_scheduler(p_sched) is sched
    assert threadlet.unwrap_optimizer(opt) is opt and threadlet.unwrap_scheduler(sched) is sched
    assert threadlet.unwrap_optimizer(None) is None and threadlet.unwrap_scheduler(None) is None
    with threadlet.attach(model=model, optimizer=p_opt, scheduler=p_sched) as tl:
        tl.step(loss=1.0)
        assert tl.step_count == 1
