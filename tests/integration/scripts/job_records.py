"""Shared by the framework test jobs (hf_trainer.py, lightning_train.py): their command line, the
per-step record file each rank appends to, and the end of a job (its decided commands written to
OUT/rank<R>.applied.json and the agreement path it used to OUT/rank<R>.agreement_path, then
`threadlet.finish`). Imported as a sibling module: torchrun puts the
script's folder first on sys.path."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, NoReturn

import threadlet
from threadlet.agent import Threadlet


def parse_args() -> argparse.Namespace:
    """--steps, --out (created) and --step-sleep (seconds slept after each optimizer step)."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


class Records:
    """OUT/rank<R>.jsonl of this rank: one JSON line per optimizer step, flushed at once."""

    def __init__(self, out: Path, step_sleep: float) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.out = out
        self.step_sleep = step_sleep
        self._file = (out / f"rank{self.rank}.jsonl").open("a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        """Sleep --step-sleep (the step's pace), then append `rec` with the wall-clock time."""
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self._file.write(json.dumps({**rec, "t": time.time()}) + "\n")
        self._file.flush()

    def finish(self, tl: Threadlet | None) -> NoReturn:
        """Close the file, write the decided commands and end the process (status 0)."""
        self._file.close()
        assert tl is not None, "the callback never attached: did training start?"
        applied = [d.to_json() for d in tl.applied]
        (self.out / f"rank{self.rank}.applied.json").write_text(json.dumps(applied))
        (self.out / f"rank{self.rank}.agreement_path").write_text(tl.agreement_path)
        threadlet.finish(tl)
