"""Data state through a real `torchloom run` on CPU (issue 11): an XID reconfiguration of
examples/train_tiny.py from 2 ranks to 1 continues the global sample order (the samples before and
after are exactly those of a run without the fault, and the job exits 0); a torchdata
StatefulDataLoader attached with `attach(loader=...)` follows set lr, pause/resume, checkpoint,
rollback (the loader's position restored) and stop on 2 ranks."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.helpers import (
    EXAMPLE,
    finish_cli,
    read_all_records,
    read_records,
    start_cli,
    status_job,
    unbound_env,
)
from tests.integration.helpers import cli as _cli

LOADER_SCRIPT = REPO / "tests" / "integration" / "scripts" / "loader_train.py"


def _env(base: dict[str, str], home: Path) -> dict[str, str]:
    """A run environment with its own TORCHLOOM_HOME: a run never reuses another test run's weaver
    (which would keep its own health policy)."""
    home.mkdir(parents=True, exist_ok=True)
    return unbound_env(base, "TORCHLOOM_ALLOW_FAULT_INJECTION", OMP_NUM_THREADS="1", TORCHLOOM_HOME=str(home))


def _global_samples(out: Path) -> dict[int, list[list[Any]]]:
    """Step -> the samples of that optimizer step in global order (rank by rank, micro-batch by
    micro-batch). A step trained again by a later attempt (run `R-a1` after `R`) counts only as
    that attempt trained it."""
    by_step: dict[int, list[tuple[str, int, list[list[Any]]]]] = {}
    for path in sorted(out.glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for rec in read_all_records(path):
            flat = [sample for micro in rec["samples"] for sample in micro]
            by_step.setdefault(rec["step"], []).append((rec["run"], rank, flat))
    result = {}
    for step, entries in by_step.items():
        latest = max(run for run, _, _ in entries)  # an attempt's id extends its predecessor's
        result[step] = [s for run, _, flat in sorted(entries) if run == latest for s in flat]
    return result


@pytest.mark.timeout(600)
def test_xid_reconfiguration_of_train_tiny_from_2_ranks_to_1_keeps_the_sample_order(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    steps = "120"
    tiny = [str(EXAMPLE), "--steps", steps, "--log-samples"]
    # The run without the fault.
    ref = ["run", "--job", "tinyref", "--nproc-per-node", "2", *tiny, "--out", str(tmp_path / "ref")]
    ref_run = start_cli(*ref, env=_env(subprocess_env, tmp_path / "home-ref"))
    err = finish_cli(ref_run)
    assert ref_run.returncode == 0, err[-3000:]
    # The same run, with rank 1's device failing (XID 79) under the reconfigure policy.
    env = _env(subprocess_env, tmp_path / "home")
    out = tmp_path / "out"
    proc = start_cli(
        *("run", "--job", "tiny", "--allow-fault-injection", "--health-policy", "reconfigure"),
        *("--nproc-per-node", "2", *tiny, "--step-sleep", "0.05", "--out", str(out)),
        env=env,
    )
    try:
        status_job(env, 15, proc=proc, job="tiny")
        res = _cli("fault", "inject", "--rank", "1", "--xid", "79", "--job", "tiny", "--json", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        err = finish_cli(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "sampler state rejected" not in err

    recs = read_all_records(out / "rank0.jsonl")
    after = [r for r in recs if r["world"] == 1]
    assert after, "the job never ran on one rank"
    resumed_at = after[0]["step"]
    assert 15 <= resumed_at < int(steps)
    assert [r["step"] for r in after] == list(range(resumed_at, int(steps)))
    assert {r["grad_accum_steps"] for r in after} == {2}  # the global batch per step is unchanged
    # The first attempt's global position at the checkpoint is where the one rank goes on.
    first = {r["step"]: r for r in recs if r["world"] == 2}
    assert after[0]["position"] == first[resumed_at - 1]["position"] + 2 * 32
    faulted = _global_samples(out)
    reference = _global_samples(tmp_path / "ref")
    assert sorted(faulted) == sorted(reference) == list(range(int(steps)))
    # Step by step the same samples in the same order: nothing of the order skipped or repeated.
    for step in range(int(steps)):
        assert faulted[step] == reference[step], step


def _records(out: Path) -> list[dict[str, Any]]:
    return [r for rank in (0, 1) for r in read_records(out / f"rank{rank}.jsonl")]


def _min_step(out: Path) -> int:
    """The last step every rank has recorded (-1 before both have one)."""
    recs = _records(out)
    return min(max((r["step"] for r in recs if r["rank"] == k), default=-1) for k in (0, 1))


def _wait(what: str, cond: Any, proc: subprocess.Popen[str], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"torchloom run exited early with {proc.returncode}"
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ok(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, res.stdout + res.stderr
    body: dict[str, Any] = json.loads(res.stdout)
    return body


@pytest.mark.timeout(400)
def test_stateful_dataloader_follows_set_pause_checkpoint_rollback_and_stop(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    env = _env(subprocess_env, tmp_path / "home")
    out = tmp_path / "out"
    job = ["--job", "loader"]
    proc = start_cli("run", *job, "--nproc-per-node", "2", str(LOADER_SCRIPT), "--out", str(out), env=env)
    try:
        _wait("both ranks training", lambda: {r["step"] for r in _records(out)} >= {0, 3}, proc)
        lr_at = _ok(_cli("set", "lr=0.05", "--json", *job, env=env))["applied"][0]["step"]

        paused_at = _ok(_cli("pause", "--json", *job, env=env))["applied"][0]["step"]
        # Half a second to settle, and half a second (10 steps of 50 ms) in which nothing is trained.
        time.sleep(0.5)
        held = max(r["step"] for r in _records(out))
        time.sleep(0.5)
        assert max(r["step"] for r in _records(out)) == held <= paused_at
        _ok(_cli("resume", "--json", *job, env=env))
        _wait("steps after the resume", lambda: max(r["step"] for r in _records(out)) > held + 2, proc)

        # Past the first epoch (12 batches of 4 per rank), so the checkpoint is mid-epoch 1 or later.
        _wait("step 14 on both ranks", lambda: _min_step(out) >= 14, proc)
        ckpt = _ok(_cli("checkpoint", "--tag", "mid", "--json", *job, env=env))
        ckpt_step = ckpt["applied"][0]["step"]
        _wait("steps past the checkpoint", lambda: _min_step(out) >= ckpt_step + 8, proc)
        rolled = _ok(_cli("rollback", "mid", "--json", *job, env=env))
        branch = rolled["applied"][0]["detail"]["branch"]
        _wait(
            "steps on the new branch",
            lambda: sum(r["branch"] == branch for r in _records(out)) >= 2 * 10,
            proc,
        )
        stopped = _ok(_cli("stop", "--json", *job, env=env))
        assert stopped["status"] == "applied"
    finally:
        err = finish_cli(proc)
    assert proc.returncode == 0, err[-3000:]

    for rank in (0, 1):
        recs = read_all_records(out / f"rank{rank}.jsonl")
        main = {r["step"]: r for r in recs if r["branch"] == recs[0]["branch"]}
        new = {r["step"]: r for r in recs if r["branch"] == branch}
        assert min(new) == ckpt_step
        # The loader's position came back with the rollback: the new branch draws the same batches
        # (same epoch, same ids) from the checkpoint on, as the old one did.
        for step in range(ckpt_step, ckpt_step + 8):
            assert (new[step]["epoch"], new[step]["ids"]) == (main[step]["epoch"], main[step]["ids"]), step
        assert all(r["lr"] == 0.05 for s, r in main.items() if s >= lr_at)
        assert all(r["lr"] == 0.01 for s, r in main.items() if s < lr_at)
    # Each epoch of the original branch gives every sample once across the two ranks.
    both = [read_all_records(out / f"rank{k}.jsonl") for k in (0, 1)]
    first_branch = both[0][0]["branch"]
    epoch0 = [
        i for recs in both for r in recs if r["branch"] == first_branch and r["epoch"] == 0 for i in r["ids"]
    ]
    assert sorted(epoch0) == list(range(96))
