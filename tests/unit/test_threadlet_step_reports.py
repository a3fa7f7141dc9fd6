"""`tl.step()` hands its reports over as raw values and the link thread builds the messages: a
heartbeat built on another thread while the training thread steps always comes from one step boundary,
the training thread never builds a `Heartbeat` or `StepMetrics`, the metrics carry what the step gave
(a tensor loss and tensor metrics read on the training thread, the lr of every parameter group), and a
set lr that something else overwrites is reported once, on the check's clock. No sockets: the link's
NATS is never reached; its builders are called the way its loops call them."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
import torch

import threadlet
from tests.unit.factories import local_config, set_config
from threadlet.reports import Outbox
from torchloom.messages import Heartbeat, RankState, StepMetrics

DEADLINE_S = 10.0


def _config(**fields: Any) -> threadlet.ThreadletConfig:
    return dataclasses.replace(local_config(), **fields)


def _two_groups() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "name": "body", "lr": 0.1},
            {"params": model[1].parameters(), "name": "head", "lr": 0.01},
        ]
    )
    return model, opt


def _values(hb: Heartbeat) -> dict[str, object]:
    """The knob values of a heartbeat, whether it carries the full schema or only the values."""
    return {k.name: k.value for k in hb.knobs} if hb.knobs else dict(hb.knob_values)


@pytest.fixture
def tl() -> Iterator[threadlet.Threadlet]:
    model, opt = _two_groups()
    # Reports only when a test makes them due: the clocks are far away.
    with threadlet.attach(
        config=_config(heartbeat_interval_s=60.0, metrics_interval_s=60.0), model=model, optimizer=opt
    ) as t:
        yield t


def test_a_status_is_handed_over_at_a_boundary_and_stays_that_boundary_s(tl: threadlet.Threadlet) -> None:
    link = tl._link
    assert link is not None
    for _ in range(3):
        tl.step(loss=0.5)
    tl._reporter.status_due()
    tl.step(loss=0.5)
    hb = link.status
    assert hb is not None
    assert (hb.step, hb.tick, hb.state, hb.last_seq) == (4, 4, RankState.RUNNING, 0)
    for _ in range(5):
        tl.step(loss=0.5)
    later = link.status
    # Nothing handed over since: the tick and last seq are still that boundary's, but the step is
    # where the rank is now, so a rank blocked between two hand-overs (in a collective waiting on a
    # hung peer) is not reported behind the peer it waits on.
    assert later is not None and (later.step, later.tick, later.last_seq) == (9, 4, 0)
    # A boundary that decides a command hands over a status naming it, with the values after it.
    tl._agreement.file(set_config(1, lr=0.05), time.time())
    tl.step(loss=0.5)
    after = link.status
    assert after is not None and tl.applied[-1].applied
    assert (after.step, after.tick, after.last_seq) == (10, 10, 1)
    assert _values(after)["lr"] == 0.05


def test_a_heartbeat_built_while_the_training_thread_steps_is_never_behind_its_boundary(
    tl: threadlet.Threadlet,
) -> None:
    outbox = tl._reporter.outbox
    seen: list[Heartbeat] = []
    stop = threading.Event()

    def link_side() -> None:  # as the link thread's heartbeat loop does, as fast as it can
        while not stop.is_set():
            hb = outbox.status()
            if hb is not None:
                seen.append(hb)

    reader = threading.Thread(target=link_side)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL back and forth often, inside boundaries too
    reader.start()
    try:
        for _ in range(600):
            tl._reporter.status_due()  # a status at every boundary
            tl.step(loss=0.5)
            time.sleep(0)  # let the reader in between boundaries too
    finally:
        stop.set()
        reader.join(timeout=DEADLINE_S)
        sys.setswitchinterval(interval)
    assert len(seen) > 20
    # Without a rollback step and tick advance together; the step is read live, the tick is the
    # boundary's, so the step is never behind it.
    assert all(hb.step >= hb.tick and hb.state is RankState.RUNNING for hb in seen)
    assert len({hb.step for hb in seen}) > 10


def test_the_training_thread_builds_no_message(tl: threadlet.Threadlet) -> None:
    builders = {
        Outbox.heartbeat.__code__,
        Outbox.step_metrics.__code__,
        Heartbeat.__init__.__code__,
        StepMetrics.__init__.__code__,
    }
    built: list[str] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code in builders:
            built.append(frame.f_code.co_qualname)

    outbox = tl._reporter.outbox
    handed = {"status": 0, "metrics": 0}
    sys.setprofile(profile)  # this thread only: the link thread may build
    try:
        for i in range(400):
            status, metrics = outbox.status_values, outbox.metrics_values
            if i % 2:
                tl._reporter.status_due()
            else:
                tl._reporter.next_metrics_t = 0.0
            tl.step(loss=0.5, tokens=64.0)
            handed["status"] += outbox.status_values is not status
            handed["metrics"] += outbox.metrics_values is not metrics
    finally:
        sys.setprofile(None)
    assert built == []
    assert handed == {"status": 200, "metrics": 200}
    hb, sm = outbox.status(), outbox.new_metrics()
    assert hb is not None and sm is not None and sm.values["tokens"] == 64.0


def test_the_metrics_carry_what_the_step_gave(
    tl: threadlet.Threadlet, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = tl._reporter.outbox
    tl.step(loss=0.5)
    tl._reporter.next_metrics_t = 0.0
    before = time.time()
    with caplog.at_level(logging.WARNING, logger="threadlet"):
        tl.step(  # type: ignore[arg-type]  # a tensor loss and metrics as the integrations pass them
            loss=torch.tensor(float("nan")), tokens=128, acc=torch.tensor(0.25), n=3, note="high"
        )
    after = time.time()
    sm = outbox.new_metrics()
    assert sm is not None and outbox.new_metrics() is None  # published once
    again = outbox.metrics()  # built again from the same values
    assert again is not None and again.values == sm.values and abs(again.time_s - sm.time_s) < 1e-3
    assert (sm.step, sm.branch) == (2, "main")
    assert before <= sm.time_s <= after + 0.01  # the wall clock of its boundary, not of the build
    values = dict(sm.values)
    assert math.isnan(values.pop("loss")) and values.pop("step_time_s") > 0
    assert values == {
        "nonfinite_loss_steps": 1.0,
        "nonfinite_grad_steps": 0.0,
        "tokens": 128.0,
        "lr": 0.1,
        "lr@body": 0.1,
        "lr@head": 0.01,
        "acc": 0.25,
        "n": 3.0,
    }
    assert "metric note='high' dropped: expected a number" in caplog.text
    # A float loss that is not finite is counted at every step, metrics due or not.
    tl.step(loss=math.inf)
    tl._reporter.next_metrics_t = 0.0
    tl.step(loss=0.5)
    sm = outbox.new_metrics()
    assert sm is not None and sm.values["nonfinite_loss_steps"] == 2.0 and sm.values["loss"] == 0.5


def test_an_overwritten_lr_set_is_reported_once_on_the_check_s_clock(
    tl: threadlet.Threadlet, caplog: pytest.LogCaptureFixture
) -> None:
    opt_groups = tl._board._optimizer.param_groups  # no scheduler: the set value is watched
    tl._agreement.file(set_config(1, **{"lr@head": 0.05}), time.time())
    tl.step()
    assert tl.applied[-1].applied and opt_groups[1]["lr"] == 0.05
    opt_groups[1]["lr"] = 0.02  # the loop's own code overwrites it

    def notices() -> int:
        return caplog.text.count("lr@head=0.05 set by torchloom was changed to 0.02")

    with caplog.at_level(logging.WARNING, logger="threadlet"):
        end = time.monotonic() + DEADLINE_S
        while notices() == 0 and time.monotonic() < end:
            tl.step()
        assert notices() == 1
        reported_at = time.perf_counter()
        while time.perf_counter() - reported_at < 0.2:  # a few more check periods
            tl.step()
    assert notices() == 1  # reported once
