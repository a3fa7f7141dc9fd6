"""threadlet.orphan: the watch ends the process once its parent is no longer the torchrun agent, and
is armed only for a torchrun worker whose agent is alive."""

from __future__ import annotations

import os
import threading

import pytest

from threadlet import orphan


def test_the_watch_exits_once_the_parent_changes() -> None:
    parents = iter([100, 100, 1])
    exited = threading.Event()
    codes: list[int] = []

    def record(code: int) -> None:
        codes.append(code)
        exited.set()

    watch = orphan.OrphanWatch(100, rank=3, poll_s=0.01, exit=record, parent=lambda: next(parents, 1))
    watch.start()
    assert exited.wait(5.0)
    assert codes == [orphan.EXIT_ORPHANED]


def test_a_stopped_watch_never_exits() -> None:
    codes: list[int] = []
    watch = orphan.OrphanWatch(100, rank=0, poll_s=0.01, exit=codes.append, parent=lambda: 100)
    watch.start()
    watch.stop()
    watch._thread.join(timeout=5.0)
    assert not watch._thread.is_alive() and codes == []


def test_armed_only_under_a_live_torchrun_agent() -> None:
    assert orphan.watch_if_supervised({}, rank=0) is None  # not a torchrun worker
    watch = orphan.watch_if_supervised({orphan.AGENT_ENV: "r1"}, rank=0)
    assert watch is not None and watch.agent_pid == os.getppid()
    watch.stop()


def test_poll_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll_s=0 rejected: must be a positive number of seconds"):
        orphan.OrphanWatch(100, rank=0, poll_s=0)
