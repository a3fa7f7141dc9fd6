"""The weaver's entry points: `serve()` in-process and `python -m weaver` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import weaver_config, weaver_creds
from torchloom.client import ControlClient
from torchloom.nats_server import EmbeddedNats
from weaver.app import RunningWeaver, serve


async def test_serve_reports_ready_and_stops_on_cancel(nats_server: EmbeddedNats) -> None:
    ready: asyncio.Future[RunningWeaver] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(weaver_config(nats_server), ready=ready.set_result))
    running = await asyncio.wait_for(ready, 10)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", running.grpc_address)
    assert not running.grpc_address.endswith(":0")
    async with ControlClient(running.grpc_address) as client:
        assert (await client.status()).jobs == ()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    await asyncio.wait_for(running.weaver.wait_closed(), 5)
    assert running.weaver.nats.is_closed


def test_python_m_weaver_exits_cleanly_on_sigterm(
    nats_server: EmbeddedNats, subprocess_env: dict[str, str]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "weaver", "--nats", nats_server.url, "--grpc", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**subprocess_env, **weaver_creds(nats_server)},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while "weaver ready" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(
                    f"weaver did not report ready: {line!r} {proc.stderr.read() if proc.stderr else ''}"
                )
            line = proc.stdout.readline()
        address = re.search(r"grpc (\S+),", line)
        assert address is not None

        async def status() -> int:
            async with ControlClient(address.group(1)) as client:
                return len((await client.status()).jobs)

        assert asyncio.run(status()) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
