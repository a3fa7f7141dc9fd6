"""A watcher's bounded queue: it drops the oldest events and never blocks the publisher."""

from __future__ import annotations

import asyncio

from torchloom.messages import JobEvent, StepMetrics
from weaver.watchers import Watcher


def ev(i: int, job: str = "j") -> JobEvent:
    return JobEvent(job=job, kind="k", message=str(i))


async def test_slow_watcher_drops_oldest() -> None:
    w = Watcher("", maxlen=3)
    for i in range(5):
        w.push(ev(i))
    w.close()
    got = [e.message async for e in w if isinstance(e, JobEvent)]
    assert got == ["2", "3", "4"]
    assert w.dropped == 2


async def test_job_filter_and_wakeup() -> None:
    w = Watcher("a", maxlen=10)
    first = asyncio.ensure_future(w.__anext__())
    await asyncio.sleep(0)
    assert not first.done()
    w.push(ev(1, job="b"))
    w.push(StepMetrics(job="a", run_id="r", rank=0, step=1))
    got = await asyncio.wait_for(first, 5)
    assert isinstance(got, StepMetrics) and got.job == "a"
    w.close()
    assert [e async for e in w] == []
