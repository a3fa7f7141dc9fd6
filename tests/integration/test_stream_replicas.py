"""On a NATS cluster of the user's, the weaver's streams get the replicas asked for (`--replicas`,
TORCHLOOM_NATS_REPLICAS): with 3, the journal survives the loss of any one server. Before, every
entry point made them with 1 replica, on one server of the cluster, whatever the cluster's size.
A value out of [1, 5], or replicas asked of the embedded single server, is a usage error naming why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nats
import pytest

from tests.integration.helpers import EXAMPLE, until
from tests.integration.nats_cluster import Cluster
from tests.integration.weaver_proc import free_port, python_m_weaver
from torchloom import subjects


@pytest.mark.timeout(180)
async def test_python_m_weaver_makes_its_streams_with_the_replicas_asked_for(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    cluster = Cluster(tmp_path / "cluster")
    cluster.start_all()
    try:
        await until("a healthy 3-node cluster", cluster.all_healthy, timeout_s=60)
        log = tmp_path / "weaver.log"
        weaver = python_m_weaver(
            subprocess_env, cluster.urls, f"127.0.0.1:{free_port()}", log, "--replicas", "3"
        )
        procs.append(weaver)
        await until(
            "the weaver ready",
            lambda: "weaver ready" in log.read_text(),
            timeout_s=90,
            proc=weaver,
            logs=[log],
        )
        nc = await nats.connect(cluster.urls.split(","))
        try:
            js = nc.jetstream()
            for stream in (subjects.STREAM_JOURNAL, subjects.STREAM_ACKS):
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3, (stream, info.config)
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2, (
                    stream,
                    info.cluster,
                )
        finally:
            await nc.close()
        weaver.terminate()
        assert weaver.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        cluster.stop_all()


@pytest.mark.parametrize(
    ("argv", "environ", "said"),
    [
        (["-m", "weaver", "--replicas", "7"], {}, "replicas=7 rejected: must be in [1, 5]"),
        (
            ["-m", "weaver"],
            {"TORCHLOOM_NATS_REPLICAS": "three"},
            "TORCHLOOM_NATS_REPLICAS='three' is not a whole",
        ),
        (
            ["-m", "weaver"],
            {"TORCHLOOM_NATS_REPLICAS": "0"},
            "TORCHLOOM_NATS_REPLICAS=0 rejected: must be in [1, 5]",
        ),
        (["-m", "torchloom.app.cli", "weaver", "--replicas", "3"], {}, "the embedded NATS is one server"),
        (
            ["-m", "torchloom.app.cli", "run", "--nats", "nats://127.0.0.1:1", str(EXAMPLE)],
            {"TORCHLOOM_NATS_REPLICAS": "9"},
            "torchloom run: TORCHLOOM_NATS_REPLICAS=9 rejected: must be in [1, 5]",
        ),
        (
            ["-m", "torchloom.app.cli", "weaver", "--nats", "nats://127.0.0.1:1", "--replicas", "6"],
            {},
            "--replicas 6 rejected: must be in [1, 5]",
        ),
    ],
)
def test_replicas_out_of_bounds_are_usage_errors(
    subprocess_env: dict[str, str], argv: list[str], environ: dict[str, str], said: str
) -> None:
    done = subprocess.run(
        [sys.executable, *argv],
        env={**subprocess_env, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert said in done.stderr, done.stderr
