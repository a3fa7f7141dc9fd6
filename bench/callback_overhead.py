"""Per-step overhead of the framework callbacks (`threadlet.integrations`), each on its tiny model,
against the same Trainer without it, in one run: alternating blocks of K optimizer steps with the
callback's per-step work (step boundary, logged metrics, command rows) and K steps without it, so
that drift in machine load hits both arms alike. Run it under the launcher, so a real nats-server and
weaver are on the bus; rank 0 prints a table and writes JSON:

    torchloom run --job bench --nproc-per-node 2 bench/callback_overhead.py --framework hf
    torchloom run --job bench --nproc-per-node 2 bench/callback_overhead.py --framework lightning

The callback is attached for the whole run (it must see training begin); in the blocks without it a
gate skips its per-step hooks, so that arm costs one no-op Python call per hook. Step time is the
wall-clock time between consecutive step ends (data, forward, backward, optimizer, logging,
callbacks); the first step of each block is left out (the switch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import threadlet

# The tiny models and data of the integration tests' jobs (their scripts import as modules from there).
SCRIPTS = Path(__file__).resolve().parent.parent / "tests" / "integration" / "scripts"
sys.path.insert(0, str(SCRIPTS))
VOCAB, SEQ = 64, 16


class Blocks:
    """Which arm the current step belongs to, and each arm's step times per block."""

    def __init__(self, block_steps: int, pairs: int, warmup: int) -> None:
        self.block_steps, self.pairs, self.warmup = block_steps, pairs, warmup
        self.steps = 0
        self.last_t: float | None = None
        self.times: dict[bool, list[list[float]]] = {True: [], False: []}
        self.in_call: list[float] = []  # seconds inside the callback's per-step hooks

    def timed(self, hook: Any, *a: Any, **kw: Any) -> None:
        """Run a callback hook, timing it when it counts."""
        t0 = time.perf_counter()
        hook(*a, **kw)
        if self.steps >= self.warmup:
            self.in_call.append(time.perf_counter() - t0)

    @property
    def total(self) -> int:
        return self.warmup + 2 * self.pairs * self.block_steps

    @property
    def on(self) -> bool:
        """The callback's per-step hooks run in this step (even blocks: on, odd: off)."""
        if self.steps < self.warmup:
            return True
        return (self.steps - self.warmup) // self.block_steps % 2 == 0

    def step_end(self) -> None:
        now = time.perf_counter()
        arm = self.on
        pos = (self.steps - self.warmup) % self.block_steps
        if self.steps >= self.warmup and self.last_t is not None:
            if pos == 0:
                self.times[arm].append([])
            else:  # the first step of a block includes the switch
                self.times[arm][-1].append(now - self.last_t)
        self.last_t = now
        self.steps += 1

    def report(self, framework: str, tl: Any) -> dict[str, Any]:
        on = [t for block in self.times[True] for t in block]
        off = [t for block in self.times[False] for t in block]
        pairs = [
            statistics.median(a) / statistics.median(b)
            for a, b in zip(self.times[True], self.times[False], strict=False)
            if a and b
        ]
        return {
            "framework": framework,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "pairs": len(pairs),
            "block_steps": self.block_steps,
            "median_step_with_ms": statistics.median(on) * 1e3,
            "median_step_without_ms": statistics.median(off) * 1e3,
            "pooled_median_overhead": statistics.median(on) / statistics.median(off) - 1,
            "median_pair_overhead": statistics.median(pairs) - 1,
            "pair_ratio_quartiles": statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs,
            "callback_in_call_us_median": statistics.median(self.in_call) * 1e6 if self.in_call else 0.0,
            "callback_in_call_us_mean": statistics.fmean(self.in_call) * 1e6 if self.in_call else 0.0,
            "agreement_rounds": tl.rounds if tl is not None else 0,
            "bus": tl is not None and not tl.config.local,
        }


def run_hf(blocks: Blocks, out: Path) -> dict[str, Any]:
    from hf_trainer import Tokens
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from threadlet.integrations.transformers import TorchloomCallback

    class Gate(TrainerCallback):  # type: ignore[misc]
        """TorchloomCallback, with its per-step hooks skipped in the blocks without it."""

        def __init__(self, inner: TorchloomCallback) -> None:
            self.inner = inner

        def on_init_end(self, *a: Any, **kw: Any) -> None:
            self.inner.on_init_end(*a, **kw)

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            self.inner.on_train_begin(*a, **kw)

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            if blocks.on:
                blocks.timed(self.inner.on_step_end, *a, **kw)

        def on_log(self, *a: Any, **kw: Any) -> None:
            if blocks.on:
                blocks.timed(self.inner.on_log, *a, **kw)

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            self.inner.on_train_end(*a, **kw)

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            blocks.step_end()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=blocks.total,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,  # the callback's on_log runs every step: its worst case
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    tl_cb = TorchloomCallback()
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(8192, seed=1), callbacks=[Gate(tl_cb), Clock()]
    )
    trainer.train()
    return blocks.report("hf", tl_cb.threadlet)


def run_lightning(blocks: Blocks, out: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning_train import TinyLM
    from torch.utils.data import DataLoader, TensorDataset

    from threadlet.integrations.lightning import TorchloomCallback

    class Gate(pl.Callback):  # type: ignore[misc]
        def __init__(self, inner: TorchloomCallback) -> None:
            self.inner = inner

        def on_train_start(self, *a: Any) -> None:
            self.inner.on_train_start(*a)

        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            if blocks.on:
                blocks.timed(self.inner.on_train_batch_end, trainer, *a)

        def on_train_end(self, *a: Any) -> None:
            self.inner.on_train_end(*a)

    class Clock(pl.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, *a: Any) -> None:
            blocks.step_end()

    pl.seed_everything(0, verbose=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = TensorDataset(torch.randint(0, VOCAB, (8192, SEQ), generator=torch.Generator().manual_seed(1)))
    tl_cb = TorchloomCallback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=blocks.total,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Gate(tl_cb), Clock()],
    )
    trainer.fit(TinyLM(blocks.total), DataLoader(data, batch_size=4, shuffle=True))
    return blocks.report("lightning", tl_cb.threadlet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--framework", choices=("hf", "lightning"), required=True)
    parser.add_argument("--pairs", type=int, default=20, help="pairs of (with, without) blocks")
    parser.add_argument("--block-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/callback_overhead_<fw>.json)"
    )
    args = parser.parse_args()
    out = Path(args.out or f"bench/results/callback_overhead_{args.framework}.json")
    work = Path(tempfile.mkdtemp(prefix="callback_overhead_"))  # the Trainer's output_dir (unused)
    blocks = Blocks(args.block_steps, args.pairs, args.warmup)
    result = (run_hf if args.framework == "hf" else run_lightning)(blocks, work)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        heads = ("step without", "step with", "pooled", "pair median", "in hooks")
        print(f"{'framework':<10} " + " ".join(f"{h:>12}" for h in heads))
        print(
            f"{result['framework']:<10} {result['median_step_without_ms']:>9.2f} ms"
            f" {result['median_step_with_ms']:>9.2f} ms {result['pooled_median_overhead']:>+12.2%}"
            f" {result['median_pair_overhead']:>+12.2%} {result['callback_in_call_us_mean']:>9.0f} us"
        )
    threadlet.finish()


if __name__ == "__main__":
    main()
