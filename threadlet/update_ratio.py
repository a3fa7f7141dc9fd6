"""The update-to-weight ratio on request: ||w_after - w_before|| / ||w_before|| over the optimizer's
parameters around one optimizer step every N steps (the `report_update_ratio` knob, 0 = off), globally
and per parameter group, reported with the step metrics (`threadlet.reports`).

Off, it costs one integer comparison per step: the optimizer hooks that snapshot and measure exist
only around the one measured `optimizer.step()`. Measuring copies the parameters once (one extra
copy of the weights, on their device, for that one step) and reads one norm per group.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from torchloom.messages import KnobSpec, KnobType, KnobValue

KNOB = "report_update_ratio"
# The metric names a rank reports: the ratio of the latest measured step (globally, and per group as
# "update_ratio@<group>" when the optimizer has several), and how many were measured so far, so a
# receiver of sampled reports tells a new measurement from the same one reported again.
RATIO = "update_ratio"
COUNT = "update_ratio_count"
STEP = "update_ratio_step"  # the step the latest measured optimizer step started from
LOSS = "update_ratio_loss"  # the loss of that step (the batch's, before the update), when given
MAX_EVERY = 1_000_000
NEVER = sys.maxsize

SPEC = KnobSpec(
    name=KNOB,
    type=KnobType.INT,
    min=0,
    max=MAX_EVERY,
    description="report the update-to-weight ratio ||w_after - w_before|| / ||w_before|| of one "
    "optimizer step every N steps (0: off)",
)


def ratio(update_sq: float, weight_sq: float) -> float:
    """sqrt(update_sq) / sqrt(weight_sq); 0 for no update, inf for an update of zero weights."""
    if update_sq == 0.0:
        return 0.0
    return math.sqrt(update_sq) / math.sqrt(weight_sq) if weight_sq > 0.0 else math.inf


def _squares(after: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(sum ||a - b||^2, sum ||b||^2) over pairs of tensors, read with one device sync per device."""
    update: dict[torch.device, list[torch.Tensor]] = {}
    weight: dict[torch.device, list[torch.Tensor]] = {}
    for a, b in zip(after, before, strict=True):
        b32 = b.detach().float()
        update.setdefault(b.device, []).append((a.detach().float() - b32).square().sum())
        weight.setdefault(b.device, []).append(b32.square().sum())
    up = sum(float(torch.stack(ts).sum()) for ts in update.values())
    w = sum(float(torch.stack(ts).sum()) for ts in weight.values())
    return up, w


def measure(
    after: Sequence[Sequence[torch.Tensor]], before: Sequence[Sequence[torch.Tensor]], groups: Sequence[str]
) -> dict[str, float]:
    """The ratios of one step: `update_ratio` over every group and, with several groups,
    `update_ratio@<group>` for each (`after` and `before` hold each group's tensors in order)."""
    total_up = total_w = 0.0
    out: dict[str, float] = {}
    for name, a, b in zip(groups, after, before, strict=True):
        up, w = _squares(a, b) if a else (0.0, 0.0)
        total_up += up
        total_w += w
        if len(groups) > 1:
            out[f"{RATIO}@{name}"] = ratio(up, w)
    out[RATIO] = ratio(total_up, total_w)
    return out


class UpdateRatio:
    """Measures the ratio around one `optimizer.step()` every `every` steps (training thread only).

    The front calls `arm(tick)` at a step boundary once `tick >= next_tick`: hooks on the optimizer
    then copy the parameters before its next step and measure after it, and remove themselves.
    Ticks (the front's `step()` calls) never rewind, so a rollback does not delay a measurement.

    Args:
        optimizer: the torch optimizer whose parameters are measured.
        groups: its parameter groups' names, in order (`KnobBoard.groups`).
    """

    def __init__(self, optimizer: Any, groups: Sequence[str]) -> None:
        self._optimizer: Any = optimizer
        self._groups = tuple(groups)
        self.every = 0
        self.next_tick = NEVER
        self.values: dict[str, float] = {}  # the latest measurement's ratios (empty before one)
        self.count = 0  # measurements so far
        self.step = 0  # the step the latest measured optimizer step started from
        self.loss: float | None = None  # the loss the training loop gave for that step
        self.loss_due = False  # measured; the loss of that step comes with the next `step()`
        self._armed_step = 0
        self._handles: tuple[Any, ...] = ()
        self._before: list[list[torch.Tensor]] | None = None

    def value(self) -> KnobValue:
        return self.every

    def apply(self, value: KnobValue) -> None:
        """The knob's new value: measure from the next step boundary on, every `value` steps."""
        assert isinstance(value, int) and not isinstance(value, bool)
        self.every = value
        self.next_tick = 0 if value > 0 else NEVER  # armed at the front's next check
        if value == 0:
            self._disarm()

    def arm(self, tick: int, step: int = 0) -> None:
        """Measure the next optimizer step, the one from `step` on (the front calls this once
        `tick >= next_tick`)."""
        if self.every <= 0 or self._optimizer is None:
            self.next_tick = NEVER
            return
        self.next_tick = tick + self.every
        self._armed_step = step
        if not self._handles:
            opt = self._optimizer
            self._handles = (
                opt.register_step_pre_hook(self._snapshot),
                opt.register_step_post_hook(self._measure),
            )

    def _params(self) -> list[list[torch.Tensor]]:
        return [list(g["params"]) for g in self._optimizer.param_groups]

    def _snapshot(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            self._before = [[p.detach().clone() for p in group] for group in self._params()]

    def _measure(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        before = self._before
        self._disarm()
        if before is None:
            return
        with torch.no_grad():
            self.values = measure(self._params(), before, self._groups)
        self.count += 1
        self.step = self._armed_step
        self.loss, self.loss_due = None, True

    def note_loss(self, loss: object) -> None:
        """The loss the loop gave `step()` after the measured optimizer step: that step's (read once
        per measurement; a tensor costs one device sync then)."""
        self.loss_due = False
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            self.loss = float(loss)
        elif isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.loss = float(loss.detach())

    def report(self) -> dict[str, float]:
        """The metrics to send: the latest ratios, the measurement count and the step the measured
        optimizer step started from (empty before one)."""
        if not self.count:
            return {}
        out = {**self.values, COUNT: float(self.count), STEP: float(self.step)}
        if self.loss is not None and math.isfinite(self.loss):
            out[LOSS] = self.loss
        return out

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = ()
        self._before = None

    def release(self) -> None:
        """Remove the hooks and forget the optimizer (at close)."""
        self._disarm()
        self._optimizer = None
        self.next_tick = NEVER
