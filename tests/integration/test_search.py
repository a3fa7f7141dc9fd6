"""Branch search end to end under a real 2-rank `torchloom run`: `torchloom search lr=x0.1,x10,x1000`
tries each lr from one checkpoint, picks the best eval loss (the diverging x1000 never wins), and
continues from that checkpoint with it on both ranks; the journal shows every branch and the
search_result event. A search whose candidate is refused exits 2 and leaves the job at its start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli, kill_tree, start_cli, wait_status

SCRIPT = Path(__file__).parent / "scripts" / "search_train.py"
STEPS = 15


def _status(env: dict[str, str]) -> dict[str, Any] | None:
    res = cli("status", "--job", "srch", "--json", env=env, timeout_s=30)
    jobs = json.loads(res.stdout)["jobs"] if res.returncode == 0 else []
    return jobs[0] if jobs and len(jobs[0]["ranks"]) == 2 else None


@pytest.mark.timeout(240)
def test_search_picks_the_best_lr_and_journals_every_branch(
    tmp_path: Path, run_alone_env: dict[str, str]
) -> None:
    env = run_alone_env
    out = tmp_path / "out"
    run = ["run", "--job", "srch", "--nproc-per-node", "2", str(SCRIPT), "--out", str(out)]
    proc = start_cli(*run, env=env)
    try:
        # Waited for in this process (a CLI per poll takes a core from the starting job), then seen
        # so by `torchloom status`.
        wait_status(
            env,
            "both ranks training at step 5 with an lr knob",
            lambda s: (
                s.jobs
                and len(s.jobs[0].ranks) == 2
                and min(r.step for r in s.jobs[0].ranks) >= 5
                and all(r.knobs.get("lr") for r in s.jobs[0].ranks)
            ),
            proc=proc,
            job="srch",
            timeout_s=90,
        )
        job = _status(env)
        assert job and min(r["step"] for r in job["ranks"]) >= 5 and job["ranks"][0]["knobs"].get("lr"), job

        res = cli("search", "lr=x0.1,x10,x1000", "--steps", str(STEPS), "--job", "srch", "--json", env=env)
        assert res.returncode == 0, res.stderr
        found = json.loads(res.stdout)
        assert found["candidates"] == pytest.approx([0.001, 0.1, 10.0])
        assert found["winner"] == pytest.approx(0.1), found
        low, best, diverged = found["metrics"]
        assert best < low and diverged is None, found  # x1000 diverges: its loss is not finite
        assert all(t["steps"] >= STEPS for t in found["trials"]), found
        assert len({t["branch"] for t in found["trials"]}) == 3, found
        job = _status(env)
        assert job is not None and [r["knobs"]["lr"] for r in job["ranks"]] == pytest.approx([0.1, 0.1])

        # A refused candidate ends the search: exit 2, a clear message, the job back at the start.
        bad = cli("search", "lr=1e-3,-1", "--steps", "3", "--job", "srch", env=env)
        assert bad.returncode == 2, bad.stderr
        assert "candidate lr=-1: the set refused" in bad.stderr, bad.stderr
        assert "the job was rolled back to ckpt-" in bad.stderr, bad.stderr

        stopped = cli("stop", "--job", "srch", "--json", env=env)
        assert stopped.returncode == 0, stopped.stderr
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]

    per_rank = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    assert [(d["seq"], d["kind"], d["step"]) for d in per_rank[0]] == [
        (d["seq"], d["kind"], d["step"]) for d in per_rank[1]
    ]
    kinds = [d["kind"] for d in per_rank[0]]
    search_one = ["eval", "checkpoint", *["rollback", "set", "eval"] * 3, "rollback", "set"]
    # The second: lr=1e-3 tried, then the rollback before lr=-1, whose set the weaver refused, then back.
    search_two = ["eval", "checkpoint", "rollback", "set", "eval", "rollback", "rollback"]
    assert kinds == [*search_one, *search_two, "stop"], kinds
    assert per_rank[0][len(search_one) - 1]["values"] == {"lr": 0.1}

    res = cli("journal", "--job", "srch", "--json", env=env)
    if res.returncode != 0:  # the control plane may be gone: read the stored journal
        res = cli("journal", "--json", env=env)
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)["entries"]
    searched = [e for e in entries if e["type"] == "outcome" and (e["issuer"] or {}).get("kind") == "search"]
    assert [e["kind"] for e in searched if e["status"] == "applied"] == kinds[:-1]
    results = [e for e in entries if e["type"] == "event" and e["kind"] == "search_result"]
    assert len(results) == 2, [e["kind"] for e in entries if e["type"] == "event"]
    first, second = (r["attrs"] for r in results)
    assert json.loads(first["winner"]) == pytest.approx(0.1) and first["rollback_status"] == "applied"
    assert json.loads(first["candidates"]) == pytest.approx([0.001, 0.1, 10.0])
    assert json.loads(first["metrics"])[2] is None and first["error"] == ""
    assert json.loads(second["winner"]) is None and "lr=-1: the set refused" in second["error"]
