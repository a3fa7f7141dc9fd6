"""History after the run: a run's journal read from where it is stored, with no job running.

The run index (torchloom.app.runs) names the run's store. When the live control plane serves that
store, its weaver's journal is read over gRPC; when the run used an external server, from that server;
otherwise a private nats-server (loopback, free port, admitting only the weaver credential of this
home's credential store) is started on the stored JetStream directory, the journal stream is read, and
the server is stopped. Checkpoints and branches are rebuilt from the
entries by the weaver's own recovery (the same fold a restarted weaver does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from torchloom import bus, discovery, env, naming
from torchloom.app import controlplane_config, natsauth
from torchloom.app.runs import RunRecord
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, CredentialStore, Role
from torchloom.errors import JobNotFound, NatsUnavailable, WeaverUnavailable
from torchloom.messages import JobEvent, JobStatus, Outcome
from torchloom.nats_server import EmbeddedNats
from weaver import liveness, recovery
from weaver.health_policy import HealthPolicy
from weaver.model import WeaverState
from weaver.streams import Streams

READ_TIMEOUT_S = 10.0
# How long a live weaver that refuses is asked again (it may be stopping or restarting) before failing.
LIVE_RETRY_S = 10.0
_STORE = "jetstream"  # the directory nats-server keeps its JetStream data in, under its store_dir

Entry = Outcome | JobEvent


def run_of(entry: Entry) -> str:
    """The run id an entry belongs to ("" when it names none)."""
    if isinstance(entry, JobEvent):
        return entry.run_id
    return entry.command.run_id if entry.command is not None else entry.run_id


def of_run(entries: Iterable[Entry], record: RunRecord) -> list[Entry]:
    """The entries of the record's job and run (the run itself and its restarted attempts)."""
    return [
        e
        for e in entries
        if e.job == record.job and run_of(e) and naming.is_attempt_of(run_of(e), record.run_id)
    ]


def run_status(entries: Iterable[Entry], record: RunRecord) -> JobStatus:
    """The job's status as the run's journal leaves it: its checkpoints, branches and last seq.

    Raises:
        JobNotFound: the journal holds nothing of that run.
    """
    state = WeaverState()
    recovery.replay_journal(state, of_run(entries, record))
    job = state.jobs.get(record.job)
    if job is None:
        raise JobNotFound(f"the journal holds no entry of run {record.run_id} of job {record.job!r}")
    return liveness.job_status(job, time.time(), HealthPolicy())


async def read_entries(record: RunRecord) -> list[Entry]:
    """Every journal entry of the record's run, oldest first, from wherever it is stored now.

    Raises:
        NatsUnavailable: the store cannot be opened or read.
        WeaverUnavailable: the live weaver serving the store did not answer for `LIVE_RETRY_S`.
    """
    deadline = time.monotonic() + LIVE_RETRY_S
    while (live := discovery.read()) is not None and (
        (record.store_dir and live.store_dir == record.store_dir)
        or (not record.store_dir and live.nats_url == record.nats_url)
    ):
        try:
            async with ControlClient(live.grpc) as client, asyncio.timeout(READ_TIMEOUT_S):
                found = [e async for e in client.journal(record.job) if isinstance(e, Outcome | JobEvent)]
            return of_run(found, record)
        except WeaverUnavailable:
            # A control plane going idle (it withdraws its file, then stops) or being restarted
            # refuses for a moment: look again, and read the store itself once nothing serves it.
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)
    if record.store_dir:
        await _wait_for_holder(Path(record.store_dir), deadline)
        return of_run(await _read_store(Path(record.store_dir), record.job), record)
    # A server of the user's: their credential, if they gave one (TORCHLOOM_NATS_CREDS_FILE).
    given = env.get(env.NATS_CREDS_FILE)
    auth = natsauth.given_auth(given, Role.WEAVER) if given else None
    return of_run(await _read_url(record.nats_url, record.job, auth), record)


def _holder(store_dir: Path) -> int:
    """The pid of a control plane of this home still running on `store_dir` (its state file names
    the store, and it or its nats-server is alive), else 0. One that is exiting has withdrawn its
    discovery file already but still runs its nats-server on the store until its last step, which
    removes the state file."""
    try:
        data = json.loads(controlplane_config.state_path().read_text())
        same = Path(str(data.get("store_dir") or "")).resolve() == store_dir.resolve()
        pids = [int(data.get("pid") or 0), int(data.get("nats_pid") or 0)]
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
    if not same:
        return 0
    return next((pid for pid in pids if pid > 0 and discovery.pid_alive(pid)), 0)


async def _wait_for_holder(store_dir: Path, deadline: float) -> None:
    """Let a control plane that is exiting stop its nats-server on `store_dir` before a private one
    opens the store (until `deadline`, `time.monotonic()`): two servers on one store is not a read
    to trust. Past the deadline the store is read anyway, and a journal it cannot find is an error."""
    while time.monotonic() < deadline:
        if not _holder(store_dir):
            return
        await asyncio.sleep(0.1)


async def _read_url(url: str, job: str, credentials: ClientAuth | None) -> list[Entry]:
    nc = await bus.connect(url, name="torchloom-history", credentials=credentials)
    try:
        return [e async for e in Streams(nc.jetstream(timeout=READ_TIMEOUT_S), READ_TIMEOUT_S).journal(job)]
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _read_store(store_dir: Path, job: str) -> list[Entry]:
    """Start a private nats-server on the stored JetStream data, read the journal, stop it.

    The server runs in a temporary directory whose `jetstream` entry links to the store, so its own
    config and log never touch the run's directory.
    """
    data = store_dir / _STORE
    if not data.is_dir():
        raise NatsUnavailable(f"no JetStream store at {data}: the run's journal was removed or never written")
    with tempfile.TemporaryDirectory(prefix="torchloom-history-") as tmp:
        (Path(tmp) / _STORE).symlink_to(data.resolve(), target_is_directory=True)
        store = await asyncio.to_thread(CredentialStore.open)
        server = EmbeddedNats(tmp, credentials=store)  # no WebSocket, no anonymous client
        await asyncio.to_thread(server.start)
        try:
            return await _read_url(server.url, job, store.client_auth(Role.WEAVER))
        finally:
            await asyncio.to_thread(server.stop)
