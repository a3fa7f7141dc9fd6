"""A step with nothing pending is O(1) and keeps nothing: many idle `tl.step()` calls (with a set lr
watched too), and many idle boundaries of a piggybacked agreement with the backwards that carry its
rounds, leave no memory allocated by the threadlet behind (tracemalloc, filtered to the threadlet's own
files); between reports, only the step's own counters. Counts of blocks, not time: tests never assert
on wall-clock time."""

from __future__ import annotations

import dataclasses
import logging
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import threadlet
from tests.unit.factories import local_config, set_config
from tests.unit.test_threadlet_agreement import _refusing
from threadlet.agreement import Agreement
from threadlet.config import ThreadletConfig
from threadlet.ddp_hook import PiggybackTransport
from threadlet.state import TrainingState

THREADLET = str(Path(threadlet.__file__).parent)
WARM_UP = 300
STEPS = 5_000
# A leak of one block per step would show as STEPS blocks; a few stay from what is replaced now and
# then (the latest metrics and status swapped in on their clock, an int that grew a digit).
MAX_BLOCKS = 50


def _blocks_left(run: Callable[[int], None], *, bus_thread: bool = True) -> int:
    """Blocks allocated from the threadlet's files that are still alive after STEPS more steps
    (`bus_thread=False`: not counting what the link thread allocates meanwhile in link.py)."""
    run(WARM_UP)
    only_ours = [tracemalloc.Filter(True, f"{THREADLET}/*")]
    if not bus_thread:
        only_ours.append(tracemalloc.Filter(False, f"{THREADLET}/link.py"))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_ours)
        run(STEPS)
        after = tracemalloc.take_snapshot().filter_traces(only_ours)
    finally:
        tracemalloc.stop()
    return sum(stat.count_diff for stat in after.compare_to(before, "filename"))


class _Done:
    """The work of an all-reduce over a world of one rank: the sum is the tensor itself."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        fut.set_result([self._tensor])
        return fut


def _one_rank_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> _Done:
    return _Done(tensor)


def test_idle_piggybacked_boundaries_and_backwards_keep_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "all_reduce", _one_rank_all_reduce)
    state = TrainingState(step_time_s=0.002)
    transport = PiggybackTransport(1)
    agreement = Agreement(
        ThreadletConfig(), state, prepare=_refusing(set()), transport=None, piggyback=transport
    )
    bucket = torch.ones(1024)

    def run(steps: int) -> None:
        for _ in range(steps):
            transport.ride(bucket, None).wait()  # the backward carries the staged round
            state.tick += 1
            assert not agreement.read_round()
            agreement.start_round()

    assert _blocks_left(run) <= MAX_BLOCKS
    assert agreement.rounds == WARM_UP + STEPS and transport.carried == WARM_UP + STEPS - 1


def test_idle_steps_of_the_front_keep_nothing() -> None:
    # Bus mode whose NATS nobody serves: every step goes through the boundary and the report clocks.
    with threadlet.attach(config=local_config()) as tl:

        def run(steps: int) -> None:
            for _ in range(steps):
                tl.step(loss=0.5)

        assert _blocks_left(run) <= MAX_BLOCKS
        assert tl.step_count == WARM_UP + STEPS and tl.applied == []


def test_idle_steps_with_a_watched_lr_set_keep_nothing() -> None:
    # No scheduler: the set value is watched, compared with the optimizer's on the check's clock.
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with threadlet.attach(config=local_config(), model=model, optimizer=opt) as tl:
        tl._agreement.file(set_config(1, lr=0.05), time.time())
        tl.step(loss=0.5)
        assert tl.applied[-1].applied

        def run(steps: int) -> None:
            for _ in range(steps):
                tl.step(loss=0.5)

        assert _blocks_left(run) <= MAX_BLOCKS


def test_idle_steps_between_reports_keep_only_their_counters(caplog: pytest.LogCaptureFixture) -> None:
    # Reports far apart and the bus problems' log lines not kept by pytest: what is left after the
    # steps is what the steps themselves keep, the latest step count, tick, step time and clock
    # reading, each in place of the one before, and a float or two of CPython's float free list (freed
    # but still traced): 4 to 5 blocks measured, whatever the number of steps.
    caplog.set_level(logging.ERROR, logger="threadlet")
    config = dataclasses.replace(local_config(), heartbeat_interval_s=60.0, metrics_interval_s=60.0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with threadlet.attach(config=config, model=model, optimizer=opt) as tl:

        def run(steps: int) -> None:
            for _ in range(steps):
                tl.step(loss=0.5)

        assert _blocks_left(run, bus_thread=False) <= 10
