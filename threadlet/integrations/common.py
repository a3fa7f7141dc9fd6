"""What the framework callbacks share: `Steering`, the component each callback delegates to (attach
with the same arguments as `threadlet.attach`, the step boundary, rollback and stop detection), which
logged values go onto the bus, the throttle that keeps per-step costs down, and the rows that write
each decided command into the framework's own loggers so its charts show the interventions."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import threadlet
from threadlet.agent import EvalFn, Threadlet
from threadlet.config import ThreadletConfig
from threadlet.state import Decided
from torchloom.messages import AckStatus

__all__ = [
    "AttachArgs",
    "AttachOptions",
    "Boundary",
    "CommandLog",
    "Steering",
    "Throttle",
    "eval_metrics",
    "numeric_metrics",
    "scalar",
]

# Names the threadlet fills itself in every StepMetrics; a logged value must not overwrite them.
_RESERVED = frozenset({"loss", "tokens", "lr", "step_time_s"})
# Prefix of the rows `CommandLog` writes; they are the framework's logs too and must not loop back.
LOG_PREFIX = "torchloom/"


class AttachArgs(TypedDict, total=False):
    """The keyword arguments of a callback: those of `threadlet.attach` it passes on."""

    job: str | None
    nats_url: str | None
    run_id: str | None
    config: ThreadletConfig | None
    checkpoint_dir: str | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AttachOptions:
    """The `threadlet.attach` arguments a callback was given (None: from the environment, as for
    `attach`): see `threadlet.attach` for each."""

    job: str | None = None
    nats_url: str | None = None
    run_id: str | None = None
    config: ThreadletConfig | None = None
    checkpoint_dir: str | None = None

    def attach(self, *, model: Any, optimizer: Any, scheduler: Any) -> Threadlet:
        """Attach a threadlet to the framework's training objects (wrappers are unwrapped); the
        callback handles stop itself, ending the framework's loop."""
        return threadlet.attach(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            job=self.job,
            nats_url=self.nats_url,
            run_id=self.run_id,
            config=self.config,
            checkpoint_dir=self.checkpoint_dir,
            handles_stop=True,  # the callback ends the framework's loop: step() never exits
        )


class Throttle:
    """True at most once per `interval_s` (and on the first call): values that cost a device sync
    or a conversion are refreshed on this clock, not at every step.

    Args:
        interval_s: the minimum period; the threadlet's `metrics_interval_s` is the natural choice.
    """

    def __init__(self, interval_s: float) -> None:
        if not math.isfinite(interval_s) or interval_s < 0:
            raise ValueError(f"interval_s={interval_s!r} rejected: must be a finite number >= 0")
        self._interval_s = interval_s
        self._next_t = 0.0

    def due(self) -> bool:
        now = time.perf_counter()
        if now < self._next_t:
            return False
        self._next_t = now + self._interval_s
        return True


def numeric_metrics(logs: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar values of a framework's logs (numbers and one-element tensors), without
    the names the threadlet reports itself and without torchloom's own rows."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        if key in _RESERVED or key.startswith(LOG_PREFIX):
            continue
        number = scalar(value)
        if number is not None:
            out[key] = number
    return out


def scalar(value: Any) -> float | None:
    """A finite float from a number or a one-element tensor, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        numel = getattr(value, "numel", None)
        if not callable(numel) or numel() != 1:
            return None
        number = float(value.item())
    return number if math.isfinite(number) else None


class CommandLog:
    """Rows for a framework's loggers, one per step boundary at which commands were decided.

    A row has `torchloom/seq` (the last seq decided), and per command: `torchloom/set/<key>` with
    the value set (numbers; float lists as `<key>/<i>`), `torchloom/<kind>` = seq for an applied
    action (checkpoint, rollback, eval, stop, pause, resume, ...), and `torchloom/rejected` = seq
    for a refused one. Numbers only, so every logger (TensorBoard, W&B, CSV) can chart them.
    """

    def __init__(self) -> None:
        self._seen = 0

    def row(self, applied: Sequence[Decided]) -> dict[str, float]:
        """What was decided since the last call ({} when nothing).

        Args:
            applied: the threadlet's `applied` list (it only grows).
        """
        new = applied[self._seen :]
        self._seen = len(applied)
        out: dict[str, float] = {}
        for decided in new:
            seq = float(decided.seq)
            out[f"{LOG_PREFIX}seq"] = seq
            if decided.status is not AckStatus.APPLIED:
                out[f"{LOG_PREFIX}rejected"] = seq
            elif decided.kind == "set":
                for key, value in decided.values.items():
                    if isinstance(value, tuple):
                        out.update({f"{LOG_PREFIX}set/{key}/{i}": float(v) for i, v in enumerate(value)})
                    elif (number := scalar(value)) is not None:
                        out[f"{LOG_PREFIX}set/{key}"] = number
            else:
                out[f"{LOG_PREFIX}{decided.kind}"] = seq
        return out


def eval_metrics(run: Callable[[], Mapping[str, Any]]) -> dict[str, float]:
    """Run a framework's evaluation and keep its finite scalar results (the `eval` action's detail)."""
    results = run()
    return {key: number for key, value in results.items() if (number := scalar(value)) is not None}


@dataclasses.dataclass(frozen=True, slots=True)
class Boundary:
    """What a step boundary did that the framework must follow.

    Attributes:
        rolled_back_to: the framework's step to move its counter to after a rollback loaded a
            checkpoint in place (None: no rollback).
        stop: a stop was decided: end training.
        log_row: the decided commands for the framework's loggers ({}: none).
    """

    rolled_back_to: int | None
    stop: bool
    log_row: dict[str, float]


class Steering:
    """One training run's threadlet and what a callback keeps beside it: the latest loss and logged
    metrics (sent with the next step), the branch (a change means a rollback), the offset between
    the framework's step counter and the threadlet's, and the command rows for its loggers.

    Args:
        options: the `threadlet.attach` arguments.
    """

    def __init__(self, options: AttachOptions) -> None:
        self.options = options
        self.threadlet: Threadlet | None = None
        self.loss: float | None = None
        self.metrics: dict[str, float] = {}
        self._commands = CommandLog()
        self._branch = ""
        self._step_offset = 0

    def start(
        self, *, model: Any, optimizer: Any, scheduler: Any, framework_step: int, eval_fn: EvalFn
    ) -> tuple[Threadlet, int]:
        """Attach; `eval_fn` serves the `eval` action.

        Args:
            framework_step: the framework's optimizer-step counter now (a resumed run's is > 0).

        Returns:
            The threadlet, and the step the framework's counter must be at: the checkpoint's when
            an elastic restart resumed from one, else `framework_step`.
        """
        tl = self.options.attach(model=model, optimizer=optimizer, scheduler=scheduler)
        self.threadlet = tl
        tl.on_eval(eval_fn)
        self._branch = tl.branch
        if tl.resumed_from:
            framework_step = tl.step_count
        self._step_offset = framework_step - tl.step_count
        return tl, framework_step

    def boundary(self, tl: Threadlet) -> Boundary:
        """Mark the step boundary after an optimizer step (blocks while paused or an action runs)."""
        tl.step(loss=self.loss, **self.metrics)
        rolled_back_to = None
        if tl.branch != self._branch:  # a rollback loaded a checkpoint in place
            self._branch = tl.branch
            rolled_back_to = tl.step_count + self._step_offset
        return Boundary(rolled_back_to, tl.should_stop, self._commands.row(tl.applied))

    def close(self) -> None:
        if self.threadlet is not None:
            self.threadlet.close()
