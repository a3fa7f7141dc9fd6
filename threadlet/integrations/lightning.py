"""Lightning under torchloom in one line: `L.Trainer(..., callbacks=[TorchloomCallback()])`.

The callback attaches a threadlet to the LightningModule, the Trainer's (first) optimizer and its lr
scheduler when training starts, and marks a step boundary after every optimizer step (the first
`on_train_batch_end` at which `trainer.global_step` moved), so every command applies there, at the
same step on every rank:

- every optimizer knob (lr=X with the configured scheduler, stepped per step or per epoch);
- `grad_clip_norm` is `trainer.gradient_clip_val` (norm clipping; not offered when the Trainer clips
  by value) and `grad_accum_steps` is `trainer.accumulate_grad_batches`; Lightning reads both at
  every batch, so both are live. After an accumulation change, the first optimizer step may sum
  fewer micro-batches (Lightning steps when the epoch's batch count is a multiple of the new value);
  the next ones have exactly the new count;
- pause blocks at the step boundary; stop sets `trainer.should_stop` (fit returns normally);
- checkpoint and rollback use the threadlet's DCP checkpoints (module, optimizer, scheduler, RNG),
  not Lightning's `.ckpt` files; a rollback loads in place and moves `trainer.global_step` back (so
  `max_steps` counts from there), while the data loader goes on (the data position is not restored);
- eval runs the Trainer's validation loop (`validation_step` over the val dataloaders) on every rank
  at the same step and reports what it logged;
- the module's logged values (`trainer.callback_metrics`) and the step's loss go onto the bus, and
  each decided command is written to every logger of the Trainer (`torchloom/...` rows, see
  `common.CommandLog`) at the current global step.
"""

from __future__ import annotations

import logging
from typing import Any, Unpack

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from threadlet.agent import Threadlet
from threadlet.integrations.common import (
    AttachArgs,
    AttachOptions,
    Steering,
    Throttle,
    eval_metrics,
    numeric_metrics,
    scalar,
)

__all__ = ["TorchloomCallback"]

log = logging.getLogger("threadlet")

# How often the module's logged values (`trainer.callback_metrics`, rebuilt from Lightning's results on
# every read: a few hundred microseconds) are refreshed for the bus; the loss follows every report.
LOGGED_REFRESH_S = 1.0


class TorchloomCallback(pl.Callback):
    """Steer a Lightning `Trainer.fit` with torchloom (see the module docstring for what each command
    does). Run the script under `torchloom run`; without a bus the threadlet runs in local mode and
    the callback only counts steps.

    Args:
        **options: those of `threadlet.attach` (job, nats_url, run_id, config, checkpoint_dir;
            unset: from the TORCHLOOM_* environment).
    """

    def __init__(self, **options: Unpack[AttachArgs]) -> None:
        self._steering = Steering(AttachOptions(**options))
        self._trainer: Any = None
        self._throttle = Throttle(0.0)
        self._logged_throttle = Throttle(LOGGED_REFRESH_S)
        self._last_global_step = 0
        self._clip = False  # grad_clip_norm is steerable (the Trainer clips by norm)

    @property
    def threadlet(self) -> Threadlet | None:
        """The attached threadlet: None before training starts, kept after it ends so a script can
        read `applied` and pass it to `threadlet.finish`."""
        return self._steering.threadlet

    # ---- Lightning hooks --------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.threadlet is not None:  # a second fit(): steer it with the same threadlet
            return
        self._trainer = trainer
        optimizers = trainer.optimizers
        configs = trainer.lr_scheduler_configs
        if len(optimizers) > 1:
            log.warning("threadlet: %d optimizers; the knobs steer the first only", len(optimizers))
        tl, step = self._steering.start(
            model=pl_module,
            optimizer=optimizers[0] if optimizers else None,
            scheduler=configs[0].scheduler if configs else None,
            framework_step=trainer.global_step,
            eval_fn=self._evaluate,
        )
        if step != trainer.global_step:  # an elastic restart resumed from a torchloom checkpoint
            _set_global_step(trainer, step)
        algorithm = trainer.gradient_clip_algorithm
        self._clip = algorithm is None or str(getattr(algorithm, "value", algorithm)) == "norm"
        if self._clip:
            tl.training.enable(grad_clip_norm=float(trainer.gradient_clip_val or 0.0))
        tl.training.enable(grad_accum_steps=int(trainer.accumulate_grad_batches))
        self._throttle = Throttle(tl.config.metrics_interval_s)
        self._last_global_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tl = self.threadlet
        if tl is None or trainer.global_step == self._last_global_step:
            return  # still accumulating: no optimizer step yet
        steering = self._steering
        if self._throttle.due():  # .item() syncs a device: refresh on the metrics clock only
            loss = scalar(outputs.get("loss") if isinstance(outputs, dict) else outputs)
            steering.loss = loss if loss is not None else steering.loss
        if self._logged_throttle.due():  # Lightning assembles callback_metrics on each read
            steering.metrics = numeric_metrics(trainer.callback_metrics)
        done = steering.boundary(tl)
        if done.rolled_back_to is not None:
            _set_global_step(trainer, done.rolled_back_to)
        self._last_global_step = trainer.global_step
        if self._clip:
            clip = tl.training.grad_clip_norm
            trainer.gradient_clip_val = clip if clip > 0 else None
        trainer.accumulate_grad_batches = tl.training.grad_accum_steps
        if done.stop:
            trainer.should_stop = True
        if done.log_row:
            for logger in trainer.loggers:
                logger.log_metrics(done.log_row, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steering.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._steering.close()

    # ---- actions ----------------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        trainer = self._trainer
        if not is_overridden("validation_step", trainer.lightning_module):
            raise ValueError("eval rejected: the LightningModule has no validation_step")
        metrics = eval_metrics(lambda: _run_validation(trainer))
        if not metrics:
            raise ValueError("eval rejected: validation logged nothing (no val dataloader or no self.log)")
        return metrics


def _run_validation(trainer: Any) -> dict[str, Any]:
    """Run the fit loop's validation loop now, as Lightning does between training batches
    (`_TrainingEpochLoop.on_advance_end`), and return what it logged."""
    connector = trainer._logger_connector
    first_loop_iter = connector._first_loop_iter
    trainer.validating = True
    try:
        outputs = trainer.fit_loop.epoch_loop.val_loop.run()
    finally:
        trainer.training = True
        connector._first_loop_iter = first_loop_iter
    merged: dict[str, Any] = {}
    for per_loader in outputs:
        merged.update(per_loader)
    return merged


def _set_global_step(trainer: Any, step: int) -> None:
    """Move Lightning's optimizer-step counter (what `trainer.global_step` reads) to `step`."""
    epoch_loop = trainer.fit_loop.epoch_loop
    module = trainer.lightning_module
    if module is None or module.automatic_optimization:
        progress = epoch_loop.automatic_optimization.optim_progress.optimizer.step
    else:
        progress = epoch_loop.manual_optimization.optim_step_progress
    progress.total.ready = progress.total.completed = step
