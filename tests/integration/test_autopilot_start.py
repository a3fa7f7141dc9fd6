"""A policy's start commands end to end: a real 2-rank job under `torchloom run --policy FILE` holds at
step 0 until the weaver sent the policy's [knobs], its start checkpoint and a resume, so the
checkpoint holds the weights no optimizer step touched; a rule then rolls back to it, and the rollback
lands on every rank at the same step. The replay applies the step-0 commands at step 0 too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli, unbound_env

SCRIPT = Path(__file__).parent / "scripts" / "nan_train.py"
NAN_AT = 30
POLICY = """
name = "back-to-start"
start = [{action = "checkpoint", tag = "start"}]
[knobs]
report_update_ratio = 10
[[rule]]
name = "nan-to-start"
when = "nonfinite"
cooldown_s = 30.0  # one NaN, reported by both ranks: one rollback
do = [{action = "rollback", checkpoint = "last_good"}]
"""


@pytest.mark.timeout(600)
def test_start_checkpoint_is_taken_at_step_0_and_a_rollback_to_it_lands_on_every_rank(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    env = unbound_env(
        subprocess_env,
        OMP_NUM_THREADS="1",
        TORCHLOOM_CONTROLPLANE_IDLE_S="1",
        TORCHLOOM_TEST_NAN_AT_STEP=str(NAN_AT),
    )
    policy = tmp_path / "start.toml"
    policy.write_text(POLICY)
    out = tmp_path / "out"
    run = ["run", "--policy", str(policy), "--job", "startjob", "--nproc-per-node", "2"]
    proc = cli(*run, str(SCRIPT), "--steps", "60", "--out", str(out), env=env, timeout_s=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_id = re.search(r"job startjob run (\w+)", proc.stderr)
    assert run_id is not None, proc.stderr[-2000:]

    per_rank = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]  # both ranks decided the same commands at the same steps
    decided = per_rank[0]
    assert all(d["status"] == "applied" for d in decided), decided
    # At step 0, before the first optimizer step: the [knobs], the start checkpoint, the resume.
    start = decided[:3]
    assert [(d["kind"], d["step"], d["branch"]) for d in start] == [
        ("set", 0, "main"),
        ("checkpoint", 0, "main"),
        ("resume", 0, "main"),
    ], decided
    assert start[0]["values"] == {"report_update_ratio": 10}
    ckpt = start[1]["detail"]
    assert ckpt["checkpoint_tag"] == "start" and ckpt["checkpoint_step"] == "0", ckpt
    # The NaN at step NAN_AT: back to the start checkpoint, decided at one step on both ranks.
    (rollback,) = [d for d in decided if d["kind"] == "rollback"]
    assert rollback["args"]["checkpoint"] == ckpt["checkpoint_id"], rollback
    assert rollback["step"] > NAN_AT and rollback["detail"]["fork_step"] == "0", rollback
    branch = rollback["detail"]["branch"]
    for r in (0, 1):
        records = [json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()]
        assert records[0]["step"] == 0 and records[0]["branch"] == "main"
        resumed = [rec for rec in records if rec["branch"] == branch]
        assert resumed and resumed[0]["step"] == 0 and resumed[-1]["step"] == 59, resumed[:3]

    res = cli("journal", "--run", run_id.group(1), "--json", env=env)
    assert res.returncode == 0, res.stderr
    entries: list[dict[str, Any]] = json.loads(res.stdout)["entries"]
    events = [e for e in entries if e["type"] == "event"]
    started = [e for e in events if e["kind"] == "rule_fired" and e["attrs"]["signal"] == "start"]
    assert len(started) == 1 and json.loads(started[0]["attrs"]["commands"]) == [
        {"set": {"report_update_ratio": 10}},
        {"action": "checkpoint", "tag": "start"},
        {"action": "resume"},
    ], started
    by_issuer = [
        (e["kind"], e["issuer"]["identity"]) for e in entries if e["type"] == "outcome" and e["issuer"]
    ]
    issuer = "rule:back-to-start"
    assert by_issuer[:3] == [(kind, issuer) for kind in ("set", "checkpoint", "resume")], by_issuer

    # The replay decides the step-0 commands at step 0 and retraces every step.
    out2 = tmp_path / "replayed"
    replay_args = ["replay", "--run", run_id.group(1), "--nproc-per-node", "2", "--", str(SCRIPT)]
    replay = cli(*replay_args, "--steps", "60", "--out", str(out2), env=env, timeout_s=280)
    assert replay.returncode == 0, replay.stderr[-4000:]
    again = json.loads((out2 / "rank0.applied.json").read_text())
    assert [(d["kind"], d["step"], d["branch"]) for d in again] == [
        (d["kind"], d["step"], d["branch"]) for d in decided
    ]
    original = (out / "rank0.jsonl").read_text().splitlines()
    assert (out2 / "rank0.jsonl").read_text().splitlines() == original
