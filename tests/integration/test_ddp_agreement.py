"""Rounds riding DDP's gradient all-reduce on a real 3-rank torchrun job (scripts/ddp_agreement.py):
with the offer appended to the first bucket ("piggyback"), beside a user's own comm hook ("side")
and on the gloo fallback ("plain"), with and without gradient accumulation, every rank decides
every command once, in seq order, at the same tick, with the same verdict (applied exactly when no
rank refused it); the user's hook still reduces every bucket; gradients are those of DDP's
reference `allreduce_hook`."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "integration" / "scripts" / "ddp_agreement.py"
WORLD = 3


def run(out: Path, mode: str, accum: int, seed: int) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--standalone",
         str(SCRIPT), str(out), "--mode", mode, "--accum", str(accum), "--seed", str(seed)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("accum", [1, 3])
def test_rounds_ride_the_gradient_all_reduce(tmp_path: Path, accum: int) -> None:
    seed = random.randrange(2**31)
    print(f"ddp agreement seed={seed} accum={accum}")
    results = {mode: run(tmp_path / mode, mode, accum, seed) for mode in ("piggyback", "side", "plain")}
    for mode, ranks in results.items():
        assert {r["path"] for r in ranks} == {"gloo" if mode == "plain" else mode}
        refused_anywhere = set().union(*(set(r["refused"]) for r in ranks))
        decided = ranks[0]["decided"]
        assert [seq for _, seq, _ in decided] == list(range(1, 61)), (mode, seed)
        assert [applied for _, _, applied in decided] == [s not in refused_anywhere for s in range(1, 61)]
        assert all(r["decided"] == decided for r in ranks), (mode, seed)  # same tick, same verdict
        ticks = [tick for tick, _, _ in decided]
        assert ticks == sorted(ticks)
    for ranks in (results["piggyback"], results["side"]):
        assert ranks[0]["carried"] > 100  # nearly every optimizer step carried a round
    assert results["side"][0]["user_calls"] > 0
    assert results["piggyback"][0]["user_calls"] == 0
    # The offer rides beside the gradients without touching them: the same bits as DDP's reference
    # hook, and the built-in reduction up to rounding.
    assert results["piggyback"][0]["grads"] == results["side"][0]["grads"]
    for a, b in zip(results["piggyback"][0]["grads"], results["plain"][0]["grads"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    # Piggybacked rounds decide no later than gloo rounds (same filing ticks).
    last = {mode: ranks[0]["decided"][-1][0] for mode, ranks in results.items()}
    assert last["piggyback"] <= last["plain"], last
