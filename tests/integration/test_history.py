"""History after the run, with nothing running: a real 2-rank job is checkpointed, steered and rolled
back; once it and its control plane have ended, `journal`, `checkpoints` and `branches --run ID`
read its stored journal (and, with no weaver, default to the latest run), and `replay --run ID`
reproduces every rank's final parameters bit for bit without a saved JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.helpers import cli as _cli
from tests.integration.helpers import example_until_stop, finish_cli, kill_tree, start_cli
from torchloom import discovery


def _json(*args: str, env: dict[str, str]) -> dict[str, Any]:
    res = _cli(*args, "--json", env=env, timeout_s=120)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def _nothing_running(home: Path) -> None:
    deadline = time.monotonic() + 60.0
    while discovery.read(home / "weaver.json") is not None:
        assert time.monotonic() < deadline, "the control plane did not exit after the run"
        time.sleep(0.1)


@pytest.mark.timeout(600)
def test_history_and_replay_of_a_finished_run(
    tmp_path: Path, tl_home: Path, run_alone_env: dict[str, str]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    proc = start_cli(
        "run",
        "--job",
        "hist",
        "--nproc-per-node",
        "2",
        *example_until_stop(0.01),
        str(first),
        env=run_alone_env,
    )
    try:
        deadline = time.monotonic() + 120.0
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the job never trained"
            res = _cli("status", "--json", env=run_alone_env, timeout_s=30)
            jobs = json.loads(res.stdout)["jobs"] if res.returncode == 0 else []
            if jobs and len(jobs[0]["ranks"]) == 2 and min(r["step"] for r in jobs[0]["ranks"]) >= 20:
                run_id = jobs[0]["run_id"]
                break
            time.sleep(0.2)
        for words in (
            ["checkpoint", "--tag", "a"],
            ["set", "lr=0.003"],
            ["rollback", "a"],
            ["set", "lr=0.0005"],
            ["stop"],
        ):
            res = _cli(*words, "--json", env=run_alone_env, timeout_s=120)
            assert res.returncode == 0, (words, res.stdout, res.stderr)
        err = finish_cli(proc)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    _nothing_running(tl_home)

    journal = _json("journal", "--run", run_id, env=run_alone_env)
    kinds = [e["kind"] for e in journal["entries"] if e["type"] == "outcome"]
    assert kinds == ["checkpoint", "set", "rollback", "set", "stop"], kinds
    assert {e["run_id"] for e in journal["entries"]} == {run_id}
    # No weaver and no --run: the latest run.
    assert _json("journal", env=run_alone_env) == journal
    checkpoints = _json("checkpoints", "--run", run_id, env=run_alone_env)
    # The tagged one, then the one the stop took on the rollback's branch (seq 3: b3).
    assert [(c["tag"], c["branch"]) for c in checkpoints["checkpoints"]] == [("a", "main"), (None, "b3")]
    branches = _json("branches", "--run", run_id, env=run_alone_env)
    assert len(branches["branches"]) == 2 and branches["current"] != "main"
    assert [b["from_checkpoint"] for b in branches["branches"] if b["parent"]] == [
        checkpoints["checkpoints"][0]["id"]
    ]

    missing = _cli("journal", "--run", "nosuchrun", env=run_alone_env)
    assert missing.returncode != 0 and f"{run_id} (hist)" in missing.stderr

    replay = start_cli(
        "replay",
        "--run",
        run_id,
        "--nproc-per-node",
        "2",
        "--",
        *example_until_stop(0),
        str(second),
        env=run_alone_env,
    )
    err = finish_cli(replay)
    assert replay.returncode == 0, err[-3000:]
    assert "5 applied commands of job hist" in err
    for rank in (0, 1):
        a = torch.load(first / f"rank{rank}.params.pt", weights_only=True)
        b = torch.load(second / f"rank{rank}.params.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rank, key)
