"""The Hugging Face Trainer under torchloom in one line: `Trainer(..., callbacks=[TorchloomCallback()])`.

The callback attaches a threadlet to the Trainer's model, optimizer and lr scheduler when training
begins and marks a step boundary after every optimizer step (`on_step_end`), so every torchloom
command applies there, at the same step on every rank:

- every optimizer knob (lr, weight_decay, betas, eps; lr=X with the Trainer's own scheduler);
- `grad_clip_norm` is `args.max_grad_norm`, which the Trainer reads at every optimizer step (live);
- `grad_accum_steps` is reported with the Trainer's value but cannot change live: the Trainer fixes
  `gradient_accumulation_steps` for an epoch (it counts the epoch's update steps and aligns its DDP
  gradient syncs on it), so a change could not apply at the agreed step; every rank refuses
  `set grad_accum_steps` saying so (`GRAD_ACCUM_FIXED`). Set
  `TrainingArguments(gradient_accumulation_steps=N)` instead;
- pause blocks at the step boundary; stop ends training through `control.should_training_stop` (the
  Trainer finishes normally: `train()` returns);
- checkpoint and rollback use the threadlet's DCP checkpoints (model, optimizer, scheduler, RNG; see
  docs/design.md "Actions"), not the Trainer's `checkpoint-N` folders, so every rank saves and loads
  its part at the same step; a rollback loads in place and moves `state.global_step` back, while the
  Trainer's data loader goes on from where it is (the data position is not restored);
- eval runs `trainer.evaluate()` (its eval_dataset) on every rank at the same step;
- the Trainer's logged values (loss, grad_norm, learning_rate, epoch, eval metrics) go onto the bus
  with the next step's metrics, and each decided command is written through `trainer.log` to the
  Trainer's loggers (`torchloom/...` rows, see `common.CommandLog`), so their charts show it.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any, Unpack

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from threadlet.agent import Threadlet
from threadlet.integrations.common import (
    AttachArgs,
    AttachOptions,
    Steering,
    eval_metrics,
    numeric_metrics,
    scalar,
)

__all__ = ["GRAD_ACCUM_FIXED", "TorchloomCallback"]

log = logging.getLogger("threadlet")

# Why every rank refuses `set grad_accum_steps` under the Trainer.
GRAD_ACCUM_FIXED = (
    "grad_accum_steps cannot change live under the HF Trainer: it fixes gradient_accumulation_steps "
    "for an epoch (it counts the epoch's update steps and aligns its DDP gradient syncs on it), so a "
    "change could not apply at the agreed step; set TrainingArguments(gradient_accumulation_steps=N) "
    "and start the run again"
)


class TorchloomCallback(TrainerCallback):
    """Steer a `transformers.Trainer` with torchloom (see the module docstring for what each
    command does). Run the script under `torchloom run`; without a bus the threadlet runs in local
    mode and the callback only counts steps.

    Args:
        **options: those of `threadlet.attach` (job, nats_url, run_id, config, checkpoint_dir;
            unset: from the TORCHLOOM_* environment).
    """

    def __init__(self, **options: Unpack[AttachArgs]) -> None:
        self._steering = Steering(AttachOptions(**options))
        self._trainer: Any = None

    @property
    def threadlet(self) -> Threadlet | None:
        """The attached threadlet: None before training begins, kept after it ends so a script can
        read `applied` and pass it to `threadlet.finish`."""
        return self._steering.threadlet

    # ---- Trainer hooks ----------------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._trainer = _calling_trainer()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.threadlet is not None:  # a second train() call: steer it with the same threadlet
            return
        if self._trainer is None:  # added with trainer.add_callback after __init__
            self._trainer = _calling_trainer()
        if self._trainer is None:
            raise RuntimeError(
                "TorchloomCallback: no transformers.Trainer is calling it; "
                "pass it as Trainer(..., callbacks=[TorchloomCallback()])"
            )
        tl, state.global_step = self._steering.start(
            model=kwargs.get("model"),
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            framework_step=state.global_step,
            eval_fn=self._evaluate,
        )
        tl.training.enable(grad_clip_norm=max(float(args.max_grad_norm or 0.0), 0.0))
        accum = min(max(int(args.gradient_accumulation_steps), 1), 1024)  # reported within its bounds
        tl.training.fix(grad_accum_steps=accum, reason=GRAD_ACCUM_FIXED)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tl = self.threadlet
        if tl is None:
            return
        done = self._steering.boundary(tl)
        if done.rolled_back_to is not None:
            state.global_step = done.rolled_back_to
            # The Trainer averages the loss since its last log over global_step - this.
            self._trainer._globalstep_last_logged = state.global_step
        args.max_grad_norm = tl.training.grad_clip_norm
        if done.stop:
            control.should_training_stop = True
        if done.log_row:
            self._trainer.log(done.log_row)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        steering = self._steering
        loss = scalar(logs.get("loss"))
        if loss is not None:
            steering.loss = loss
        # Logged values are already Python numbers (the Trainer synced them); merge, so eval
        # metrics and training metrics both stay current.
        steering.metrics = {**steering.metrics, **numeric_metrics(logs)}

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._steering.close()

    # ---- actions ----------------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        trainer = self._trainer
        if getattr(trainer, "eval_dataset", None) is None:
            raise ValueError("eval rejected: the Trainer has no eval_dataset (pass eval_dataset= to Trainer)")
        return eval_metrics(trainer.evaluate)


def _calling_trainer() -> Trainer | None:
    """The Trainer whose method is calling the hook that calls this, found on the call stack (the
    Trainer calls on_init_end from `__init__` and on_train_begin from its training loop; a wrapper
    callback in between does not hide it), or None."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None
