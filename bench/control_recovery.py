"""Control-plane recovery benchmark: a 2-rank CPU job under `torchloom run` with the default embedded
control plane; the nats-server (SIGKILL) or the whole control-plane process (weaver, SIGKILL) is
killed, and a command submitted right after the kill, retried as the CLI does (`submit_until`, the
same command id throughout), is timed until it is applied on every rank. The ranks' step rate over
the fault (kill to applied) is compared with the same span before it (from their record files).

Goal (issue 10): under 3 s to control again, step rate unchanged within noise. Prints a table and
writes bench/results/control_recovery.json.

    .venv/bin/python bench/control_recovery.py --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from torchloom import discovery
from torchloom.client import submit_until
from torchloom.messages import Issuer, OutcomeStatus, SetConfig, SubmitRequest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_tiny.py"
RESULTS = REPO / "bench" / "results" / "control_recovery.json"
JOB = "ctlbench"
STEP_SLEEP_S = 0.02
SETTLE_S = 4.0  # between faults: the ranks' rate settles, and the "before" window is fault-free


def _steps(out: Path) -> int:
    """Steps rank 0 has recorded (one JSON line per optimizer step)."""
    try:
        return (out / "rank0.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _state(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "controlplane" / "state.json").read_text())
    return data


async def _wait(what: str, ok: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:g}s")
        await asyncio.sleep(0.05)


def _start_job(env: dict[str, str], out: Path, log: Any) -> subprocess.Popen[bytes]:
    """`torchloom run` of the example on 2 ranks, training until stopped, in its own session."""
    run = ["run", "--job", JOB, "--nproc-per-node", "2", str(EXAMPLE), "--steps", "1000000"]
    run += ["--step-sleep", str(STEP_SLEEP_S), "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", *run],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def _apply(lr: float) -> tuple[float, int]:
    """Submit `set lr` as the CLI does, and again (a user retrying) while no control plane is known
    at all, as in the second between a killed control plane and the one its launcher starts; return
    (seconds until applied on every rank, `torchloom set` invocations)."""
    t0 = time.monotonic()
    for tries in range(1, 600):
        applied = await _set(lr)
        if applied is not None:
            return time.monotonic() - t0, tries
        await asyncio.sleep(0.1)
    raise RuntimeError("no control plane came back within a minute")


async def _set(lr: float) -> bool | None:
    """One `torchloom set lr=...` as the CLI does it: True once applied; None when no weaver was
    known (exit 4: nothing submitted)."""
    result = await submit_until(
        SubmitRequest(
            body=SetConfig(values={"lr": lr}),
            job=JOB,
            issuer=Issuer(kind="bench", identity="control_recovery"),
            timeout_s=30.0,
            command_id=uuid.uuid4().hex,
        ),
        lambda: discovery.resolve_grpc(None),
        deadline_s=60.0,
    )
    if result.outcome is None and not result.reached:
        return None
    if result.outcome is not None and "none reported yet" in result.outcome.reason:
        # A restarted weaver that has the job from its journal but no heartbeat yet validates
        # against no knobs: control is not back until a command applies (reported as a weaver gap).
        return None
    if result.outcome is None or result.outcome.status is not OutcomeStatus.APPLIED:
        raise RuntimeError(f"command not applied: {result}")
    return True


async def _fault(kind: str, home: Path, out: Path, lr: float) -> dict[str, Any]:
    """Kill `kind` ("nats" or "weaver"), time the next command, and measure the step rate."""
    before_steps, before_t = _steps(out), time.monotonic()
    await asyncio.sleep(SETTLE_S)
    if kind == "nats":
        pid = int(_state(home)["nats_pid"])
    else:
        info = discovery.read()
        assert info is not None, "no control plane"
        pid = info.pid
    k_steps, k_t = _steps(out), time.monotonic()
    killed_at = time.time()  # wall clock, to line up with the control plane's log (--keep)
    os.kill(pid, signal.SIGKILL)
    recovery_s, attempts = await _apply(lr)
    d_steps, d_t = _steps(out), time.monotonic()
    rate_before = (k_steps - before_steps) / (k_t - before_t)
    rate_during = (d_steps - k_steps) / (d_t - k_t)
    return {
        "fault": kind,
        "killed_at": round(killed_at, 3),
        "recovery_s": round(recovery_s, 3),
        "cli_invocations": attempts,
        "steps_per_s_before": round(rate_before, 2),
        "steps_per_s_during": round(rate_during, 2),
        "rate_ratio": round(rate_during / rate_before, 3) if rate_before else None,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rec = [r["recovery_s"] for r in rows]
    ratio = [r["rate_ratio"] for r in rows if r["rate_ratio"] is not None]
    return {
        "n": len(rows),
        "recovery_median_s": round(statistics.median(rec), 3),
        "recovery_max_s": round(max(rec), 3),
        "rate_ratio_median": round(statistics.median(ratio), 3) if ratio else None,
        "rate_ratio_min": round(min(ratio), 3) if ratio else None,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="faults of each kind (default 3)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy the control plane's and the job's logs here"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="torchloom-ctlbench-") as tmp:
        home, out = Path(tmp) / "home", Path(tmp) / "out"
        env = dict(os.environ, TORCHLOOM_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for name in ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID"):
            env.pop(name, None)
        os.environ["TORCHLOOM_HOME"] = str(home)  # discovery.resolve_grpc reads this process's env
        os.environ.pop("TORCHLOOM_GRPC", None)
        log = (Path(tmp) / "run.log").open("wb")
        proc = _start_job(env, out, log)
        rows: list[dict[str, Any]] = []
        try:
            await _wait("the job training", lambda: _steps(out) >= 20)
            await _apply(0.001)  # warm: the job is known to the weaver
            lr = 0.001
            for rep in range(args.reps):
                for kind in ("nats", "weaver"):
                    lr += 0.0001
                    row = await _fault(kind, home, out, lr)
                    row["rep"] = rep
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            info = discovery.read()
            if info is not None:
                os.kill(info.pid, signal.SIGTERM)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for src in (Path(tmp) / "run.log", home / "controlplane" / "controlplane.log"):
                    if src.exists():
                        shutil.copy(src, args.keep / src.name)
    summary = {kind: _summary([r for r in rows if r["fault"] == kind]) for kind in ("nats", "weaver")}
    print(f"\n{'fault':<8} {'n':>3} {'median s':>9} {'max s':>7} {'rate ratio (median/min)':>24}")
    for kind, s in summary.items():
        ratio = f"{s['rate_ratio_median']}/{s['rate_ratio_min']}"
        print(f"{kind:<8} {s['n']:>3} {s['recovery_median_s']:>9} {s['recovery_max_s']:>7} {ratio:>24}")
    RESULTS.write_text(
        json.dumps(
            {
                "what": "kill -> next command applied on both ranks (CLI-style retries), 2 CPU ranks",
                "step_sleep_s": STEP_SLEEP_S,
                "cpus": os.cpu_count(),
                "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine
                "summary": summary,
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
