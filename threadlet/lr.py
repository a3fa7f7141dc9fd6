"""What `set lr=X` means, in one place: the lr the next optimizer step uses is X, and the rest of the
schedule is the original one times X / (its value where the set landed).

With a scheduler given to the threadlet, each parameter group carries a factor (1 until a set). The
scheduler keeps computing its own, unscaled schedule: around each of its steps the group's lr is
divided by the factor, the scheduler steps, and what it wrote is multiplied back. That works the
same for every scheduler in `torch.optim.lr_scheduler` (closed forms like OneCycleLR, CyclicLR,
LambdaLR and the transformers schedules, recursive ones like StepLR or CosineAnnealingLR, and the
SequentialLR/ChainedScheduler around them) without touching their hyper-parameters (`base_lrs`,
`max_lr`, `eta_min`, ...). The factors live in the scheduler's own `__dict__` (`SCALE_ATTR`, a list
of floats), so its `state_dict` carries them through checkpoints and rollbacks.

ReduceLROnPlateau scales the current lr by itself: X is set directly and later reductions scale
from X (its `min_lr` stays a floor on the lr in effect).

Without a scheduler the value is set as given. If a scheduler the threadlet was not given then
overwrites it, `LrControl.overwritten` reports it (the front asks at most every 50 ms of steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

SCALE_ATTR = "_torchloom_lr_scale"  # per-group factors, in the scheduler's __dict__ (and state_dict)
FIX = "pass scheduler=... to threadlet.attach"


class LrMode(StrEnum):
    """How a set lr carries on after the set (the ack's `lr_schedule`)."""

    SCALED = "scaled"  # the given scheduler's remaining schedule is multiplied by X / its value now
    PLATEAU = "plateau"  # ReduceLROnPlateau: later reductions scale from X
    NONE = "none"  # no scheduler drives the optimizer: X stays until the next set
    NOT_GIVEN = "not_given"  # a torch scheduler drives the optimizer but the threadlet was not given it


def read(group: dict[str, Any]) -> float:
    return float(group["lr"])


def write(group: dict[str, Any], value: float) -> None:
    """Set a group's lr; a tensor lr (capturable optimizers) stays the same tensor."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def _snapshot(groups: list[dict[str, Any]]) -> list[Any]:
    """The groups' lrs as a scheduler's `_last_lr` holds them (tensor lrs as copies)."""
    return [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]


def scale_of(scheduler: Any) -> list[float]:
    """The per-group factors of a scaled scheduler ([] when none is installed)."""
    return list(scheduler.__dict__.get(SCALE_ATTR) or [])


_SCALED: dict[type, type] = {}


def _scaled_step(base_step: Callable[..., Any]) -> Callable[..., Any]:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        scale = self.__dict__.get(SCALE_ATTR)
        if not scale or all(f == 1.0 for f in scale):
            return base_step(self, *args, **kwargs)  # never set: bit-identical to the plain scheduler
        groups = self.optimizer.param_groups
        # Groups added after the scheduler was built have no factor: zip leaves them alone.
        for group, f in zip(groups, scale, strict=False):
            write(group, read(group) / f)
        try:
            return base_step(self, *args, **kwargs)
        finally:
            for group, f in zip(groups, scale, strict=False):
                write(group, read(group) * f)
            self._last_lr = _snapshot(groups)

    step.__doc__ = base_step.__doc__
    step.__name__ = "step"
    return step


def _scaled_class(cls: type) -> type:
    """`cls` with a `step` that computes the schedule unscaled and applies the factors (cached)."""
    if cls in _SCALED.values():
        return cls
    sub = _SCALED.get(cls)
    if sub is None:
        namespace = {
            "step": _scaled_step(cls.step),  # type: ignore[attr-defined]  # every LRScheduler has step
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        sub = type(cls.__name__, (cls,), namespace)
        _SCALED[cls] = sub
    return sub


def install(scheduler: Any) -> bool:
    """Make `scheduler` follow lr sets by scaling (factors start at 1, nothing changes until a set).

    The instance's class becomes a same-named subclass whose `step` applies the factors; its
    attributes, `state_dict` and `isinstance` checks stay as they were. Idempotent.

    Returns:
        True when installed: `scheduler` is a torch `LRScheduler` other than ReduceLROnPlateau.
    """
    if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
        return False
    scheduler.__class__ = _scaled_class(type(scheduler))
    groups = scheduler.optimizer.param_groups
    scheduler.__dict__.setdefault(SCALE_ATTR, [1.0] * len(groups))
    return True


def _driven_by_a_scheduler(optimizer: Any) -> bool:
    # Every torch LRScheduler but ReduceLROnPlateau wraps its optimizer's step and marks the wrapper.
    return bool(getattr(getattr(optimizer, "step", None), "_wrapped_by_lr_sched", False))


# A factor on the rest of a schedule from which the ack warns what the schedule's high point becomes.
STEEP_SCALE = 5.0


def _configured_peak(group: Mapping[str, Any]) -> float | None:
    """The highest lr the schedule was configured with for `group`, as far as the group records it
    (`max_lr` of OneCycleLR and CyclicLR, else `initial_lr`, the base every other scheduler starts
    from and returns to), or None."""
    values = [v for k in ("max_lr", "initial_lr") if isinstance(v := group.get(k), (int, float))]
    return float(max(values)) if values else None


class LrControl:
    """Sets one optimizer's lr per parameter group with the semantics of the module docstring.
    Training thread only.

    Args:
        optimizer: the torch optimizer whose `param_groups` hold the lrs.
        scheduler: the LR scheduler the training loop steps (None: none was given).
    """

    def __init__(self, optimizer: Any, scheduler: Any = None) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        if install(scheduler):
            self.mode = LrMode.SCALED
        elif isinstance(scheduler, ReduceLROnPlateau):
            self.mode = LrMode.PLATEAU
        elif scheduler is not None:
            raise ValueError(
                f"scheduler={type(scheduler).__name__} rejected: expected a torch.optim.lr_scheduler "
                "LRScheduler (or ReduceLROnPlateau)"
            )
        else:
            self.mode = LrMode.NONE
        # Group index -> the value last set, while no scheduler we follow owns that lr.
        self._watch: dict[int, float] = {}

    @property
    def _groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._optimizer.param_groups
        return groups

    def _scale(self) -> list[float]:
        scale = scale_of(self._scheduler)
        return scale + [1.0] * (len(self._groups) - len(scale))

    def check(self, index: int, value: float) -> None:
        """Raise ValueError when group `index` cannot be set to `value` now (nothing changes)."""
        if self.mode is not LrMode.SCALED:
            return
        unscaled = read(self._groups[index]) / self._scale()[index]
        if not (unscaled > 0 and math.isfinite(unscaled)):
            raise ValueError(
                f"lr={value:g} cannot apply at this step: the schedule stands at lr {unscaled:g} here "
                "(a warmup start or the end of a schedule), so no factor scales it to the value; "
                "set it at a step where the schedule is above 0"
            )

    def set(self, index: int, value: float) -> None:
        """Make `value` the lr of group `index` from the next optimizer step on (`check` first)."""
        group = self._groups[index]
        if self.mode is LrMode.SCALED:
            scale = self._scale()
            unscaled = read(group) / scale[index]
            scale[index] = value / unscaled
            self._scheduler.__dict__[SCALE_ATTR] = scale  # a new list: a kept state_dict stays as it was
        write(group, value)
        if self._scheduler is not None and isinstance(getattr(self._scheduler, "_last_lr", None), list):
            self._scheduler._last_lr = _snapshot(self._groups)
        if self.mode is not LrMode.SCALED and self.mode is not LrMode.PLATEAU:
            self._watch[index] = read(group)

    def detail(self, indices: list[int], names: tuple[str, ...]) -> dict[str, str]:
        """The ack detail of a set of the groups `indices`: the lr in effect per group, the factor on
        the rest of a scaled schedule, and how the value carries on (`lr_schedule`)."""
        mode = self.mode
        if mode is LrMode.NONE and _driven_by_a_scheduler(self._optimizer):
            mode = LrMode.NOT_GIVEN
        out = {"lr_schedule": mode.value}
        scale = self._scale() if mode is LrMode.SCALED else []
        steep: list[str] = []
        for i in indices:
            out[f"lr@{names[i]}"] = repr(read(self._groups[i]))
            if scale:
                out[f"lr_scale@{names[i]}"] = repr(scale[i])
                peak = _configured_peak(self._groups[i])
                if scale[i] >= STEEP_SCALE and peak is not None:
                    steep.append(
                        f"{names[i]}: x{scale[i]:.3g}, so its configured {peak:.3g} "
                        f"becomes {peak * scale[i]:.3g}"
                    )
        if mode is LrMode.NOT_GIVEN:
            out["warning"] = f"a scheduler the threadlet was not given drives this optimizer: {FIX}"
        elif steep:
            # A set near a schedule's low point (the end of a cosine cycle, a warmup's start) gives a
            # large factor, and the schedule's next high point (a warm restart, a warmup's end) runs at it.
            out["warning"] = (
                f"the rest of the schedule runs scaled ({'; '.join(steep)}) wherever it returns to its "
                "configured lr (a warm restart, a warmup's end); set lr again there if that is too high"
            )
        return out

    def overwritten(self) -> list[tuple[int, float, float]]:
        """(group index, value set, value now) of every set value changed since by something other
        than the threadlet (a scheduler it was not given, the loop's own code); each reported once."""
        watch = self._watch
        if not watch:
            return []
        groups = self._groups
        # One float compared per watched group; the rest of the work only when one changed.
        out = [(i, value, now) for i, value in watch.items() if (now := read(groups[i])) != value]
        for index, _, _ in out:
            del watch[index]
        return out

    def forget(self) -> None:
        """Stop watching set values (a rollback or resume put back other ones)."""
        self._watch.clear()
