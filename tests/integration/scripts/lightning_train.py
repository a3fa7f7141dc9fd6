"""Test job for the Lightning integration: a 2-layer Llama built from a config (no download) inside a
LightningModule, trained by `L.Trainer` (DDP on gloo, CPU) on synthetic token sequences, with a
per-step cosine schedule, steered through `TorchloomCallback` alone.

    torchloom run --nproc-per-node 2 tests/integration/scripts/lightning_train.py --out DIR --steps 400

Each rank appends one record per optimizer step to DIR/rank<R>.jsonl: the step's index (0-based),
the lr that step's optimizer update used, this rank's loss, the branch it ran on, and the Trainer's
accumulate_grad_batches and gradient_clip_val; DIR/rank<R>.applied.json gets the decided commands at
the end. --step-sleep slows each step.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch
from job_records import Records, parse_args
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from threadlet.integrations.lightning import TorchloomCallback

VOCAB, SEQ = 64, 16


class TinyLM(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, total_steps: int) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
        )
        self.model = LlamaForCausalLM(config)
        self.total_steps = total_steps
        self.lr_used: float | None = None
        self.last_loss: float | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss: torch.Tensor = self.model(input_ids=ids, labels=ids).loss
        self.last_loss = float(loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.lr_used = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps, eta_min=1e-5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recorder(pl.Callback):  # type: ignore[misc]
    """The script's own per-step record; listed before TorchloomCallback, so it shows the step as
    it ran, before the boundary's commands."""

    def __init__(self, records: Records, tl_cb: TorchloomCallback) -> None:
        self.records = records
        self.tl_cb = tl_cb
        self.last_step = 0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.last_step = trainer.global_step  # also after a rollback moved it back

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.last_step:
            return  # still accumulating
        tl = self.tl_cb.threadlet
        assert tl is not None
        rec = {
            "step": trainer.global_step - 1,
            "lr": module.lr_used,
            "loss": module.last_loss,
            "branch": tl.branch,
            "accum": trainer.accumulate_grad_batches,
            "clip": trainer.gradient_clip_val,
        }
        self.records.write(rec)


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randint(0, VOCAB, (4096, SEQ), generator=gen))
    val = TensorDataset(torch.randint(0, VOCAB, (32, SEQ), generator=gen))
    tl_cb = TorchloomCallback()
    records = Records(args.out, args.step_sleep)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=args.steps,
        gradient_clip_val=1.0,
        limit_val_batches=2,
        check_val_every_n_epoch=None,
        val_check_interval=10_000,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorder(records, tl_cb), tl_cb],
    )
    trainer.fit(
        TinyLM(args.steps),
        DataLoader(train, batch_size=4, shuffle=True),
        DataLoader(val, batch_size=8),
    )
    records.finish(tl_cb.threadlet)


if __name__ == "__main__":
    main()
