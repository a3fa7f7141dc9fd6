"""The epoch-loop shape under `torchloom run --nproc-per-node 2`: a DataLoader with a DistributedSampler,
OneCycleLR given as `scheduler=`, DDP on gloo (tests/integration/scripts/epoch_onecycle.py).

`set lr=X` is exactly X at the next step on both ranks (the ranks' own records) and the rest of the
one-cycle schedule is scaled by X / its value there; pause holds and resume goes on; a checkpoint and
a rollback say what they saved and restored (the plain DataLoader's position is not); `stop` ends the
loop, which never looks at `should_stop`, from inside `tl.step()`: every rank and `torchloom run`
exit 0 long before the loop's end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.integration.helpers import cli, read_records, status_job, unbound_env, wait_status

SCRIPT = REPO / "tests" / "integration" / "scripts" / "epoch_onecycle.py"
EPOCHS = 100
STEPS_PER_EPOCH = 16  # 256 samples, 2 ranks, batches of 8
X = 0.01


def one_cycle() -> list[float]:
    """The untouched schedule: the lr optimizer step t uses, for every t."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH
    )
    out = []
    for _ in range(EPOCHS * STEPS_PER_EPOCH):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


def command(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run a torchloom command with --json; it must be applied on both ranks at one step."""
    res = cli(*args, "--json", env=env, timeout_s=120)
    assert res.returncode == 0, res.stdout + res.stderr
    outcome: dict[str, Any] = json.loads(res.stdout)
    assert outcome["status"] == "applied", outcome
    assert [a["rank"] for a in outcome["applied"]] == [0, 1]
    assert outcome["applied"][0]["step"] == outcome["applied"][1]["step"], outcome
    return outcome


def ranks(env: dict[str, str]) -> list[dict[str, Any]]:
    res = cli("status", "--json", env=env, timeout_s=30)
    if res.returncode != 0:
        return []
    jobs = json.loads(res.stdout)["jobs"]
    return list(jobs[0]["ranks"]) if jobs else []


def wait_until(proc: subprocess.Popen[str], what: str, cond: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"torchloom run exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def main_records(out: Path, rank: int, branch: str = "main") -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_records(out / f"rank{rank}.jsonl") if r["branch"] == branch}


@pytest.mark.timeout(420)
def test_epoch_loop_with_onecycle_set_pause_checkpoint_rollback_stop(
    tmp_path: Path, tl_home: Path, subprocess_env: dict[str, str]
) -> None:
    env = unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CONTROLPLANE_IDLE_S="1")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "torchloom.app.cli", "run", "--job", "epochs", "--nproc-per-node", "2",
            str(SCRIPT), "--epochs", str(EPOCHS), "--out", str(out), "--step-sleep", "0.02",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        status_job(env, 3, proc=proc)  # both ranks training (polled in this process, then the CLI)

        lr_set = command(env, "set", f"lr={X}")
        s = lr_set["applied"][0]["step"]
        for a in lr_set["applied"]:
            assert a["detail"]["lr@0"] == repr(X) and a["detail"]["lr_schedule"] == "scaled", a

        paused = command(env, "pause")
        p = paused["applied"][0]["step"]
        wait_status(
            env,
            "both ranks paused",
            lambda st: bool(st.jobs) and {str(r.state) for r in st.jobs[0].ranks} == {"paused"},
            proc=proc,
        )
        assert {r["state"] for r in ranks(env)} == {"paused"}  # and `torchloom status` says so
        # Held at the boundary: no rank records past the paused step while paused.
        assert max(max(main_records(out, r)) for r in (0, 1)) <= p
        command(env, "resume")
        wait_until(
            proc,
            "training again after resume",
            lambda: min(max(main_records(out, r)) for r in (0, 1)) > p + 2,
        )

        ck = command(env, "checkpoint", "--tag", "c1")
        c = int(ck["applied"][0]["detail"]["checkpoint_step"])
        wait_until(
            proc, "steps past the checkpoint", lambda: min(max(main_records(out, r)) for r in (0, 1)) > c + 5
        )
        rb = command(env, "rollback", "c1")
        detail = rb["applied"][0]["detail"]
        assert {k: detail[k] for k in detail if k.endswith("_restored")} == {
            "model_restored": "true",
            "optimizer_restored": "true",
            "scheduler_restored": "true",
            "rng_restored": "true",
            "data_position_restored": "false",  # a plain DataLoader goes on where it is
        }
        branch = detail["branch"]
        wait_until(
            proc,
            "steps on the new branch",
            lambda: min(len(main_records(out, r, branch)) for r in (0, 1)) > 3,
        )

        stop = command(env, "stop")
        sd = stop["applied"][0]["detail"]
        assert (sd["exits_at_next_step"], sd["handled_by_loop"]) == ("true", "false")
        stopped_at = stop["applied"][0]["step"]
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, output[-4000:]

    ref = one_cycle()
    for r in (0, 1):
        main = main_records(out, r)
        # The step the set was decided at uses X exactly; the schedule after it is scaled.
        assert main[s]["lr"] == X, (r, main[s])
        assert main[s - 1]["lr"] == pytest.approx(ref[s - 1], rel=1e-12)
        for t in range(s + 1, c + 1):
            assert main[t]["lr"] == pytest.approx(ref[t] * X / ref[s], rel=1e-9), (r, t)
        # The new branch starts at the checkpoint with its lr: scheduler and factor came back.
        new = main_records(out, r, branch)
        assert min(new) == c and new[c]["lr"] == pytest.approx(main[c]["lr"], rel=1e-12)
        for t in sorted(new)[1:]:
            assert new[t]["lr"] == pytest.approx(ref[t] * X / ref[s], rel=1e-9), (r, t)
        # The stop ended the loop one step after it was decided, far before its end.
        assert max(new) == stopped_at < EPOCHS * STEPS_PER_EPOCH // 2
