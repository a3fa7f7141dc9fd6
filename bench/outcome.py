"""Outcome benchmark (issue 13): does the default autopilot policy rescue a run with a bad lr?

A character-level language model (bench/scripts/charlm_train.py: an MLP over 16 characters, Adam) on
bench/data/text.txt (generated pseudo-English, ~19 KB), a fixed budget of STEPS steps, 5 seeds, four
arms, each run a real `torchloom run --nproc-per-node 1` under a private TORCHLOOM_HOME:

* good: a static lr of 3e-3;
* bad: 30x that (9e-2), untouched;
* bad+rules: the same bad lr under `--policy default`;
* good+rules: the good lr under `--policy default` (the rules must not harm a healthy run).

Reports the final validation loss per arm (mean, min, max, stdev), the steps each rule arm redid
after rollbacks (loop iterations beyond STEPS), the rules that fired and the steps its lr changed
at, and whether each rule run replays bit-exactly from its journal (`torchloom replay --run ID`: the
same loss at every iteration and the same final validation loss). Prints a table and writes
bench/results/outcome.json.

    .venv/bin/python bench/outcome.py [--seeds 5] [--steps 600] [--arms good,bad,bad+rules,good+rules]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "scripts" / "charlm_train.py"
RESULTS = REPO / "bench" / "results" / "outcome.json"
GOOD_LR = 3e-3
BAD_FACTOR = 30
ARMS = {
    "good": (GOOD_LR, False),
    "bad": (GOOD_LR * BAD_FACTOR, False),
    "bad+rules": (GOOD_LR * BAD_FACTOR, True),
    "good+rules": (GOOD_LR, True),
}
BINDING_VARS = ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BINDING_VARS}
    env.update(OMP_NUM_THREADS="1", TORCHLOOM_HOME=str(home))
    return env


def _cli(args: list[str], env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchloom.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]


def one_run(arm: str, seed: int, steps: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    lr, rules = ARMS[arm]
    out = work / f"{arm}-{seed}"
    job = f"outcome-{arm.replace('+', '-')}-{seed}"
    args = ["run", "--job", job, "--nproc-per-node", "1", *(["--policy", "default"] if rules else [])]
    script = [str(SCRIPT), "--lr", repr(lr), "--seed", str(seed), "--steps", str(steps)]
    t0 = time.monotonic()
    proc = _cli([*args, *script, "--out", str(out)], env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    found = re.search(rf"job {re.escape(job)} run (\w+)", proc.stderr)
    result = json.loads((out / "result.json").read_text())
    row: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "val_loss": result["val_loss"],
        "iterations": result["iterations"],
        "steps_lost": result["iterations"] - steps,
        "wall_s": round(wall, 1),
        "run_id": found.group(1) if found else "",
    }
    if rules and found:
        journal = _cli(["journal", "--run", found.group(1), "--json"], env)
        entries = json.loads(journal.stdout)["entries"] if journal.returncode == 0 else []
        events = [e for e in entries if e["type"] == "event"]
        fired = [e["attrs"].get("rule", "") for e in events if e["kind"] == "rule_fired"]
        row["rules_fired"] = {name: fired.count(name) for name in sorted(set(fired))}
        row["rules_refused"] = sorted(
            {e["attrs"].get("rule", "") for e in events if e["kind"] == "rule_refused"}
        )
        records = _records(out)
        row["final_lr"] = records[-1]["lr"]
        # Where the lr changed: (step, branch, new lr), from the run's own records.
        row["lr_changes"] = [
            [r["step"], r["branch"], r["lr"]]
            for prev, r in itertools.pairwise(records)
            if r["lr"] != prev["lr"]
        ]
        row["replay"] = replay(found.group(1), lr, seed, steps, work, env, out)
    return row


def replay(
    run_id: str, lr: float, seed: int, steps: int, work: Path, env: dict[str, str], original: Path
) -> dict[str, Any]:
    """Replay the run from its journal and compare every iteration's loss and the final loss, bitwise."""
    out = work / f"replay-{run_id}"
    script = [str(SCRIPT), "--lr", repr(lr), "--seed", str(seed), "--steps", str(steps), "--out", str(out)]
    proc = _cli(["replay", "--run", run_id, "--nproc-per-node", "1", "--", *script], env)
    if proc.returncode != 0:
        return {"ok": False, "why": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    a, b = _records(original), _records(out)
    same_steps = [(r["step"], r["branch"], r["lr"], r["loss"]) for r in a] == [
        (r["step"], r["branch"], r["lr"], r["loss"]) for r in b
    ]
    same_final = json.loads((original / "result.json").read_text()) == json.loads(
        (out / "result.json").read_text()
    )
    return {"ok": same_steps and same_final, "iterations_equal": same_steps, "final_equal": same_final}


def summary(rows: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    losses = [r["val_loss"] for r in rows if r["arm"] == arm]
    finite = [x for x in losses if x is not None]
    return {
        "runs": len(losses),
        "diverged": len(losses) - len(finite),
        "mean": statistics.fmean(finite) if finite else None,
        "min": min(finite, default=None),
        "max": max(finite, default=None),
        "stdev": statistics.stdev(finite) if len(finite) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--arms", default=",".join(ARMS), help="a comma-separated subset of the arms")
    args = parser.parse_args()
    chosen = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(chosen) - ARMS.keys())
    if unknown:
        parser.error(
            f"--arms {args.arms!r}: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}"
        )
    work = Path(tempfile.mkdtemp(prefix="tl-outcome-"))
    env = _env(work / "home")
    rows = []
    for seed in range(args.seeds):
        for arm in chosen:
            row = one_run(arm, seed, args.steps, work, env)
            print(json.dumps(row), flush=True)
            rows.append(row)
    arms = {arm: summary(rows, arm) for arm in chosen}
    good = arms["good"]["mean"] if "good" in arms else None

    def within(arm: str) -> bool | None:
        mean = arms[arm]["mean"] if arm in arms else None
        return None if mean is None or good is None else mean <= good * 1.05

    rule_rows = [r for r in rows if ARMS[r["arm"]][1]]
    verdict = {
        "rule_arm_within_5pct_of_good": within("bad+rules"),
        "bad_arm_within_5pct_of_good": within("bad"),
        "good_rule_arm_within_5pct_of_good": within("good+rules"),
        "rule_runs_replay_bit_exactly": all(r["replay"]["ok"] for r in rule_rows),
        "rule_arm_steps_lost": [r["steps_lost"] for r in rule_rows if r["arm"] == "bad+rules"],
        "good_rule_arm_steps_lost": [r["steps_lost"] for r in rule_rows if r["arm"] == "good+rules"],
    }
    print(f"{'arm':<11}{'lr':>9}{'val loss mean':>15}{'min':>9}{'max':>9}{'stdev':>9}")
    for arm, s in arms.items():
        cells = "".join(f"{s[k]:>9.4f}" if s[k] is not None else f"{'-':>9}" for k in ("min", "max", "stdev"))
        mean = f"{s['mean']:.4f}" if s["mean"] is not None else "-"
        print(f"{arm:<11}{ARMS[arm][0]:>9g}{mean:>15}{cells}")
    print(json.dumps(verdict))
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "seeds": args.seeds, "arms": arms, "verdict": verdict, "runs": rows},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
