"""Under the HF Trainer, `grad_accum_steps` is reported with the Trainer's value and every rank
refuses a live change of it, naming why (threadlet.integrations.transformers.GRAD_ACCUM_FIXED), on a
real Trainer in one process (local mode: no bus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from threadlet.integrations.transformers import GRAD_ACCUM_FIXED, TorchloomCallback
from torchloom.errors import CommandRejected


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_set_grad_accum_steps_is_refused_saying_why(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=4, use_cpu=True, report_to=[], max_steps=10
    )
    callback = TorchloomCallback(checkpoint_dir=str(tmp_path / "ckpt"))
    trainer = Trainer(model=_Tiny(), args=args, callbacks=[callback])
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    callback.on_train_begin(
        args,
        trainer.state,
        trainer.control,
        model=trainer.model,
        optimizer=trainer.optimizer,
        lr_scheduler=trainer.lr_scheduler,
    )
    tl = callback.threadlet
    assert tl is not None
    try:
        board = tl._board
        assert {s.name: s.value for s in board.specs()}["grad_accum_steps"] == 4
        with pytest.raises(CommandRejected) as info:
            board.validate({"grad_accum_steps": "8"})
        assert info.value.reason == GRAD_ACCUM_FIXED and info.value.key == "grad_accum_steps"
        assert GRAD_ACCUM_FIXED.startswith("grad_accum_steps cannot change live under the HF Trainer: ")
        board.validate({"lr": "0.01", "grad_clip_norm": "0.5"})  # the live knobs stay settable
    finally:
        callback.on_train_end(args, trainer.state, trainer.control)
