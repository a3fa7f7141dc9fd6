"""Integration fixtures: `procs` collects the process trees a test starts and kills what is left;
`nc` is a NATS connection to the test's server, with the weaver's credential; and, for every test, a
janitor that kills whatever process the test left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import connect, kill_tree, unbound_env
from torchloom.nats_server import EmbeddedNats

LEFTOVER_MARK = "TORCHLOOM_TEST_MARK"
LINGER_BY_DESIGN = ("torchloom.app.controlplane", "nats-server")


def _marked(mark: str) -> list[tuple[int, str]]:
    """The processes (pid, command line) whose environment carries `LEFTOVER_MARK=mark`."""
    needle = f"{LEFTOVER_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours
        found.append((pid, cmd.strip()))
    return found


@pytest.fixture(autouse=True)
def leftovers(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill (and warn about) every process a test left running: a torchrun's ranks run in sessions of
    their own, so killing torchrun's process group leaves them training on, orphaned, slowing every
    later test of the suite. Each test's processes inherit a mark in their environment (children take
    os.environ, or a copy of it, as every test's env does), found at teardown in /proc."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv(LEFTOVER_MARK, mark)
    yield
    left = [(pid, cmd) for pid, cmd in _marked(mark) if not cmd.startswith("[")]
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # A control plane (and its nats-server) outlives its last job by design, for its idle grace.
    left = [(pid, cmd) for pid, cmd in left if not any(name in cmd for name in LINGER_BY_DESIGN)]
    if left:
        shown = "; ".join(f"{pid}: {cmd[:160]}" for pid, cmd in left[:8])
        warnings.warn(
            f"{request.node.nodeid} left {len(left)} processes running, killed: {shown}", stacklevel=1
        )


@pytest.fixture
def run_alone_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    """The environment of a test whose `torchloom run` starts its own control plane: no weaver or job
    variable from outside, one OMP thread, and a control plane that exits 1 s after its last job."""
    return unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CONTROLPLANE_IDLE_S="1")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Append each started torchrun (own session) here; any still running at teardown is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    conn = await connect(nats_server)
    yield conn
    await conn.close()
