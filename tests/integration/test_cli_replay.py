"""End to end: checkpoint, set lr, change the data mix, rollback, then lr and mix again on the new
branch, on a real 2-rank job; `torchloom journal --json` to a file;
`torchloom replay` of that file (whose last set, on the new branch, shapes the result, and whose
stop ends it) reproduces every rank's final parameters bit for bit, on either agreement path
(riding DDP's gradient all-reduce, or the gloo rounds; the replay runs on the same path as the run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import cli as _cli
from tests.integration.helpers import example_until_stop, finish_cli, start_cli
from tests.integration.test_cli_actions import _poll_json, run_env  # noqa: F401 (fixture)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("agreement", ["auto", "gloo"])
def test_replay_of_journal_reproduces_final_params(
    tmp_path: Path,
    run_env: dict[str, str],  # noqa: F811
    agreement: str,
) -> None:
    run_env = dict(run_env, TORCHLOOM_AGREEMENT=agreement)
    run_env = dict(run_env, TORCHLOOM_CONTROLPLANE_IDLE_S="1")  # exits soon after the job
    first, second = tmp_path / "first", tmp_path / "second"
    proc = start_cli(
        "run", "--job", "rp", "--nproc-per-node", "2", *example_until_stop(0.01), str(first), env=run_env
    )
    try:
        _poll_json(
            ["status", "--json"],
            run_env,
            proc,
            lambda d: (
                bool(d["jobs"])
                and len(d["jobs"][0]["ranks"]) == 2
                and min(r["step"] for r in d["jobs"][0]["ranks"]) >= 20
            ),
        )
        for words in (
            ["checkpoint", "--tag", "a"],
            ["set", "lr=0.003"],
            ["set", "mix=code:0.2,math:0.8,web:0"],
            ["rollback", "a"],
            ["set", "lr=0.0005", "mix=code:0,math:0.5,web:0.5"],
        ):
            res = _cli(*words, "--json", env=run_env)
            assert res.returncode == 0, (words, res.stdout, res.stderr)
        res = _cli("journal", "--json", "--job", "rp", env=run_env)  # from the live weaver
        assert res.returncode == 0, res.stderr
        kinds = [e["kind"] for e in json.loads(res.stdout)["entries"] if e["type"] == "outcome"]
        assert kinds == ["checkpoint", "set", "set", "rollback", "set"]
        res = _cli("stop", "--json", env=run_env)  # applied on every rank: the loop ends after it
        assert res.returncode == 0, (res.stdout, res.stderr)
    finally:
        err = finish_cli(proc)
    assert proc.returncode == 0, err[-3000:]
    deadline = time.monotonic() + 60
    while (
        run_env.get("TORCHLOOM_HOME")
        and Path(run_env["TORCHLOOM_HOME"], "weaver.json").exists()
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    # With no weaver left, the journal is the stored one of the latest run, now ending with the stop.
    res = _cli("journal", "--json", "--job", "rp", env=run_env)
    assert res.returncode == 0, res.stderr
    (tmp_path / "j.json").write_text(res.stdout)
    kinds = [e["kind"] for e in json.loads(res.stdout)["entries"] if e["type"] == "outcome"]
    assert kinds == ["checkpoint", "set", "set", "rollback", "set", "stop"]
    replay = start_cli(
        "replay",
        str(tmp_path / "j.json"),
        "--nproc-per-node",
        "2",
        "--",
        *example_until_stop(0),
        str(second),
        env=run_env,
    )
    err = finish_cli(replay)
    assert replay.returncode == 0, err[-3000:]
    assert "6 applied commands of job rp" in err
    for rank in (0, 1):
        a = torch.load(first / f"rank{rank}.params.pt", weights_only=True)
        b = torch.load(second / f"rank{rank}.params.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rank, key)
