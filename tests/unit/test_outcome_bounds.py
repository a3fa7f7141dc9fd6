"""No one answer can make an outcome too large to journal or to send: a command body is at most
`wire.BODY_MAX_BYTES` (refused naming the bound), each rank's reason and detail are cut, an outcome's
own reason quotes a few ranks, and a journal entry the server can never store is dropped instead of
holding every entry behind it.

A tester's 1 MB `mix` value was published, both ranks refused it quoting it, and the 5 MB outcome
broke every unfiltered journal read over gRPC (4 MiB); at 9 MB nats-server's max_payload refused it
and the outbox retried it forever, so nothing after it was journaled, across weaver restarts."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from tests.unit import factories as f
from torchloom import wire
from torchloom.errors import CommandRejected
from torchloom.messages import AckStatus, KnobSpec, KnobType, OutcomeStatus, SetConfig
from weaver import outcomes, submits
from weaver.model import JobState, Pending
from weaver.streams import Outbox, OutboxItem


def _job() -> JobState:
    mix = KnobSpec(name="mix", type=KnobType.STR, value="a:1")
    return JobState(job=f.JOB, run_id=f.RUN, world_size=2, started_at_s=0.0, knobs=(mix,))


def test_a_body_over_the_bound_is_refused_naming_it_and_one_under_it_passes() -> None:
    job = _job()
    ok = "a:1," * 1000
    assert submits.validate_body(job, SetConfig(values={"mix": ok})) == SetConfig(values={"mix": ok})
    with pytest.raises(
        CommandRejected, match=f"a config change or action is at most {wire.BODY_MAX_BYTES} bytes"
    ):
        submits.validate_body(job, SetConfig(values={"mix": "a" * wire.BODY_MAX_BYTES}))


def test_each_ranks_answer_is_cut_and_the_outcome_reason_quotes_a_few_ranks() -> None:
    cmd = f.set_config(3, lr=0.1)
    world = 40
    pending = Pending(command=cmd, world_size=world, submitted_at_s=1.0)
    long = "x" * 1_000_000
    for rank in range(world):
        detail = {f"k{i}": "v" * 5000 for i in range(40)}
        pending.acks[rank] = f.ack(3, rank, AckStatus.REJECTED, long, detail=detail)
    out = outcomes.compute_outcome(pending, 2.0)
    assert out is not None and out.status is OutcomeStatus.REJECTED
    assert len(out.results) == world  # every rank's answer is there, cut
    first = out.results[0]
    assert (
        first.reason.startswith("x" * outcomes.RESULT_TEXT_MAX) and "cut: 1000000 characters" in first.reason
    )
    assert first.detail["detail_cut"] == "25 of 40 entries left out" and len(first.detail) == 16
    assert first.detail["k0"] == "v" * outcomes.RESULT_TEXT_MAX + "... (cut: 5000 characters)"
    assert out.reason.count("rank ") == outcomes.REASONS_LISTED  # 8 quoted, then how many more
    assert out.reason.endswith(f"and {world - outcomes.REASONS_LISTED} more rank(s) (see each rank's result)")
    assert len(wire.encode(out)) < 1024 * 1024  # from 40 MB of answers
    # Who asked and in which run, on every outcome (the proto's promise), not only on refusals.
    assert out.issuer == cmd.issuer and out.run_id == f.RUN


async def test_an_entry_the_server_can_never_store_is_dropped_and_the_next_one_is_stored() -> None:
    outbox = Outbox()
    stored: list[bytes] = []
    after: list[str] = []
    small_stored = asyncio.Event()

    async def publish(item: OutboxItem) -> None:
        if len(item.payload) > 10:
            raise nats.errors.MaxPayloadError
        stored.append(item.payload)
        small_stored.set()

    async def then() -> None:
        after.append("big")

    outbox.put("torchloom.v1.journal.j", b"x" * 11, keep=True, then=then)
    outbox.put("torchloom.v1.journal.j", b"small", keep=True)
    runner = asyncio.create_task(outbox.run(publish))
    try:
        async with asyncio.timeout(5):  # before, the big entry was retried forever
            await small_stored.wait()
    finally:
        runner.cancel()
    assert stored == [b"small"] and after == ["big"]
