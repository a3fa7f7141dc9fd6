"""A rank's link thread ends when the rank closes it, even when the cancellation of its connection
loop was lost inside a connect attempt: nats-py waits with `asyncio.wait_for`, which on Python 3.11
can swallow a cancellation (CPython gh-86296, `torchloom.bus.check_cancelled`). The connect attempt
here is a stand-in at that boundary that loses the cancellation the same way."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest

from tests.unit.factories import local_config
from threadlet.link import Link
from torchloom import bus


def test_close_stops_a_connection_loop_whose_connect_lost_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[int] = []
    entered = threading.Event()

    async def connect(*_args: Any, **_kwargs: Any) -> Any:
        attempts.append(1)
        entered.set()
        # An attempt still waiting for the server, whose cancellation is lost (as asyncio.wait_for
        # may lose it on Python 3.11) and which then fails as a connect does.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        raise OSError("nats: no servers available for connection")

    monkeypatch.setattr(bus, "connect", connect)
    link = Link(local_config(), rank=0, on_command=None)
    link.start()
    assert entered.wait(10.0), "the link never tried to connect"
    link.close()  # joins the thread for at most 4 * close_timeout_s + 1 s
    assert not link._thread.is_alive(), "the connection loop went on after close"
    assert attempts == [1], "a second connect attempt started after close"
