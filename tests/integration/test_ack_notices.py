"""End to end: a rank's follow-up notice reaches the journal. A script drives its optimizer with a
scheduler it did not pass to `threadlet.attach`; `torchloom set lr` is applied, the scheduler
overwrites it at its next step, the rank publishes a notice on its acks, and the weaver journals it as
an `lr_overwritten` event naming the rank, the command and the fix (`torchloom journal --json`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.helpers import REPO, status_job, wait_journaled
from tests.integration.helpers import cli as _cli
from tests.integration.test_cli_actions import run_env  # noqa: F401 (fixture)
from torchloom import naming

SCRIPT = REPO / "tests" / "integration" / "scripts" / "unattached_scheduler.py"
FIX = "pass scheduler=... to threadlet.attach"


@pytest.mark.timeout(300)
def test_lr_overwritten_by_an_unattached_scheduler_is_journaled(
    run_env: dict[str, str],  # noqa: F811
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torchloom.app.cli",
            "run",
            "--job",
            "ntc",
            "--nproc-per-node",
            "1",
            str(SCRIPT),
        ],
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Both waits poll in this process (a CLI per poll takes a core from the starting job); the
        # CLI then shows what they waited for.
        status_job(run_env, 5, proc=proc, ranks=1)
        res = _cli("set", "lr=0.05", "--json", env=run_env, timeout_s=120)
        assert res.returncode == 0, (res.stdout, res.stderr)
        command_id = json.loads(res.stdout)["command_id"]
        wait_journaled(run_env, "ntc", naming.LR_OVERWRITTEN, proc=proc)
        res = _cli("journal", "--json", "--job", "ntc", env=run_env, timeout_s=60)
        assert res.returncode == 0, (res.stdout, res.stderr)
        journal = json.loads(res.stdout)
        events = [
            e for e in journal["entries"] if e["type"] == "event" and e["kind"] == naming.LR_OVERWRITTEN
        ]
        assert len(events) == 1, events  # reported once, though the scheduler keeps stepping
        ev = events[0]
        assert ev["attrs"]["rank"] == "0" and ev["command_id"] == command_id, ev
        assert "set by torchloom was changed to" in ev["message"] and FIX in ev["message"], ev
        # The notice changed no outcome: the set stays applied, once.
        sets = [e for e in journal["entries"] if e["type"] == "outcome"]
        assert [(e["kind"], e["status"]) for e in sets] == [("set", "applied")], sets
        res = _cli("stop", "--json", env=run_env, timeout_s=120)
        assert res.returncode == 0, (res.stdout, res.stderr)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
