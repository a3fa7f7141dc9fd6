"""What `make demo` runs: a 2-rank training job steered live from "another terminal", then checked.

It uses the real CLI as a user would: `torchloom run` (which starts NATS and a weaver), then
`torchloom set` with no flags (found through the discovery file). `torchloom run --ui` also serves the
web dashboard; its URL is printed once the job is up. Afterwards it reads each rank's own
records and prints, per accepted command, the step every rank applied it at and the loss around it.
The job trains until the demo stops it (`torchloom stop`), so a slow machine never lets it end
before it was steered. Exit status 0 iff the job exited 0 and every rank applied every command at the
same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train_tiny.py"
STEPS = 1_000_000  # more than the demo needs: its `torchloom stop` ends the job
LOSS_WINDOW = 10  # steps averaged for "loss before" and "loss after"
DEADLINE_S = 180.0


def torchloom(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one `torchloom` CLI command the way a user in a second terminal would."""
    return subprocess.run(
        [sys.executable, "-m", "torchloom.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for_step(step: int, env: dict[str, str], job: subprocess.Popen[bytes]) -> None:
    """Poll `torchloom status --json` until every rank of the demo job is past `step`."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise SystemExit(f"demo: the job exited early with status {job.returncode}")
        res = torchloom("status", "--json", "--job", "demo", env=env)
        if res.returncode == 0:
            jobs = json.loads(res.stdout)["jobs"]
            ranks = jobs[0]["ranks"] if jobs else []
            if len(ranks) == 2 and min(r["step"] for r in ranks) >= step:
                return
        time.sleep(0.2)
    raise SystemExit(f"demo: ranks did not reach step {step} within {DEADLINE_S:g}s")


def submit(words: list[str], env: dict[str, str]) -> dict[str, Any]:
    res = torchloom("set", *words, "--json", env=env)
    outcome: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    shown = " ".join(words)
    if res.returncode == 0:
        steps = ", ".join(f"rank {a['rank']} at step {a['step']}" for a in outcome["applied"])
        print(f"  torchloom set {shown}: applied ({steps})")
    else:
        print(
            f"  torchloom set {shown}: exit {res.returncode}, {outcome.get('status')}: {res.stderr.strip()}"
        )
    outcome["exit"] = res.returncode
    return outcome


def print_ui_url(log_path: Path) -> None:
    """Show the web UI's address, which `torchloom run --ui` printed to the job log."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("torchloom UI: "):
            print(f"demo: open the live dashboard at {line.removeprefix('torchloom UI: ')}")
            return
    print("demo: no web UI (see the job log for why)")


def load_records(out: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def mean_loss(records: list[dict[str, Any]], lo: int, hi: int) -> float:
    window = [r["loss"] for r in records if lo <= r["step"] < hi]
    return sum(window) / len(window) if window else float("nan")


def check_and_report(out: Path, accepted: list[tuple[str, dict[str, Any]]]) -> bool:
    """Print the table and return True iff every rank applied every command at one and the same step."""
    ok = True
    records = {rank: load_records(out, rank) for rank in (0, 1)}
    applied = {rank: json.loads((out / f"rank{rank}.applied.json").read_text()) for rank in (0, 1)}
    print(f"\n{'command':<38} {'rank 0 step':>11} {'rank 1 step':>11} {'loss before':>12} {'loss after':>11}")
    for shown, outcome in accepted:
        steps: dict[int, int | None] = {}
        for rank in (0, 1):
            mine = [a for a in applied[rank] if a["command_id"] == outcome["command_id"]]
            steps[rank] = mine[0]["step"] if len(mine) == 1 and mine[0]["status"] == "applied" else None
        step = steps[0]
        same = step is not None and steps[1] == step
        before = after = float("nan")
        if same and step is not None:
            before = sum(mean_loss(records[r], step - LOSS_WINDOW, step) for r in (0, 1)) / 2
            after = sum(mean_loss(records[r], step, step + LOSS_WINDOW) for r in (0, 1)) / 2
            # The ranks' own optimizer records must show the new values from exactly that step: in
            # every group, except that a plain weight_decay keeps a group built without decay at 0.
            for rank in (0, 1):
                at = next(r for r in records[rank] if r["step"] == step)
                prev = next(r for r in records[rank] if r["step"] == step - 1)
                for key, value in (w.split("=", 1) for w in shown.split()):
                    want = {
                        group: 0.0 if key == "weight_decay" and before_value == 0.0 else float(value)
                        for group, before_value in prev[key].items()
                    }
                    if any(abs(at[key][g] - v) > 1e-12 for g, v in want.items()) or at[key] == prev[key]:
                        same = False
        ok = ok and same
        print(f"{shown:<38} {steps[0]!s:>11} {steps[1]!s:>11} {before:>12.4f} {after:>11.4f}")
    return ok


def main() -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="torchloom-demo-"))
    out = run_dir / "records"
    env = dict(os.environ)
    for name in ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID"):
        env.pop(name, None)
    env["TORCHLOOM_HOME"] = str(run_dir / "home")  # isolated: never touches ~/.torchloom
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path = run_dir / "job.log"
    cmd = ["--ui", "--job", "demo", "--nproc-per-node", "2", str(TRAIN), "--steps", str(STEPS)]
    cmd += ["--step-sleep", "0.02", "--out", str(out)]
    print(f"demo: torchloom run {' '.join(cmd)}\n      (output in {log_path})")
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "torchloom.app.cli", "run", *cmd], env=env, stdout=log, stderr=log
        )
        try:
            wait_for_step(60, env, job)
            print_ui_url(log_path)
            print("demo: the job is past step 60; steering it from another process:")
            accepted: list[tuple[str, dict[str, Any]]] = []
            first = submit(["lr=0.003"], env)
            if first["exit"] == 0:
                accepted.append(("lr=0.003", first))
            wait_for_step(
                max(a["step"] for a in first.get("applied", [])) + 50 if accepted else 150, env, job
            )
            second = submit(["lr=0.0005", "weight_decay=0.05"], env)
            if second["exit"] == 0:
                accepted.append(("lr=0.0005 weight_decay=0.05", second))
            invalid = submit(["lr=-1"], env)
            rejected_ok = invalid["exit"] == 2 and invalid.get("status") == "rejected"
            verdict = "rejected as expected" if rejected_ok else "NOT rejected"
            print(f"demo: lr=-1 was {verdict}: {invalid.get('reason')}")
            stop = torchloom("stop", "--job", "demo", "--json", env=env)
            stopped = json.loads(stop.stdout) if stop.returncode == 0 else {}
            where = ", ".join(f"rank {a['rank']} at step {a['step']}" for a in stopped.get("applied", []))
            print(f"demo: torchloom stop: {f'applied ({where})' if stopped else stop.stderr.strip()}")
            code = job.wait(timeout=DEADLINE_S)
        finally:
            if job.poll() is None:
                job.terminate()
                job.wait(timeout=60)
    print(f"demo: the job exited with status {code}")
    ok = code == 0 and rejected_ok and len(accepted) == 2 and check_and_report(out, accepted)
    if ok:
        print("\nOK: every rank applied every command at the same step")
        return 0
    print(f"\nFAILED: see {log_path} and {out}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
