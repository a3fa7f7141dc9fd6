"""Live reconfiguration end to end: a real `torchloom run` (weaver in process, NATS external so the
journal outlives the run), real torchrun on CPU; the ranks' own records are the ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from torchloom import subjects, wire
from torchloom.messages import JobEvent
from torchloom.nats_server import EmbeddedNats

SCRIPT = Path(__file__).resolve().parent / "scripts" / "reconf_train.py"
JOB = "reconf"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _events(url: str) -> list[JobEvent]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subjects.events(JOB), ordered_consumer=True)
        out: list[JobEvent] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            out.append(wire.decode_event(msg.data))
    finally:
        await nc.close()


def _run(
    args: list[str], url: str, env: dict[str, str], timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchloom.cli", "run", "--job", JOB, "--nats", url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def run_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = dict(subprocess_env)
    for name in ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env["TORCHLOOM_CHECKPOINT_DIR"] = str(tmp_path / "ckpt")
    return env


@pytest.mark.timeout(180)
async def test_xid_on_rank_1_continues_on_one_rank_with_no_step_lost(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    script = [str(SCRIPT), "--steps", "90", "--xid-at", "30", "--out", str(out)]
    res = _run(
        ["--health-policy", "reconfigure", "--nproc-per-node", "2", *script],
        nats_server.url,
        run_env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    events = await _events(nats_server.url)
    kinds = [e.kind for e in events]
    for kind in ("device_unhealthy", "reconfigure_checkpointed", "reconfigure_stopping"):
        assert kind in kinds, kinds
    for kind in ("reconfigure_restarting", "reconfigure_resumed", "resumed"):
        assert kind in kinds, kinds
    restarting = next(e for e in events if e.kind == "reconfigure_restarting")
    assert (restarting.attrs["old_world_size"], restarting.attrs["new_world_size"]) == ("2", "1")
    assert restarting.attrs["steps_lost"] == "0"
    ckpt_step = int(restarting.attrs["checkpoint_step"])
    assert ckpt_step >= 30

    recs = _records(out / "rank0.jsonl")
    first = [r for r in recs if r["world"] == 2]
    after = [r for r in recs if r["world"] == 1]
    # The first attempt trained every step up to the checkpoint; the second starts exactly there.
    assert [r["step"] for r in first][:ckpt_step] == list(range(ckpt_step))
    assert [r["step"] for r in after] == list(range(ckpt_step, 90))
    assert {r["run"] for r in after} == {restarting.run_id}
    assert {r["accum"] for r in first} == {1}
    assert {r["accum"] for r in after} == {2}, [
        e.attrs for e in events if e.kind in ("restart", "health_action")
    ]
    recent = [r["loss"] for r in first if ckpt_step - 10 <= r["step"] < ckpt_step]
    assert min(recent) * 0.5 <= after[0]["loss"] <= max(recent) * 1.5
