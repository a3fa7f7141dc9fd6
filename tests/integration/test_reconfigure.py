"""Live reconfiguration end to end: a real `torchloom run` (weaver in process, NATS external so the
journal outlives the run), real torchrun on CPU; the ranks' own records are the ground truth."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import auth, cli, job_events, read_all_records, run_creds, unbound_env
from torchloom.nats_server import EmbeddedNats

SCRIPT = Path(__file__).resolve().parent / "scripts" / "reconf_train.py"
JOB = "reconf"


def _run(
    args: list[str], server: EmbeddedNats, env: dict[str, str], timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return cli("run", "--job", JOB, *run_creds(server, JOB), *args, env=env, timeout_s=timeout_s)


@pytest.fixture
def run_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"))


@pytest.mark.timeout(180)
async def test_xid_on_rank_1_continues_on_one_rank_with_no_step_lost(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    script = [str(SCRIPT), "--steps", "90", "--xid-at", "30", "--out", str(out)]
    res = _run(
        ["--health-policy", "reconfigure", "--nproc-per-node", "2", *script],
        nats_server,
        run_env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    events = await job_events(nats_server.url, JOB, credentials=auth(nats_server))
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

    recs = read_all_records(out / "rank0.jsonl")
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
