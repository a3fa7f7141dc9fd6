"""The autopilot end to end: a 2-rank job under `torchloom run --policy default` whose loss turns NaN at
a chosen step. The default rules checkpoint every 100 steps, then roll back to the last checkpoint
taken before the NaN and halve lr; every firing is journaled with its rule, and the job exits 0."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli, home_client, kill_tree, min_step, read_records, start_cli, until

SCRIPT = Path(__file__).parent / "scripts" / "nan_train.py"
NAN_AT = 220


@pytest.mark.timeout(600)
def test_default_policy_rolls_back_a_nan_and_halves_lr(tmp_path: Path, run_alone_env: dict[str, str]) -> None:
    env = dict(run_alone_env, TORCHLOOM_TEST_NAN_AT_STEP=str(NAN_AT))
    out = tmp_path / "out"
    run = ["run", "--policy", "default", "--job", "nanjob", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torchloom.app.cli", *run, str(SCRIPT), "--steps", "330", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "job nanjob runs under autopilot policy default" in proc.stderr
    run_id = re.search(r"job nanjob run (\w+)", proc.stderr)
    assert run_id is not None, proc.stderr[-2000:]

    per_rank = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]  # both ranks decided the same commands at the same steps
    decided = per_rank[0]
    kinds = [d["kind"] for d in decided]
    assert "rollback" in kinds, decided
    rb = kinds.index("rollback")
    checkpoints = {
        d["detail"].get("checkpoint_id", f"ckpt-{d['seq']}"): d
        for d in decided[:rb]
        if d["kind"] == "checkpoint"
    }
    assert checkpoints, decided
    target = decided[rb]["args"]["checkpoint"]
    # The last checkpoint taken before the NaN: periodic, at or after step 100, before NAN_AT.
    assert target in checkpoints and 100 <= checkpoints[target]["step"] < NAN_AT, decided
    later = [d for d in checkpoints.values() if checkpoints[target]["step"] < d["step"] < NAN_AT]
    assert not later, decided
    assert decided[rb + 1]["kind"] == "set" and decided[rb + 1]["values"] == {"lr": 0.025}, decided
    assert all(d["status"] == "applied" for d in decided), decided
    records = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    # Back at the checkpoint's step on a new branch, with half the lr from the set's step on.
    branch = decided[rb]["detail"].get("branch") or records[-1]["branch"]
    resumed = [r for r in records if r["branch"] == branch]
    assert resumed and resumed[0]["step"] == checkpoints[target]["step"], resumed[:3]
    assert resumed[-1]["lr"] == pytest.approx(0.025) and resumed[-1]["step"] == 329

    res = cli("journal", "--run", run_id.group(1), "--json", env=env)
    assert res.returncode == 0, res.stderr
    entries: list[dict[str, Any]] = json.loads(res.stdout)["entries"]
    fired = [e for e in entries if e["type"] == "event" and e["kind"] == "rule_fired"]
    nan_rule = [e for e in fired if e["attrs"]["rule"] == "nonfinite-rollback"]
    assert len(nan_rule) == 1, fired
    attrs = nan_rule[0]["attrs"]
    assert attrs["signal"] == "nonfinite" and json.loads(attrs["commands"]) == [
        {"action": "rollback", "checkpoint": target},
        {"set": {"lr": 0.025}},
    ]
    assert json.loads(attrs["window"]), attrs  # the signal window that fired it
    by_rule = {
        (e["kind"], e["issuer"]["identity"])
        for e in entries
        if e["type"] == "outcome" and e["issuer"] and e["issuer"]["kind"] == "rule"
    }
    assert {("rollback", "rule:nonfinite-rollback"), ("set", "rule:nonfinite-rollback")} <= by_rule
    assert ("checkpoint", "rule:periodic-checkpoint") in by_rule

    # The replay follows the journal: the rule-issued commands at the same steps, and no rule fires
    # again (the NaN comes back at the same step, the rollback is the file's, not a rule's). It runs
    # without the run's 10 ms step sleep: the journal's steps, not the pace, place every command.
    out2 = tmp_path / "replayed"
    again_args = [
        "replay",
        "--run",
        run_id.group(1),
        "--nproc-per-node",
        "2",
        "--",
        str(SCRIPT),
        "--steps",
        "330",
    ]
    replay = subprocess.run(
        [sys.executable, "-m", "torchloom.app.cli", *again_args, "--step-sleep", "0", "--out", str(out2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert replay.returncode == 0, replay.stderr[-4000:]
    assert "runs under autopilot policy" not in replay.stderr
    again = json.loads((out2 / "rank0.applied.json").read_text())
    assert [(d["kind"], d["step"], d["values"]) for d in again] == [
        (d["kind"], d["step"], d["values"]) for d in decided
    ]
    replayed = [json.loads(line) for line in (out2 / "rank0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"], r["loss"]) for r in replayed] == [
        (r["step"], r["lr"], r["loss"]) for r in records
    ]
    replay_run = re.search(r"job nanjob run (\w+)", replay.stderr)
    assert replay_run is not None
    res = cli("journal", "--run", replay_run.group(1), "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert not [
        e for e in json.loads(res.stdout)["entries"] if e["type"] == "event" and e["kind"].startswith("rule")
    ]


def _json_cli(*args: str, env: dict[str, str]) -> Any:
    res = cli(*args, "--json", env=env, timeout_s=60)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout)


def _until(what: str, check: Callable[[], Any], proc: subprocess.Popen[str], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job exited early with {proc.returncode} waiting for {what}"
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_pending(
    env: dict[str, str], proc: subprocess.Popen[str], what: str, ok: Callable[[int], bool]
) -> None:
    """Until `ok(number of apjob's pending proposals)`, read in this process as `torchloom policy
    show` reads them (a CLI per poll takes a core from the job)."""

    async def poll() -> None:
        client = home_client(env)
        assert client is not None, "no control plane"
        async with client:

            async def held() -> bool:
                return ok(len((await client.get_policy("apjob")).proposals))

            await until(what, held, proc=proc, timeout_s=120)

    asyncio.run(poll())


@pytest.mark.timeout(400)
def test_approval_mode_waits_for_a_person(tmp_path: Path, run_alone_env: dict[str, str]) -> None:
    nan_step_file = tmp_path / "nan_step"
    # The NaN step is chosen once the checkpoint below is applied, so the checkpoint comes first.
    env = dict(run_alone_env, TORCHLOOM_TEST_NAN_STEP_FILE=str(nan_step_file))
    policy = tmp_path / "approve.toml"
    policy.write_text(
        'name = "careful"\napproval = true\n[[rule]]\nname = "nan"\nwhen = "nonfinite"\n'
        'do = [{action = "rollback", checkpoint = "last_good"}, {set = {lr = "x0.5"}}]\n'
    )
    out = tmp_path / "out"
    run = ["run", "--policy", str(policy), "--job", "apjob", "--nproc-per-node", "2", str(SCRIPT)]
    proc = start_cli(*run, "--steps", "100000", "--out", str(out), env=env)
    try:
        _until("step 20", lambda: min_step(env) >= 20, proc)
        shown = _json_cli("policy", "show", "--job", "apjob", env=env)
        assert shown["policy"] == "careful" and shown["proposals"] == []
        ckpt = _json_cli("checkpoint", env=env)
        assert ckpt["status"] == "applied", ckpt
        # 100 steps (a second or more) past rank 0's latest: both ranks read the file before then.
        nan_at = read_records(out / "rank0.jsonl")[-1]["step"] + 100
        assert ckpt["applied"][0]["step"] < nan_at, ckpt
        (tmp_path / "nan_step.tmp").write_text(str(nan_at))
        (tmp_path / "nan_step.tmp").replace(nan_step_file)

        def pending() -> list[dict[str, Any]]:
            return list(_json_cli("policy", "show", "--job", "apjob", env=env)["proposals"])

        _wait_pending(env, proc, "a proposal", lambda n: n > 0)
        (proposal,) = pending()
        assert proposal["rule"] == "nan" and proposal["signal"] == "nonfinite"
        time.sleep(1.0)  # nothing is sent while it waits
        assert [d for d in pending() if d["id"] != proposal["id"]] == []
        bogus = cli("policy", "refuse", "nosuch", "--job", "apjob", env=env)
        assert bogus.returncode == 2 and "no pending proposal 'nosuch'" in bogus.stderr, bogus.stderr
        approved = cli("policy", "approve", proposal["id"], "--job", "apjob", env=env)
        assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
        _wait_pending(env, proc, "the proposal to go", lambda n: n == 0)
        assert not pending()
        stopped = _json_cli("stop", env=env)
        assert stopped["status"] == "applied", stopped
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    decided = json.loads((out / "rank0.applied.json").read_text())
    assert [d["kind"] for d in decided] == ["checkpoint", "rollback", "set", "stop"], decided
    assert decided[2]["values"] == {"lr": 0.025}
