"""History after the run, with nothing running: a real 2-rank job is checkpointed, steered and rolled
back (test_cli_replay's run on DDP's all-reduce, `steer_and_stop`); once it and its control plane
have ended, `journal`, `checkpoints` and `branches --run ID` read its stored journal (and, with no
weaver, default to the latest run), and both `replay --run ID` and test_cli_replay's replay of the
journal saved to a file reproduce every rank's final parameters bit for bit. One run serves both
files' checks: a run is about half of each test's time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli as _cli
from tests.integration.test_cli_replay import replay_of_journal_file, replay_reproduces, steer_and_stop

JOB = "hist"


def _json(*args: str, env: dict[str, str]) -> dict[str, Any]:
    res = _cli(*args, "--json", env=env, timeout_s=120)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


@pytest.mark.timeout(600)
def test_history_and_replays_of_a_finished_run(
    tmp_path: Path, tl_home: Path, run_alone_env: dict[str, str]
) -> None:
    env = dict(run_alone_env, TORCHLOOM_AGREEMENT="auto")
    first = tmp_path / "first"
    run_id = steer_and_stop(JOB, first, env)  # returns once its control plane has exited

    journal = _json("journal", "--run", run_id, env=env)
    kinds = [e["kind"] for e in journal["entries"] if e["type"] == "outcome"]
    assert kinds == ["checkpoint", "set", "set", "rollback", "set", "stop"], kinds
    assert {e["run_id"] for e in journal["entries"]} == {run_id}
    # No weaver and no --run: the latest run.
    assert _json("journal", env=env) == journal
    checkpoints = _json("checkpoints", "--run", run_id, env=env)
    # The tagged one, then the one the stop took on the rollback's branch (seq 4: b4).
    assert [(c["tag"], c["branch"]) for c in checkpoints["checkpoints"]] == [("a", "main"), (None, "b4")]
    branches = _json("branches", "--run", run_id, env=env)
    assert len(branches["branches"]) == 2 and branches["current"] != "main"
    assert [b["from_checkpoint"] for b in branches["branches"] if b["parent"]] == [
        checkpoints["checkpoints"][0]["id"]
    ]

    missing = _cli("journal", "--run", "nosuchrun", env=env)
    assert missing.returncode != 0 and f"{run_id} ({JOB})" in missing.stderr

    # Before any replay: a replay is a run of the job too, and would be the latest one.
    replay_of_journal_file(JOB, first, tmp_path, env)
    replay_reproduces(["--run", run_id], JOB, first, tmp_path / "by-run-id", env)
