"""End to end: checkpoint, set lr, change the data mix, rollback, then lr and mix again on the new
branch, on a real 2-rank job; `torchloom journal --json` to a file;
`torchloom replay` of that file (whose last set, on the new branch, shapes the result, and whose
stop ends it) reproduces every rank's final parameters bit for bit, on either agreement path
(riding DDP's gradient all-reduce, or the gloo rounds; the replay runs on the same path as the run).
The run on DDP's all-reduce is shared with test_history, which also reads its stored history and
replays it by run id: `steer_and_stop` and `replay_of_journal_file` are that run and this check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import cli as _cli
from tests.integration.helpers import example_until_stop, finish_cli, start_cli, status_job
from tests.integration.test_cli_actions import run_env  # noqa: F401 (fixture)

# The commands of the run: checkpoint, two sets, rollback, a set on the new branch (then a stop).
STEERING = (
    ["checkpoint", "--tag", "a"],
    ["set", "lr=0.003"],
    ["set", "mix=code:0.2,math:0.8,web:0"],
    ["rollback", "a"],
    ["set", "lr=0.0005", "mix=code:0,math:0.5,web:0.5"],
)


def steer_and_stop(job: str, first: Path, env: dict[str, str]) -> str:
    """Run the example as `job` under `torchloom run` (records in `first`), send STEERING at step 20,
    check the live weaver's journal, stop it, and wait until its control plane has exited. Returns
    the run id."""
    proc = start_cli(
        "run", "--job", job, "--nproc-per-node", "2", *example_until_stop(0.01), str(first), env=env
    )
    try:
        run_id = str(status_job(env, 20, proc=proc)["run_id"])
        for words in STEERING:
            res = _cli(*words, "--json", env=env, timeout_s=120)
            assert res.returncode == 0, (words, res.stdout, res.stderr)
        res = _cli("journal", "--json", "--job", job, env=env)  # from the live weaver
        assert res.returncode == 0, res.stderr
        kinds = [e["kind"] for e in json.loads(res.stdout)["entries"] if e["type"] == "outcome"]
        assert kinds == ["checkpoint", "set", "set", "rollback", "set"]
        res = _cli("stop", "--json", env=env, timeout_s=120)  # applied on every rank: the loop ends after it
        assert res.returncode == 0, (res.stdout, res.stderr)
    finally:
        err = finish_cli(proc)
    assert proc.returncode == 0, err[-3000:]
    deadline = time.monotonic() + 60
    while Path(env["TORCHLOOM_HOME"], "weaver.json").exists():
        assert time.monotonic() < deadline, "the control plane did not exit after the run"
        time.sleep(0.1)
    return run_id


def replay_reproduces(args: list[str], job: str, first: Path, second: Path, env: dict[str, str]) -> None:
    """`torchloom replay ARGS` of the run (records in `second`) applies its 6 commands and ends with
    every rank's parameters bit for bit those of the run (in `first`)."""
    replay = start_cli(
        "replay", *args, "--nproc-per-node", "2", "--", *example_until_stop(0), str(second), env=env
    )
    err = finish_cli(replay)
    assert replay.returncode == 0, err[-3000:]
    assert f"6 applied commands of job {job}" in err
    for rank in (0, 1):
        a = torch.load(first / f"rank{rank}.params.pt", weights_only=True)
        b = torch.load(second / f"rank{rank}.params.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rank, key)


def replay_of_journal_file(job: str, first: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """With no weaver left, `torchloom journal --json --job JOB` is the stored journal of the latest
    run, ending with the stop; its replay from that file reproduces the run."""
    res = _cli("journal", "--json", "--job", job, env=env)
    assert res.returncode == 0, res.stderr
    (tmp_path / "j.json").write_text(res.stdout)
    kinds = [e["kind"] for e in json.loads(res.stdout)["entries"] if e["type"] == "outcome"]
    assert kinds == ["checkpoint", "set", "set", "rollback", "set", "stop"]
    replay_reproduces([str(tmp_path / "j.json")], job, first, tmp_path / "second", env)


@pytest.mark.timeout(600)
def test_replay_of_journal_reproduces_final_params_on_the_gloo_rounds(
    tmp_path: Path,
    run_env: dict[str, str],  # noqa: F811
) -> None:
    # DDP's all-reduce (TORCHLOOM_AGREEMENT=auto) is the run test_history shares.
    env = dict(run_env, TORCHLOOM_AGREEMENT="gloo", TORCHLOOM_CONTROLPLANE_IDLE_S="1")
    steer_and_stop("rp", tmp_path / "first", env)
    replay_of_journal_file("rp", tmp_path / "first", tmp_path, env)
