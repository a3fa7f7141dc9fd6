"""`bus.retry_dropped`: a request that gets no answer (a JetStream cluster drops API requests for a
moment after a server rejoins) is asked again with a doubled timeout, within one total bound.

Over a real nats-server: the responder drops the first request(s) as the cluster does and answers
a later one; the call sees the per-attempt timeout through the JetStream context it is given."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from torchloom import bus
from torchloom.nats_server import EmbeddedNats

SUBJECT = "probe.api"


@pytest.fixture
async def open_nc(tmp_path: Path) -> AsyncIterator[Client]:
    # An open server: what is under test is the retry, not NATS roles.
    server = EmbeddedNats(tmp_path / "open-nats")
    server.start()
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()
        server.stop()


async def _responder(nc: Client, drop: int) -> list[bytes]:
    """Answer requests on SUBJECT after dropping the first `drop`; returns what it was asked."""
    asked: list[bytes] = []

    async def answer(msg: Msg) -> None:
        asked.append(msg.data)
        if len(asked) > drop:
            await msg.respond(b"answer to " + msg.data)

    await nc.subscribe(SUBJECT, cb=answer)
    await nc.flush()
    return asked


def _asker(nc: Client, timeouts: list[float]):  # type: ignore[no-untyped-def]
    async def call(js: JetStreamContext) -> bytes:
        timeouts.append(js._timeout)  # the attempt's bound, as every request of `js` gets it
        reply = await nc.request(SUBJECT, f"attempt {len(timeouts)}".encode(), timeout=js._timeout)
        return reply.data

    return call


async def test_a_dropped_request_is_asked_again_with_a_doubled_timeout(open_nc: Client) -> None:
    asked = await _responder(open_nc, drop=2)
    timeouts: list[float] = []
    got = await bus.retry_dropped(open_nc, _asker(open_nc, timeouts), total_s=10.0, first_s=0.2)
    assert got == b"answer to attempt 3"
    assert timeouts == [0.2, 0.4, 0.8]
    assert asked == [b"attempt 1", b"attempt 2", b"attempt 3"]


async def test_an_answer_in_time_is_asked_once(open_nc: Client) -> None:
    asked = await _responder(open_nc, drop=0)
    timeouts: list[float] = []
    assert await bus.retry_dropped(open_nc, _asker(open_nc, timeouts), total_s=10.0) == b"answer to attempt 1"
    assert timeouts == [bus.DROPPED_FIRST_S] and asked == [b"attempt 1"]


async def test_no_answer_within_the_total_is_a_timeout(open_nc: Client) -> None:
    asked = await _responder(open_nc, drop=1000)
    timeouts: list[float] = []
    with pytest.raises(TimeoutError):
        await bus.retry_dropped(open_nc, _asker(open_nc, timeouts), total_s=3.0, first_s=0.2)
    # Doubling, and the last attempt bounded by what was left: never past the total.
    assert timeouts[:3] == [0.2, 0.4, 0.8], timeouts
    assert sum(timeouts) <= 3.0 + 1e-6, timeouts
    assert len(asked) == len(timeouts)
