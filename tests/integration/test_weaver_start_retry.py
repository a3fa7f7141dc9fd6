"""A weaver of your own (`python -m weaver`, and `torchloom weaver --nats URL`) keeps trying a start
that fails on something that passes (NATS not reachable yet, JetStream not answering while a cluster
re-forms, the gRPC port still held) for a bound; a start that fails on anything else (a malformed
token file, refused credentials) ends at once.

A weaver restarted by a supervisor while its NATS restarts too must come up once NATS does, not
exit and leave the job unsteerable (CI once lost a chaos run to a weaver that never came back)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import until
from tests.integration.nats_cluster import Cluster
from tests.integration.weaver_proc import free_port, python_m_weaver
from torchloom import tokens
from torchloom.app.controlplane import ControlPlane
from torchloom.app.controlplane_config import ControlPlaneConfig
from torchloom.client import ControlClient
from torchloom.errors import WeaverUnavailable
from torchloom.nats_server import EmbeddedNats


async def _answers(addr: str) -> bool:
    try:
        async with ControlClient(addr, timeout_s=2.0) as client:
            await client.status()
    except WeaverUnavailable:
        return False
    return True


@pytest.mark.timeout(120)
async def test_a_weaver_started_before_its_nats_comes_up_once_nats_does(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    addr = f"127.0.0.1:{free_port()}"
    log = tmp_path / "weaver.log"
    weaver = python_m_weaver(subprocess_env, f"nats://127.0.0.1:{port}", addr, log)
    procs.append(weaver)
    # Nothing listens on the port yet: the weaver says it will try again, and stays up.
    await until(
        "a retried start", lambda: "trying again" in log.read_text(), timeout_s=60, proc=weaver, logs=[log]
    )
    server = EmbeddedNats(tmp_path / "nats", port=port)
    server.start()
    try:
        await until("the weaver to answer", lambda: _answers(addr), timeout_s=60, proc=weaver, logs=[log])
        assert "weaver ready: grpc" in log.read_text()
    finally:
        weaver.terminate()
        weaver.wait(timeout=30)
        server.stop()
    assert weaver.returncode == 0, log.read_text()[-3000:]


@pytest.mark.timeout(120)
async def test_a_weaver_whose_nats_never_comes_gives_up_after_its_start_timeout(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "weaver.log"
    weaver = python_m_weaver(
        subprocess_env,
        f"nats://127.0.0.1:{free_port()}",
        f"127.0.0.1:{free_port()}",
        log,
        "--start-timeout",
        "2",
    )
    procs.append(weaver)
    code = await asyncio.to_thread(weaver.wait, 60)
    said = log.read_text()
    assert code != 0, said[-3000:]
    assert "python -m weaver: error: the weaver did not start within 2 s (--start-timeout)" in said, said[
        -3000:
    ]
    assert "Traceback" not in said


@pytest.mark.timeout(120)
async def test_a_start_that_cannot_pass_by_itself_is_not_retried(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]], tl_home: Path
) -> None:
    token_file = tl_home / "controlplane" / "secrets" / tokens.FILE_NAME
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text("not json")
    token_file.chmod(0o600)
    log = tmp_path / "weaver.log"
    # NATS is not there either: a retry would wait for it (60 s by default); the bad file ends it.
    weaver = python_m_weaver(
        subprocess_env, f"nats://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", log
    )
    procs.append(weaver)
    code = await asyncio.to_thread(weaver.wait, 45)
    said = log.read_text()
    assert code != 0, said[-3000:]
    assert "python -m weaver: error: gRPC token file" in said and "is malformed" in said, said[-3000:]
    assert "trying again" not in said


@pytest.mark.timeout(120)
async def test_credentials_the_server_refuses_end_the_start_at_once(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    nats_server: EmbeddedNats,
) -> None:
    # The server admits only torchloom's roles, and this weaver has no credential file: refused.
    env = {k: v for k, v in subprocess_env.items() if k != "TORCHLOOM_NATS_CREDS_FILE"}
    log = tmp_path / "weaver.log"
    weaver = python_m_weaver(env, nats_server.url, f"127.0.0.1:{free_port()}", log)
    procs.append(weaver)
    code = await asyncio.to_thread(weaver.wait, 45)
    said = log.read_text()
    assert code == 1, said[-3000:]
    assert "refused the credentials" in said and "Authorization Violation" in said, said[-3000:]
    assert "trying again" not in said


@pytest.mark.timeout(120)
async def test_a_control_plane_on_an_external_nats_waits_for_it_to_come_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `torchloom weaver --nats URL` (deploy/k8s/weaver.yaml): a pod that starts before its NATS.
    port = free_port()
    plane = ControlPlane(ControlPlaneConfig(home=tmp_path / "home", nats_url=f"nats://127.0.0.1:{port}"))
    running = asyncio.create_task(plane.run())
    server = EmbeddedNats(tmp_path / "late-nats", port=port)
    try:
        # Its first weaver start fails (nothing listens): the plane tries again, neither ending nor ready.
        caplog.set_level(logging.WARNING, logger="torchloom.app.controlplane")
        await until(
            "a retried weaver start",
            lambda: running.done() or "weaver start failed, retrying" in caplog.text,
            timeout_s=60,
        )
        assert not running.done(), running.exception()
        assert not plane.ready.is_set()
        server.start()
        async with asyncio.timeout(60):
            await plane.ready.wait()
        assert await _answers(plane.grpc)
    finally:
        plane.stop()
        async with asyncio.timeout(30):
            await asyncio.gather(running, return_exceptions=True)
        server.stop()


@pytest.mark.timeout(300)
async def test_a_weaver_restarted_right_after_a_cluster_server_restart_serves_again(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    # For a few seconds after a server rejoins, the cluster drops JetStream API requests; a weaver
    # starting then failed its start 6 times in 9 (bench/weaver_restart.py) and used to exit.
    cluster = Cluster(tmp_path / "cluster")
    cluster.start_all()
    addr = f"127.0.0.1:{free_port()}"
    log = tmp_path / "weaver.log"
    try:
        await until("a healthy 3-node cluster", cluster.all_healthy, timeout_s=60)
        weaver = python_m_weaver(subprocess_env, cluster.urls, addr, log, "--replicas", "3")
        procs.append(weaver)
        for i in range(3):
            await until(
                f"the weaver ready ({i})", lambda: _answers(addr), timeout_s=90, proc=weaver, logs=[log]
            )
            await cluster.restart(i)
            weaver.kill()
            weaver.wait(timeout=10)
            weaver = python_m_weaver(subprocess_env, cluster.urls, addr, log, "--replicas", "3")
            procs.append(weaver)
        await until("the weaver ready (last)", lambda: _answers(addr), timeout_s=90, proc=weaver, logs=[log])
        assert log.read_text().count("weaver ready: grpc") == 4
    finally:
        cluster.stop_all()
