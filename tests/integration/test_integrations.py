"""The HF Trainer and Lightning callbacks under `torchloom run --nproc-per-node 2` on CPU: tiny models
built from configs (HF_HUB_OFFLINE=1), synthetic data, steered from another process with the CLI.
Each script's own per-step records are the ground truth: set lr (exactly X at the next step on both
ranks) with the framework's clip/accumulation settings, pause/resume, checkpoint, eval, rollback (the
new branch starts at the checkpoint's step), and stop (the job exits 0 long before its last step)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.helpers import cli, read_records, unbound_env, wait_status

SCRIPTS = REPO / "tests" / "integration" / "scripts"
STEPS = 100_000  # far more than a test runs: only `stop` ends the job
LR = 0.000625  # exactly representable, far from every value the schedules reach by then


@pytest.fixture
def run_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return unbound_env(
        subprocess_env,
        "TORCHLOOM_ALLOW_FAULT_INJECTION",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TORCHLOOM_CONTROLPLANE_IDLE_S="1",
    )


def _records(out: Path) -> list[list[dict[str, Any]]]:
    return [read_records(out / f"rank{r}.jsonl") for r in (0, 1)]


def _wait(what: str, ok: Callable[[], bool], proc: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(
                f"torchloom run exited ({proc.returncode}) waiting for {what}: {err[-4000:]}"
            )
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting for {what}"
        time.sleep(0.1)


def _past(out: Path, step: int) -> Callable[[], bool]:
    """Both ranks have a record of a step >= `step` (on any branch)."""
    return lambda: all(recs and recs[-1]["step"] >= step for recs in _records(out))


def _command(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run a CLI command with --json; it must be applied on both ranks at one step."""
    res = cli(*args, "--json", "--timeout", "60", env=env, timeout_s=120)
    assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
    outcome: dict[str, Any] = json.loads(res.stdout)
    assert outcome["status"] == "applied", outcome
    assert [a["rank"] for a in outcome["applied"]] == [0, 1], outcome
    steps = {a["step"] for a in outcome["applied"]}
    assert len(steps) == 1, outcome
    return outcome


def _at(records: list[dict[str, Any]], step: int, branch: str = "main") -> dict[str, Any]:
    return next(r for r in records if r["step"] == step and r["branch"] == branch)


def steer(
    tmp_path: Path, env: dict[str, str], script: str, job: str, knobs: dict[str, str]
) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """Start SCRIPT under `torchloom run`, then set lr plus `knobs`, pause/resume, checkpoint, eval,
    rollback and stop it. Returns both ranks' records and the decided steps by command."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "torchloom.app.cli", "run", "--job", job, "--nproc-per-node", "2"),
            *(str(SCRIPTS / script), "--out", str(out), "--steps", str(STEPS), "--step-sleep", "0.02"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    steps: dict[str, int] = {}
    try:
        _wait("both ranks training", _past(out, 5), proc, timeout_s=240)
        values = {"lr": str(LR), **knobs}
        # The training-loop knobs appear once the callback has enabled them: wait for the schema
        # (in this process: a CLI per poll takes a core from the job), then `torchloom knobs` lists it.
        wait_status(
            env, "the knobs", lambda s: s.jobs and set(values) <= {k.name for k in s.jobs[0].knobs}, proc=proc
        )
        _wait("the knobs", lambda: _knobs_known(env, set(values)), proc)
        steps["set"] = _command(env, "set", *(f"{k}={v}" for k, v in values.items()))["applied"][0]["step"]

        steps["pause"] = _command(env, "pause")["applied"][0]["step"]
        _wait("the pause step", _past(out, steps["pause"] - 1), proc)
        held = [len(r) for r in _records(out)]
        time.sleep(0.5)  # a paused job writes nothing: compare after 25 steps' time (20 ms a step)
        assert [len(r) for r in _records(out)] == held, "ranks kept training while paused"
        steps["resume"] = _command(env, "resume")["applied"][0]["step"]
        _wait("training after resume", _past(out, steps["pause"] + 3), proc)

        ckpt = _command(env, "checkpoint", "--tag", "warm")["applied"][0]
        steps["checkpoint"] = int(ckpt["detail"]["checkpoint_step"])
        evaluated = _command(env, "eval")["applied"]
        assert all(any(k.startswith("eval.") for k in a["detail"]) for a in evaluated), evaluated
        _wait("steps past the checkpoint", _past(out, steps["checkpoint"] + 5), proc)
        rb = _command(env, "rollback", "warm")["applied"][0]
        steps["rollback"] = rb["step"]
        branch = rb["detail"]["branch"]
        _wait(
            "steps on the new branch",
            lambda: all(sum(x["branch"] == branch for x in recs) >= 3 for recs in _records(out)),
            proc,
        )
        steps["stop"] = _command(env, "stop")["applied"][0]["step"]
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-4000:]
        # The framework wrapped the model in DDP itself; the agreement found it and rode its
        # gradient all-reduce (issue 12), not the gloo rounds.
        paths = [(out / f"rank{r}.agreement_path").read_text() for r in (0, 1)]
        assert paths == ["piggyback", "piggyback"], paths
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return _records(out), {**steps, "branch": int(branch.lstrip("b"))}


def _knobs_known(env: dict[str, str], names: set[str]) -> bool:
    res = cli("knobs", "--json", env=env, timeout_s=60)
    return res.returncode == 0 and names <= {k["name"] for k in json.loads(res.stdout)["knobs"]}


def check_common(records: list[list[dict[str, Any]]], steps: dict[str, int]) -> None:
    """What both frameworks must show in their records."""
    branch = f"b{steps['branch']}"
    for recs in records:
        # set lr=X: the next step's optimizer update used exactly X, on both ranks.
        assert _at(recs, steps["set"])["lr"] == LR, recs[steps["set"] - 1 : steps["set"] + 2]
        assert _at(recs, steps["set"] - 1)["lr"] != LR
        # Rollback: the new branch starts at the checkpoint's step.
        first_new = next(r for r in recs if r["branch"] == branch)
        assert first_new["step"] == steps["checkpoint"], first_new
        # Stop: nothing after the stop's step, far before the end.
        assert recs[-1]["step"] < steps["stop"] < STEPS, recs[-1]
        assert recs[-1]["branch"] == branch


@pytest.mark.timeout(600)
def test_hf_trainer_callback_under_torchloom_run(tmp_path: Path, run_env: dict[str, str]) -> None:
    records, steps = steer(tmp_path, run_env, "hf_trainer.py", "hfjob", {"grad_clip_norm": "0.5"})
    check_common(records, steps)
    for recs in records:
        assert _at(recs, steps["set"] - 1)["max_grad_norm"] == 1.0
        assert _at(recs, steps["set"])["max_grad_norm"] == 0.5


@pytest.mark.timeout(600)
def test_lightning_callback_under_torchloom_run(tmp_path: Path, run_env: dict[str, str]) -> None:
    knobs = {"grad_clip_norm": "0.5", "grad_accum_steps": "2"}
    records, steps = steer(tmp_path, run_env, "lightning_train.py", "pljob", knobs)
    check_common(records, steps)
    for recs in records:
        before, after = _at(recs, steps["set"] - 1), _at(recs, steps["set"])
        assert (before["clip"], before["accum"]) == (1.0, 1), before
        assert (after["clip"], after["accum"]) == (0.5, 2), after
