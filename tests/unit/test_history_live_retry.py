"""`journal/replay --run` read a run through the live weaver serving its store; a control plane going
idle withdraws its discovery file and then stops, so for a moment the file names a weaver that
refuses. The read asks again instead of failing (a CI run's `torchloom replay --run` failed with
'connection refused' in that window), and fails naming the weaver only after `LIVE_RETRY_S`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchloom import bus, discovery, subjects
from torchloom.app import controlplane_config, history
from torchloom.app.runs import RunRecord
from torchloom.credentials import Role
from torchloom.errors import NatsUnavailable, WeaverUnavailable
from torchloom.nats_server import EmbeddedNats
from weaver.streams import Streams


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


def _holding(store: Path, pid: int) -> None:
    """A control plane's state file naming `pid` as the process running the nats-server on `store`."""
    path = controlplane_config.state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "store_dir": str(store), "nats_pid": 0}))


def test_a_control_plane_still_stopping_on_the_store_is_waited_for(tl_home: Path) -> None:
    """Exiting, a control plane withdraws its discovery file first and stops its nats-server last: a
    private server opened on the store meanwhile shares it with the live one (a CI run's journal read
    there found no entry at all). The read waits for the holder to be gone."""
    store = tl_home / "store"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    try:
        _holding(store, holder.pid)
        with pytest.raises(NatsUnavailable, match="no JetStream store at"):
            asyncio.run(history.read_entries(_record(store)))
        assert holder.poll() is not None  # the store was opened only once its holder had exited
    finally:
        holder.kill()
        holder.wait()


def test_a_control_plane_on_another_store_is_not_waited_for(tl_home: Path) -> None:
    store = tl_home / "store"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _holding(tl_home / "another-store", other.pid)
        with pytest.raises(NatsUnavailable, match="no JetStream store at"):
            asyncio.run(history.read_entries(_record(store)))
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


async def test_a_server_without_the_journal_stream_is_an_error_not_an_empty_journal(
    nats_server: EmbeddedNats,
) -> None:
    """A store that does not hold the journal (or a server that has not loaded it) cannot say what
    happened: reading it fails, naming the stream, where it read as an empty journal before."""
    assert nats_server.credentials is not None
    auth = nats_server.credentials.client_auth(Role.WEAVER)
    nc = await bus.connect(nats_server.url, name="test-history", credentials=auth)
    try:
        streams = Streams(nc.jetstream(timeout=5.0), 5.0)
        with pytest.raises(NatsUnavailable, match=f"no {subjects.STREAM_JOURNAL} stream"):
            [e async for e in streams.journal("j")]
        # Other reads of a stream that does not exist yet (a job's commands before its first) stay empty.
        assert await streams.commands("j", "r1") == []
    finally:
        await nc.close()
