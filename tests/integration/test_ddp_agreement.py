"""Rounds riding DDP's gradient all-reduce on a real 3-rank torchrun job (scripts/ddp_agreement.py):
with the offer appended to the first bucket ("piggyback"), beside a user's own comm hook ("side")
and on the gloo fallback ("plain"), with and without gradient accumulation, every rank decides
every command once, in seq order, at the same tick, with the same verdict (applied exactly when no
rank refused it); the user's hook still reduces every bucket; gradients are those of DDP's
reference `allreduce_hook`. The same job on NCCL (the model on each rank's GPU) runs where there are
two GPUs, and is skipped elsewhere."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "integration" / "scripts" / "ddp_agreement.py"
WORLD = 3
MODES = ("piggyback", "side", "plain")
ACCUMS = (1, 3)

# The seed, and the ranks' records of each `(mode, accum)`.
Runs = tuple[int, dict[tuple[str, int], list[dict[str, Any]]]]


def _launch(out: Any, world: int, device: str) -> Runs:
    """Every mode at every accumulation, in one torchrun launch of `world` ranks on `device` (each run
    on a fresh DDP model, group and agreement; the tests only read the records)."""
    seed = random.randrange(2**31)
    print(f"ddp agreement seed={seed} device={device}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--standalone",
         str(SCRIPT), str(out), "--mode", *MODES, "--accum", *map(str, ACCUMS), "--seed", str(seed),
         "--device", device],
        env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, f"seed={seed}: {proc.stderr[-3000:]}"
    return seed, {
        (mode, accum): [
            json.loads((out / f"{mode}-a{accum}" / f"rank{r}.json").read_text()) for r in range(world)
        ]
        for mode in MODES
        for accum in ACCUMS
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return _launch(tmp_path_factory.mktemp("ddp_agreement"), WORLD, "cpu")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("accum", ACCUMS)
def test_rounds_ride_the_gradient_all_reduce(runs: Runs, accum: int) -> None:
    check_runs(runs, accum)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_rounds_ride_nccls_gradient_all_reduce(tmp_path: Any) -> None:
    """The offer rides a bucket on the GPU and is read back without stalling the stream (pinned host
    copies behind a CUDA event, `PiggybackTransport._split_cuda`), over NCCL, 2 ranks on 2 GPUs."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
        pytest.skip("needs 2 CUDA GPUs and NCCL")
    runs = _launch(tmp_path, 2, "cuda")
    for accum in ACCUMS:
        check_runs(runs, accum)


def check_runs(runs: Runs, accum: int) -> None:
    seed, records = runs
    results = {mode: records[mode, accum] for mode in MODES}
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
