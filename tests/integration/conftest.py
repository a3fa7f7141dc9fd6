"""Integration fixtures: `procs` collects the process trees a test starts and kills what is left;
`nc` is a NATS connection to the test's server, with the weaver's credential."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.integration.helpers import connect, kill_tree
from torchloom.nats_server import EmbeddedNats


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
