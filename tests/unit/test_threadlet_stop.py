"""Stop stops every loop: after a decided stop (replayed here, so one local process decides it with no
bus), the next `tl.step()` ends a loop that does not handle stop with status 0, after its checkpoint,
running the script's `with`/`finally` blocks; a loop that iterates `tl.range`, reads `should_stop` or
declared `handles_stop` ends itself; a second stop is rejected as "already stopping"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

SCRIPT = """
import json, sys
import torch
import threadlet

mode, out = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
tl = threadlet.attach(model=model, optimizer=opt, handles_stop=(mode == "declared"))
steps = []
try:
    with open(out + "/records.jsonl", "w") as records:
        loop = tl.range(100) if mode == "range" else range(100)
        for i in loop:
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            records.write(json.dumps({"i": i}) + "\\n")  # buffered: only a clean exit writes it out
            tl.step()
            if mode == "should_stop" and tl.should_stop:
                break
finally:
    with open(out + "/applied.json", "w") as f:
        json.dump({"applied": [d.to_json() for d in tl.applied], "step": tl.step_count}, f)
print("loop ended", flush=True)
tl.close()
"""


def run(
    tmp_path: Path, mode: str, commands: list[dict[str, Any]]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    (tmp_path / "replay.json").write_text(json.dumps({"job": "stopjob", "commands": commands}))
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TORCHLOOM_JOB": "stopjob",
        "TORCHLOOM_RUN_ID": "r1",
        "TORCHLOOM_REPLAY": str(tmp_path / "replay.json"),
        "TORCHLOOM_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "TORCHLOOM_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "applied.json").read_text())
    return proc, result


def stop_at(seq: int, step: int) -> dict[str, Any]:
    return {"seq": seq, "step": step, "branch": "main", "kind": "stop", "values": {}, "args": {"tag": "end"}}


def records(tmp_path: Path) -> list[int]:
    return [json.loads(line)["i"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_a_plain_loop_ends_at_the_step_after_a_stop_with_status_zero(tmp_path: Path) -> None:
    proc, result = run(tmp_path, "plain", [stop_at(1, 5)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loop ended" not in proc.stdout  # the process ended inside tl.step()
    # Decided at the boundary of step 5 (after loop index 4); index 5 runs, its step() ends it.
    assert records(tmp_path) == list(range(6))
    (stop,) = result["applied"]
    assert stop["status"] == "applied" and stop["step"] == 5
    assert stop["detail"]["exits_at_next_step"] == "true" and stop["detail"]["handled_by_loop"] == "false"
    assert stop["detail"]["checkpoint_step"] == "5"
    assert (tmp_path / "ckpt" / "stopjob").is_dir()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["range", "should_stop", "declared"])
def test_a_loop_that_handles_stop_ends_itself(tmp_path: Path, mode: str) -> None:
    proc, result = run(tmp_path, mode, [stop_at(1, 5), stop_at(2, 7)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loop ended" in proc.stdout
    first = result["applied"][0]
    assert first["detail"]["handled_by_loop"] == "true" and first["detail"]["exits_at_next_step"] == "false"
    if mode == "declared":
        # It said it handles stop but never looks: it runs to its end; the second stop is refused.
        assert records(tmp_path) == list(range(100))
        second = result["applied"][1]
        assert second["status"] == "rejected" and second["reason"] == (
            "already stopping: a stop was decided before this one"
        )
    else:
        assert records(tmp_path) == list(range(5)) and result["step"] == 5
