"""Test job for the HF Trainer integration: a 2-layer GPT-2 built from a config (no download), trained
by `transformers.Trainer` on synthetic token sequences, steered through `TorchloomCallback` alone.

    torchloom run --nproc-per-node 2 tests/integration/scripts/hf_trainer.py --out DIR --steps 400

Each rank appends one record per optimizer step to DIR/rank<R>.jsonl: the step's index (0-based),
the lr that step's optimizer update used (read just before it), this rank's loss of the step, the
branch it ran on and args.max_grad_norm; DIR/rank<R>.applied.json gets the decided commands at the
end. A linear-decay schedule (a LambdaLR) runs under the lr knob. --step-sleep slows each step.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from job_records import Records, parse_args
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from threadlet.integrations.transformers import TorchloomCallback

VOCAB, SEQ = 64, 16


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences (the same on every rank); the model learns their statistics."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):  # type: ignore[misc]
    """Writes the script's own per-step record (placed before TorchloomCallback, so a record shows
    the step as it ran, before the boundary's commands)."""

    def __init__(self, records: Records, tl_cb: TorchloomCallback) -> None:
        self.records = records
        self.tl_cb = tl_cb
        self.trainer: Any = None
        self.lr: float | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.lr = float(kw["optimizer"].param_groups[0]["lr"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        tl = self.tl_cb.threadlet
        assert tl is not None
        rec = {
            "step": state.global_step - 1,
            "lr": self.lr,
            "loss": float(self.trainer._tr_loss),  # since the last log: this step's (logging_steps=1)
            "branch": tl.branch,
            "max_grad_norm": args.max_grad_norm,
        }
        self.records.write(rec)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    targs = TrainingArguments(
        output_dir=str(args.out / "hf"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    tl_cb = TorchloomCallback()
    records = Records(args.out, args.step_sleep)
    recorder = Recorder(records, tl_cb)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Tokens(4096, seed=1),
        eval_dataset=Tokens(32, seed=2),
        callbacks=[recorder, tl_cb],
    )
    recorder.trainer = trainer
    trainer.train()
    records.finish(tl_cb.threadlet)


if __name__ == "__main__":
    main()
