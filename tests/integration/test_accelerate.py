"""`threadlet.attach` with what `accelerate.Accelerator.prepare` returns (DDP model, AcceleratedOptimizer,
AcceleratedScheduler), in a real 2-rank torchrun job on CPU. The commands come from a replay file
(the same path a live command takes once decided, without a bus): set lr at step 5, checkpoint at 8,
rollback to it at 12, stop on the new branch. The ranks' records show lr=X at the next step, the
restored parameters and schedule after the rollback, and the early exit with status 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.helpers import read_all_records, unbound_env

SCRIPT = REPO / "tests" / "integration" / "scripts" / "accelerate_train.py"
LR = 0.003125  # exactly representable
CKPT = "ckpt-2"  # the checkpoint of seq 2


@pytest.mark.timeout(300)
def test_attach_takes_accelerate_prepare_outputs(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    def entry(seq: int, step: int, branch: str, kind: str, **body: object) -> dict[str, object]:
        return {"seq": seq, "step": step, "branch": branch, "kind": kind, "values": {}, "args": {}, **body}

    plan = {
        "job": "acc",
        "commands": [
            entry(1, 5, "main", "set", values={"lr": LR}),
            entry(2, 8, "main", "checkpoint"),
            entry(3, 12, "main", "rollback", args={"checkpoint": CKPT}),
            entry(4, 11, "b3", "stop"),
        ],
    }
    (tmp_path / "replay.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    env = unbound_env(
        subprocess_env,
        OMP_NUM_THREADS="1",
        TORCHLOOM_JOB="acc",
        TORCHLOOM_REPLAY=str(tmp_path / "replay.json"),
        TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
    )
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"),
        *(str(SCRIPT), "--out", str(out), "--steps", "1000"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-4000:]

    for r in (0, 1):
        types = json.loads((out / f"rank{r}.types.json").read_text())
        assert types == {
            "model": "DistributedDataParallel",
            "optimizer": "AcceleratedOptimizer",
            "scheduler": "AcceleratedScheduler",
        }
        # The agreement rides the gradient all-reduce of the DDP accelerate made (issue 12).
        assert (out / f"rank{r}.agreement_path").read_text() == "piggyback"
        recs = read_all_records(out / f"rank{r}.jsonl")
        main = {x["step"]: x for x in recs if x["branch"] == "main"}
        new = [x for x in recs if x["branch"] == "b3"]
        assert sorted(main) == list(range(12)), r
        assert main[4]["lr"] != LR and main[5]["lr"] == LR, (main[4], main[5])
        # The rollback restored model, optimizer and schedule of step 8: the branch retraces it.
        assert [x["step"] for x in new] == [8, 9, 10], r
        assert new[0]["lr"] == main[8]["lr"], (new[0], main[8])
        assert new[0]["params_before"] == main[8]["params_before"] == main[7]["params"], (new[0], main[8])
