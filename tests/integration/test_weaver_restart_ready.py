"""A weaver restarted under a training job answers a `torchloom set` sent at once with "not ready,
try again" (gRPC UNAVAILABLE) until the ranks' reports bring the job and its knob schema back, and
the CLI's retry with the same command id gets it applied: never "unknown knob 'lr': none reported
yet" (exit 2) for a command that is valid once the ranks report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import EXAMPLE, job_env, start_session, until
from tests.integration.weaver_proc import WeaverProc
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound, WeaverUnavailable
from torchloom.messages import Outcome, OutcomeStatus
from torchloom.nats_server import EmbeddedNats

JOB = "ready"


async def _trained(addr: str) -> bool:
    try:
        async with ControlClient(addr, timeout_s=2.0) as client:
            reply = await client.status(JOB)
    except (JobNotFound, WeaverUnavailable):
        return False
    return bool(reply.jobs) and sum(r.alive and bool(r.knobs) for r in reply.jobs[0].ranks) == 2


async def _set(addr: str, env: dict[str, str], value: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torchloom.app.cli", "set", f"lr={value}", "--job", JOB, "--grpc", addr,
        "--timeout", "60", "--json",
    ]  # fmt: skip
    return await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(240)
async def test_a_set_right_after_a_weaver_restart_applies_once_the_ranks_report(
    tmp_path: Path, subprocess_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    # An open bus: what is under test is the weaver's answer, not NATS roles (test_security has those).
    nats_server = EmbeddedNats(tmp_path / "open-nats")
    nats_server.start()
    weaver = WeaverProc(nats_server.url, subprocess_env, tmp_path / "weaver.log")
    weaver.start()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(EXAMPLE), "--steps", "1000000", "--out", str(tmp_path / "out"), "--step-sleep", "0.02",
    ]  # fmt: skip
    job = start_session(cmd, job_env(subprocess_env, JOB, TORCHLOOM_NATS_URL=nats_server.url))
    procs.append(job)
    try:
        await until("two training ranks", lambda: _trained(weaver.addr), timeout_s=90, proc=job)
        for value, crash in (("0.0042", False), ("0.0043", True)):  # a clean stop, then a SIGKILL
            if crash:
                weaver.kill()
            else:
                weaver.stop()
            weaver.start()
            res = await _set(weaver.addr, subprocess_env, value)  # at once: the weaver knows only its journal
            assert res.returncode == 0, res.stdout + res.stderr
            result = json.loads(res.stdout)
            assert result["status"] == "applied" and [a["rank"] for a in result["applied"]] == [0, 1], result
        async with ControlClient(weaver.addr) as client:
            refused = [
                e
                async for e in client.journal(JOB)
                if isinstance(e, Outcome) and e.status is OutcomeStatus.REJECTED
            ]
        assert refused == [], [e.reason for e in refused]
    finally:
        weaver.stop()
        nats_server.stop()
