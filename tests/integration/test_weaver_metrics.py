"""Prometheus metrics scraped over HTTP from a running weaver (real nats-server, real 2-rank torchrun
job): per-rank step, loss and health for both ranks, a command counted with its latency observed, and
the endpoint's loopback bind and 404 for other paths."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import helpers
from tests.integration.helpers import submit, until, wait_training, weaver_config
from torchloom.client import ControlClient
from torchloom.messages import Action, ActionKind, SetConfig
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

JOB = "metricsjob"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def rank_env(base: dict[str, str], server: EmbeddedNats) -> dict[str, str]:
    """The ranks' environment, with their NATS credentials where the test server asks for them."""
    if "server" in inspect.signature(helpers.job_env).parameters:
        return helpers.job_env(base, JOB, server=server)  # type: ignore[call-arg, unused-ignore]
    return helpers.job_env(base, JOB, TORCHLOOM_NATS_URL=server.url)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_scraped_from_a_running_weaver(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    out = tmp_path / "out"
    env = rank_env(subprocess_env, nats_server)
    config = weaver_config(nats_server, metrics_port=0)
    async with open_weaver(config) as w, ControlClient(w.grpc_address) as client:
        assert w.metrics is not None
        assert w.metrics.address.startswith("127.0.0.1:")
        url = w.metrics.url
        proc = helpers.torchrun(out, env, steps=100_000, step_sleep=0.02)
        procs.append(proc)
        await wait_training(client, JOB, proc, out)

        async def both_ranks_reported() -> Samples | None:
            got = await asyncio.to_thread(scrape, url)
            ok = all(
                (value(got, "torchloom_rank_step", job=JOB, rank=r) or 0) > 0
                and value(got, "torchloom_rank_loss", job=JOB, rank=r) is not None
                for r in ("0", "1")
            )
            return got if ok else None

        got = await until("both ranks' step and loss in /metrics", both_ranks_reported, proc=proc)
        for rank in ("0", "1"):
            assert value(got, "torchloom_rank_alive", job=JOB, rank=rank) == 1
            assert value(got, "torchloom_rank_health", job=JOB, rank=rank, health="healthy") == 1
            assert (value(got, "torchloom_rank_step_time_seconds", job=JOB, rank=rank) or 0) > 0
            used = [
                v
                for (name, labels), v in got.items()
                if name == "torchloom_device_memory_used_bytes" and dict(labels)["rank"] == rank
            ]
            assert len(used) == 1 and used[0] > 0, used  # one device per rank: its host memory here
        assert value(got, "torchloom_job_world_size", job=JOB) == 2
        assert value(got, "torchloom_commands_submitted_total", job=JOB, issuer="cli") is None

        applied = await submit(client, JOB, SetConfig(values={"lr": 0.05}))
        took = applied.completed_at_s - applied.submitted_at_s
        got = await asyncio.to_thread(scrape, url)
        assert value(got, "torchloom_commands_submitted_total", job=JOB, issuer="cli") == 1
        assert value(got, "torchloom_command_outcomes_total", job=JOB, issuer="cli", status="applied") == 1
        assert value(got, "torchloom_command_latency_seconds_count", job=JOB) == 1
        assert value(got, "torchloom_command_latency_seconds_sum", job=JOB) == pytest.approx(took)
        assert value(got, "torchloom_job_commands_in_flight", job=JOB) == 0

        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, url.replace("/metrics", "/"), None, 10)
        assert err.value.code == 404

        await submit(client, JOB, Action(kind=ActionKind.STOP))
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-3000:]


async def test_metrics_off_by_default_and_remote_bind_refused(nats_server: EmbeddedNats) -> None:
    config = weaver_config(nats_server)
    async with open_weaver(config) as w:
        assert w.metrics is None
    with pytest.raises(ValueError, match=r"metrics_host=.0\.0\.0\.0. rejected"):
        WeaverConfig(nats_url=nats_server.url, metrics_port=0, metrics_host="0.0.0.0")
