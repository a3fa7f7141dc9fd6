"""A cancellation that nats-py's request swallows still stops the weaver's loops.

nats-py awaits every request's answer with `asyncio.wait_for`; on Python 3.11 a cancellation that
arrives in the same turn as the answer is dropped (CPython gh-86296). The weaver's outbox then went
back to waiting for work with its cancellation lost, and a weaver's close hung for good (seen once in
a few dozen restarts of tests/integration/test_journal_durability.py). These tests make that race
deterministic: the answer and the cancel land in one callback.
"""

from __future__ import annotations

import asyncio

import pytest

from torchloom import bus
from weaver.streams import Outbox, OutboxItem


def _answer_and_cancel(answer: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    """Resolve `answer` and cancel `task` in the same loop turn, as a PubAck racing a close does."""

    def both() -> None:
        answer.set_result(None)
        task.cancel()

    asyncio.get_running_loop().call_soon(both)


async def test_the_race_is_real_on_this_python() -> None:
    """The premise: `wait_for` returns the answer and the task goes on, still `cancelling()`."""
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    went_on = asyncio.Event()

    async def requester() -> None:
        await asyncio.wait_for(answer, 5)
        went_on.set()
        bus.check_cancelled()

    task = asyncio.create_task(requester())
    await asyncio.sleep(0)
    _answer_and_cancel(answer, task)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    # On 3.12+ wait_for keeps the cancellation and the requester never goes on; either way the task
    # ends cancelled, which is all the loops rely on.
    assert task.cancelled()
    assert went_on.is_set() or not task.cancelling()


async def test_check_cancelled_is_silent_for_a_task_nobody_cancelled() -> None:
    bus.check_cancelled()  # no exception
    await asyncio.sleep(0)
    bus.check_cancelled()


async def test_outbox_stops_when_its_cancel_arrives_with_a_publish_answer() -> None:
    outbox = Outbox()
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    published: list[str] = []

    async def publish(item: OutboxItem) -> None:
        await asyncio.wait_for(answer, 5)  # as nats-py's JetStream publish awaits its PubAck
        published.append(item.subject)

    outbox.put("torchloom.v1.journal.j", b"x", keep=True)
    runner = asyncio.create_task(outbox.run(publish))
    await asyncio.sleep(0.01)  # the runner waits for the answer
    _answer_and_cancel(answer, runner)
    done, _ = await asyncio.wait({runner}, timeout=2)
    assert runner in done, "the outbox loop went on waiting after it was cancelled"
    assert runner.cancelled()
    assert published in ([], ["torchloom.v1.journal.j"])  # the answer may or may not have been taken
