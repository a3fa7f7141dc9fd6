"""A live `mix=` change through a real weaver reaches a real 2-rank torchrun job whose batches come from
a MixtureSampler: from the decided step on, both ranks draw from the new mixture (and batch size); a
malformed mix is refused by every rank and applied by none."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO
from tests.integration.helpers import auth, job_env, read_records, torchrun
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound
from torchloom.messages import OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

SCRIPT = REPO / "tests" / "integration" / "scripts" / "mix_train.py"
JOB = "mixjob"
# Both commands are submitted once both ranks are 20 steps in, each awaited (a fraction of a second):
# the rest of the steps are margin for a loaded machine, then only waited for (20 ms each).
STEPS = 150


async def test_live_mix_changes_the_drawn_sources_from_the_decided_step_on_both_ranks(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    out = tmp_path / "out"
    env = job_env(subprocess_env, JOB, server=nats_server)
    async with (
        open_weaver(WeaverConfig(nats_url=nats_server.url, nats_credentials=auth(nats_server))) as w,
        ControlClient(w.grpc_address) as client,
    ):
        proc = torchrun(out, env, steps=STEPS, step_sleep=0.02, script=SCRIPT)
        procs.append(proc)

        # Wait until the weaver knows both ranks with the sampler's knobs, and both ranks train.
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "job did not show both ranks with a mix knob in 60 s"
            try:
                job = (await client.status(JOB)).jobs[0]
            except JobNotFound:
                job = None
            if (
                job is not None
                and len([r for r in job.ranks if r.alive]) == 2
                and {k.name for k in job.knobs} >= {"mix", "batch_size"}
                and all(len(read_records(out / f"rank{r}.jsonl")) >= 20 for r in (0, 1))
            ):
                break
            await asyncio.sleep(0.05)

        bad = await client.submit(SubmitRequest(job=JOB, body=SetConfig(values={"mix": "a:x"}), timeout_s=30))
        assert bad.status is OutcomeStatus.REJECTED, bad
        assert "mix='a:x' rejected: expected NAME:WEIGHT,... with weights >= 0" in bad.reason
        assert "known sources: a, b" in bad.reason
        assert {r.rank for r in bad.results} == {0, 1}
        assert all(r.status.value == "rejected" for r in bad.results)

        good = await client.submit(
            SubmitRequest(
                job=JOB, body=SetConfig(values={"mix": "a:0,b:1", "batch_size": "32"}), timeout_s=30
            )
        )
        assert good.status is OutcomeStatus.APPLIED, good
        steps = {r.step for r in good.results}
        assert len(steps) == 1, good.results
        apply_step = steps.pop()

        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stdout.decode(errors="replace")[-4000:]

    assert apply_step < STEPS
    for r in (0, 1):
        applied = json.loads((out / f"rank{r}.applied.json").read_text())
        assert [(a["status"], a["step"]) for a in applied] == [
            ("rejected", applied[0]["step"]),
            ("applied", apply_step),
        ]
        records = read_records(out / f"rank{r}.jsonl")
        assert len(records) == STEPS
        for rec in records:
            # A command decided at boundary k is in force for the batch drawn at loop step k.
            want = {"b": 32} if rec["step"] >= apply_step else {"a": 64}  # type: ignore[operator]
            assert rec["counts"] == want, (r, rec, apply_step)
