"""A control plane on an external NATS that goes away still ends: once its last lease has ended it
exits, and `stop()` ends it, instead of restarting its weaver forever.

Found in a suite run: a control plane whose job had ended and whose NATS server was gone was still
alive half an hour later, retrying its weaver every 6 s and ignoring SIGTERM: the weaver swallowed
the cancellation of the control plane's shutdown, so the weaver loop took its return for a crash and
restarted it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from torchloom import discovery
from torchloom.app.controlplane import ControlPlane
from torchloom.app.controlplane_config import ControlPlaneConfig
from torchloom.nats_server import EmbeddedNats
from weaver import app as weaver_app


@contextlib.asynccontextmanager
async def running_plane(
    tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[EmbeddedNats, ControlPlane, asyncio.Task[None]]]:
    """A control plane on an open external nats-server of its own (roles are not under test), running
    as a task; the task is cancelled and the server stopped on the way out."""
    server = EmbeddedNats(tmp_path / "open-nats")
    server.start()
    plane = ControlPlane(ControlPlaneConfig(home=tmp_path / "home", nats_url=server.url, **config))
    running = asyncio.create_task(plane.run())
    try:
        yield server, plane, running
    finally:
        if not running.done():
            running.cancel()
        server.stop()


@pytest.mark.timeout(90)
async def test_idle_exit_after_its_nats_is_gone(tmp_path: Path) -> None:
    async with running_plane(tmp_path, idle_exit_s=2.0, lease_interval_s=0.2) as (server, plane, running):
        async with asyncio.timeout(60):
            await plane.ready.wait()
        assert (tmp_path / "home" / discovery.FILE_NAME).exists()
        server.stop()  # the weaver loses NATS: it stops and cannot start again
        # No job ever held a lease: the idle exit comes 2 s in, while the weaver cannot start.
        async with asyncio.timeout(45):
            await running
    assert not (tmp_path / "home" / discovery.FILE_NAME).exists()


@pytest.mark.timeout(90)
async def test_stop_ends_it_while_its_weaver_cannot_start(tmp_path: Path) -> None:
    async with running_plane(tmp_path, idle_exit_s=None) as (server, plane, running):
        async with asyncio.timeout(60):
            await plane.ready.wait()
        server.stop()
        await asyncio.sleep(3.0)  # the weaver has died and the loop is retrying it
        plane.stop()
        async with asyncio.timeout(45):
            await running


@pytest.mark.timeout(60)
async def test_a_weaver_that_swallows_its_cancellation_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself, made certain: the real weaver's shutdown can end without re-raising the
    cancellation (a cleanup that fails while NATS is gone replaces it), so the control plane must
    not take a weaver that returned during its own shutdown for a crash to restart from."""
    starts: list[float] = []
    real_serve = weaver_app.serve

    async def serve_swallowing(config: Any, *, ready: Any = None, handle_sigterm: bool = False) -> None:
        starts.append(asyncio.get_running_loop().time())
        with contextlib.suppress(asyncio.CancelledError):
            await real_serve(config, ready=ready, handle_sigterm=handle_sigterm)

    monkeypatch.setattr(weaver_app, "serve", serve_swallowing)
    async with running_plane(tmp_path, idle_exit_s=1.0) as (_, _, running), asyncio.timeout(45):
        await running  # no lease is ever held: the idle exit ends it
    assert len(starts) == 1, f"the weaver was started {len(starts)} times"
