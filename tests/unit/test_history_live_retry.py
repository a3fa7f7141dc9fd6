"""`journal/replay --run` read a run through the live weaver serving its store; a control plane going
idle withdraws its discovery file and then stops, so for a moment the file names a weaver that
refuses. The read asks again instead of failing (a CI run's `torchloom replay --run` failed with
'connection refused' in that window), and fails naming the weaver only after `LIVE_RETRY_S`."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from torchloom import discovery
from torchloom.app import history
from torchloom.app.runs import RunRecord
from torchloom.errors import NatsUnavailable, WeaverUnavailable


def _refusing_address() -> str:
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _record(store: Path) -> RunRecord:
    return RunRecord(run_id="r1", job="j", store_dir=str(store), nats_url="nats://127.0.0.1:4222")


def test_a_weaver_that_keeps_refusing_fails_after_the_retry_window(
    tl_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tl_home / "store"
    grpc = _refusing_address()
    discovery.write(
        discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://x:1", grpc=grpc, store_dir=str(store))
    )
    monkeypatch.setattr(history, "LIVE_RETRY_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(WeaverUnavailable, match=grpc):
        asyncio.run(history.read_entries(_record(store)))
    assert time.monotonic() - t0 >= 1.0  # asked again for the whole window, not once


def test_a_weaver_that_goes_away_is_replaced_by_reading_the_store(tl_home: Path) -> None:
    """The file is withdrawn while the read retries: the run is then read from its store (which
    this test never wrote, so the store read names what is missing: proof it was reached)."""
    store = tl_home / "store"
    discovery.write(
        discovery.WeaverInfo(
            pid=os.getpid(), nats_url="nats://x:1", grpc=_refusing_address(), store_dir=str(store)
        )
    )

    async def read() -> list[history.Entry]:
        asyncio.get_running_loop().call_later(0.5, discovery.remove)  # the control plane withdraws it
        return await history.read_entries(_record(store))

    t0 = time.monotonic()
    with pytest.raises(NatsUnavailable, match="no JetStream store at"):
        asyncio.run(read())
    assert time.monotonic() - t0 >= 0.5  # the live weaver was asked until its file went
