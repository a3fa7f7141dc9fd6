"""The knobs a rank exposes: built-in optimizer knobs (lr, weight_decay, momentum, betas, eps, per
parameter group), training-loop knobs (grad_clip_norm, grad_accum_steps) and user knobs registered with
`Threadlet.knob`; schema for validation, validation hooks, and apply on the training thread."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from threadlet import lr
from threadlet.lr import LrControl
from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, split_key, validate_set
from torchloom.messages import KnobSpec, KnobType, KnobValue

Getter = Callable[[], KnobValue]
Applier = Callable[[KnobValue], None]
# Raises CommandRejected (or ValueError) naming what is wrong; must not change any state.
Validator = Callable[[KnobValue], None]

# Optimizer hyperparameters exposed as knobs, in report order; each only where every group has it.
OPTIMIZER_KNOBS: tuple[str, ...] = ("lr", "weight_decay", "momentum", "betas", "eps")
TRAINING_KNOBS: tuple[str, ...] = ("grad_clip_norm", "grad_accum_steps")

_PY_TYPES: dict[type, KnobType] = {
    float: KnobType.FLOAT,
    int: KnobType.INT,
    bool: KnobType.BOOL,
    str: KnobType.STR,
    tuple: KnobType.FLOAT_LIST,
}


def knob_type(value: KnobType | str | type) -> KnobType:
    """Accept `KnobType.FLOAT`, `"float"` or `float` (also int, bool, str, tuple for float lists)."""
    if isinstance(value, KnobType):
        return value
    if isinstance(value, str):
        try:
            return KnobType(value)
        except ValueError:
            pass
    elif value in _PY_TYPES:
        return _PY_TYPES[value]
    names = ", ".join(t.value for t in KnobType)
    raise ValueError(f"knob type {value!r} rejected: expected one of {names} (or float, int, bool, str)")


def group_names(optimizer: Any) -> tuple[str, ...]:
    """Names of the optimizer's parameter groups: their "name" key, else their index."""
    names = tuple(str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups))
    if len(set(names)) != len(names):
        raise ValueError(f"parameter group names {names} rejected: names must be unique")
    return names


class TrainingKnobs:
    """Knobs the training loop reads (grad_clip_norm, grad_accum_steps) and helpers that read them.

    A knob is reported (and settable) once it is enabled: explicitly with `enable`, or on the loop's
    first use of its helper, so the schema never offers a knob the loop ignores. Called on the
    training thread only.

    Args:
        on_schema_change: called after a knob is enabled (the board rebuilds its schema).
    """

    def __init__(self, on_schema_change: Callable[[], None] | None = None) -> None:
        self._on_schema_change = on_schema_change
        self.enabled: tuple[str, ...] = ()
        # Knobs reported but not changeable live: name -> why; every set of one is refused with it.
        # Swapped whole, so the background thread (`KnobBoard.validate`) never sees it mid-update.
        self.fixed: Mapping[str, str] = {}
        self._clip_norm = 0.0
        self._accum = 1

    def enable(self, *, grad_clip_norm: float | None = None, grad_accum_steps: int | None = None) -> None:
        """Expose the given knobs with these starting values (None: leave that knob as it is).

        Raises:
            ValueError: on a value outside the knob's bounds (the message names them).
        """
        changed = False
        if grad_clip_norm is not None:
            clip = _checked("grad_clip_norm", grad_clip_norm)
            assert isinstance(clip, float)
            self._clip_norm = clip
            changed |= self._enable("grad_clip_norm")
        if grad_accum_steps is not None:
            value = _checked("grad_accum_steps", grad_accum_steps)
            assert isinstance(value, int)
            self._accum = value
            changed |= self._enable("grad_accum_steps")
        if changed and self._on_schema_change is not None:
            self._on_schema_change()

    def fix(self, *, grad_accum_steps: int, reason: str) -> None:
        """Report `grad_accum_steps` with this value but refuse every change of it with `reason`, on
        every rank when the command arrives: for a loop that cannot apply a change at the agreed
        step (the HF Trainer fixes its accumulation for an epoch), so `torchloom set` says why
        instead of calling the knob unknown.

        Raises:
            ValueError: on a value outside the knob's bounds or an empty `reason`.
        """
        if not reason:
            raise ValueError("fix(reason='') rejected: say why grad_accum_steps cannot change live")
        value = _checked("grad_accum_steps", grad_accum_steps)
        assert isinstance(value, int)
        self._accum = value
        self.fixed = {**self.fixed, "grad_accum_steps": reason}
        self._enable("grad_accum_steps")
        if self._on_schema_change is not None:  # the description now says why
            self._on_schema_change()

    def _enable(self, name: str) -> bool:
        if name in self.enabled:
            return False
        self.enabled = tuple(n for n in TRAINING_KNOBS if n in self.enabled or n == name)
        return True

    @property
    def grad_clip_norm(self) -> float:
        """Current max gradient norm (0: clipping disabled)."""
        return self._clip_norm

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step; reading it enables the knob (default 1)."""
        if "grad_accum_steps" not in self.enabled:
            self.enable(grad_accum_steps=self._accum)
        return self._accum

    def clip_grad_(
        self, parameters: torch.Tensor | Iterable[torch.Tensor], norm_type: float = 2.0
    ) -> float | None:
        """Clip gradients in place to the current `grad_clip_norm` (the first call enables the knob).

        Args:
            parameters: as for `torch.nn.utils.clip_grad_norm_`.
            norm_type: the p of the p-norm.

        Returns:
            The total gradient norm before clipping, or None while clipping is disabled (0).
        """
        if "grad_clip_norm" not in self.enabled:
            self.enable(grad_clip_norm=self._clip_norm)
        if self._clip_norm <= 0:
            return None
        return float(torch.nn.utils.clip_grad_norm_(parameters, self._clip_norm, norm_type=norm_type))

    def value(self, name: str) -> KnobValue:
        return self._clip_norm if name == "grad_clip_norm" else self._accum

    def apply(self, name: str, value: KnobValue) -> None:
        if name == "grad_clip_norm":
            assert isinstance(value, float | int) and not isinstance(value, bool)
            self._clip_norm = float(value)
        else:
            assert isinstance(value, int) and not isinstance(value, bool)
            self._accum = value


def _refuse_fixed(fixed: Mapping[str, str], values: Mapping[str, KnobValue]) -> None:
    """Raise CommandRejected (the reason `TrainingKnobs.fix` gave) for the first fixed knob set."""
    for key in sorted(values):
        name = split_key(key)[0]
        if name in fixed:
            raise CommandRejected(fixed[name], key=key)


def _checked(name: str, value: KnobValue) -> KnobValue:
    try:
        return validate_set(BUILTIN_SPECS, {name: value})[name]
    except CommandRejected as exc:
        raise ValueError(exc.reason) from None


class KnobBoard:
    """Every knob of one rank.

    `schema` is an immutable snapshot safe to read from the background thread, and so is `validate`
    (it reads only the schema and the validators, which must themselves be thread-safe);
    everything else is called on the training thread only. `schema_version` grows by one each time
    the schema is rebuilt (a knob registered, enabled or fixed), so a reader that keeps something
    derived from it (a heartbeat's schema hash) recomputes it only then.

    Built-in optimizer knobs are reported only where every parameter group has the parameter:
    lr and weight_decay (all torch.optim optimizers), momentum (SGD, RMSprop), betas (Adam,
    AdamW, ...) and eps.

    Setting `lr` (of all groups or one) follows `threadlet.lr`: the next optimizer step uses exactly
    the value, and a given scheduler's remaining schedule is scaled to it.

    Args:
        optimizer: a torch optimizer, or None for user knobs only.
        scheduler: the LR scheduler the loop steps (any of torch.optim.lr_scheduler, including
            SequentialLR/ChainedScheduler and ReduceLROnPlateau); lr sets scale its schedule.

    Raises:
        ValueError: on a scheduler that is not a torch LR scheduler, or duplicate group names.
    """

    def __init__(self, optimizer: Any = None, scheduler: Any = None) -> None:
        self._optimizer = optimizer
        self.groups: tuple[str, ...] = group_names(optimizer) if optimizer is not None else ()
        self._builtin: tuple[str, ...] = ()
        if optimizer is not None:
            groups = optimizer.param_groups
            self._builtin = tuple(
                name for name in OPTIMIZER_KNOBS if groups and all(_has_knob(g, name) for g in groups)
            )
        self._lr = LrControl(optimizer, scheduler) if optimizer is not None else None
        self._user: dict[str, tuple[KnobSpec, Getter, Applier]] = {}
        self._validators: Mapping[str, Validator] = {}
        self.training = TrainingKnobs(on_schema_change=self._rebuild)
        self.schema: Mapping[str, KnobSpec] = {}
        self.schema_version = 0
        self._sorted: tuple[KnobSpec, ...] = ()  # the schema in name order, without values
        self._readers: tuple[tuple[str, Callable[[], KnobValue | None]], ...] = ()  # the same order
        self._set_schema()

    def release(self) -> None:
        """Forget the optimizer, scheduler and every knob (at close), so the board, which every
        component of a threadlet shares, keeps none of the user's objects alive."""
        self._optimizer = self._lr = None
        self.groups = self._builtin = ()
        self._user = {}
        self._validators = {}
        self.training = TrainingKnobs(on_schema_change=self._rebuild)
        self._set_schema()

    def _set_schema(self) -> None:
        # Swap in a new mapping so the background thread never sees a dict mid-update.
        schema = self._build_schema()
        self._sorted = tuple(spec for _, spec in sorted(schema.items()))
        self._readers = tuple((spec.name, self._reader(spec.name)) for spec in self._sorted)
        self.schema = schema
        self.schema_version += 1

    def _reader(self, name: str) -> Callable[[], KnobValue | None]:
        """A function that reads the current value of knob `name`, resolved once per schema so that
        `values` (every status refresh) does no lookup of where the knob lives."""
        if name in self._builtin:
            # Through the optimizer each time: its load_state_dict (a rollback) replaces the list.
            optimizer = self._optimizer
            if name == "betas":
                return lambda: _read_pair(optimizer.param_groups[0][name])
            return lambda: float(optimizer.param_groups[0][name])
        if name in self.training.enabled:
            return functools.partial(self.training.value, name)
        return functools.partial(_user_value, self._user[name][1])

    def _build_schema(self) -> dict[str, KnobSpec]:
        out = {name: dataclasses.replace(BUILTIN_SPECS[name], groups=self.groups) for name in self._builtin}
        fixed = self.training.fixed
        out.update(
            {
                name: dataclasses.replace(BUILTIN_SPECS[name], description=f"fixed: {fixed[name]}")
                if name in fixed
                else BUILTIN_SPECS[name]
                for name in self.training.enabled
            }
        )
        out.update({name: spec for name, (spec, _, _) in self._user.items()})
        return out

    def _rebuild(self) -> None:
        clash = set(self.training.enabled) & set(self._user)
        if clash:
            raise ValueError(f"knob {sorted(clash)[0]!r} rejected: a user knob of that name already exists")
        self._set_schema()

    def register(
        self, spec: KnobSpec, get: Getter, apply: Applier, validate: Validator | None = None
    ) -> None:
        """Add a user knob; its name must be new.

        Args:
            spec: its schema (type and bounds are checked by `validate` before `validate` hooks).
            get: returns the current value.
            apply: sets a validated value.
            validate: optional structural check of a typed value; raises CommandRejected (or
                ValueError) with a user-facing message and changes nothing. It runs at filing
                time (`validate`, on the bus thread) and again before any apply.
        """
        if spec.name in self.schema or spec.name in TRAINING_KNOBS:
            raise ValueError(f"knob {spec.name!r} rejected: a knob of that name already exists")
        split_key(spec.name)
        if "@" in spec.name:
            raise ValueError(f"knob name {spec.name!r} rejected: '@' is reserved for groups (lr@head)")
        self._user[spec.name] = (spec, get, apply)
        if validate is not None:
            self._validators = {**self._validators, spec.name: validate}
        self._set_schema()

    def validate(self, values: Mapping[str, KnobValue]) -> dict[str, KnobValue]:
        """Validate a whole change: schema types and bounds, then each user knob's validate hook.

        Returns:
            The typed values (as `torchloom.knobs.validate_set`).

        Raises:
            CommandRejected: naming the first bad key; nothing is changed.
        """
        typed = validate_set(self.schema, values)
        _refuse_fixed(self.training.fixed, typed)
        validators = self._validators
        for key in sorted(typed):
            check = validators.get(split_key(key)[0])
            if check is None:
                continue
            try:
                check(typed[key])
            except CommandRejected:
                raise
            except ValueError as exc:
                raise CommandRejected(str(exc), key=key) from None
        return typed

    def group_values(self, name: str) -> dict[str, float]:
        """Current value of a scalar built-in knob per parameter group ({} for betas or absent)."""
        if self._optimizer is None or name not in self._builtin or name == "betas":
            return {}
        return {g: float(pg[name]) for g, pg in zip(self.groups, self._optimizer.param_groups, strict=True)}

    def value(self, name: str) -> KnobValue | None:
        """Current value of a knob (for a built-in: that of the first parameter group)."""
        if name in self._builtin:
            return _read(self._optimizer.param_groups[0], name)
        if name in self.training.enabled:
            return self.training.value(name)
        entry = self._user.get(name)
        return None if entry is None else _user_value(entry[1])

    def specs(self) -> tuple[KnobSpec, ...]:
        """The schema with current values, in name order."""
        return tuple(dataclasses.replace(spec, value=self.value(spec.name)) for spec in self._sorted)

    def schema_specs(self) -> tuple[KnobSpec, ...]:
        """The schema in name order without values (the same tuple until `schema_version` changes)."""
        return self._sorted

    def values(self) -> dict[str, KnobValue]:
        """The current value of every knob that has one, in name order: what a heartbeat carries
        between two full schemas (reads the values only; builds no spec)."""
        out: dict[str, KnobValue] = {}
        for name, read in self._readers:
            value = read()
            if value is not None:
                out[name] = value
        return out

    def apply(self, values: Mapping[str, KnobValue]) -> dict[str, str]:
        """Apply validated, typed values (keys `name` or `name@group`).

        Every user validate hook and every lr check runs first, so a change is applied whole or not
        at all (a hook's CommandRejected, or the ValueError of an lr that cannot apply at this step,
        propagates before any state changes).

        Returns:
            The ack detail: for a change of lr, the lr in effect per group set and how it carries
            on (`threadlet.lr.LrControl.detail`); for a plain weight_decay, the groups it set and
            those it kept without decay (`_decayed`); else empty.
        """
        _refuse_fixed(self.training.fixed, values)
        validators = self._validators
        lr_groups: list[int] = []
        for key in sorted(values):
            name, group = split_key(key)
            check = validators.get(name)
            if check is not None:
                check(values[key])
            if name == "lr" and self._lr is not None and name in self._builtin:
                value = values[key]
                assert isinstance(value, float | int) and not isinstance(value, bool)
                for i in self._group_indices(group):
                    self._lr.check(i, float(value))
                    lr_groups.append(i)
        detail: dict[str, str] = {}
        for key in sorted(values):
            name, group = split_key(key)
            value = values[key]
            if name in self._builtin:
                detail.update(self._apply_builtin(name, group, value))
            elif name in self.training.enabled:
                self.training.apply(name, value)
            else:
                self._user[name][2](value)
        if lr_groups and self._lr is not None:
            detail.update(self._lr.detail(sorted(set(lr_groups)), self.groups))
        return detail

    def lr_overwritten(self) -> list[str]:
        """Messages for lr values set here that something else has changed since (the front checks
        at step boundaries, at most every 50 ms; each change reported once)."""
        if self._lr is None:
            return []
        return [
            f"lr@{self.groups[i]}={value:g} set by torchloom was changed to {now:g} outside the "
            f"threadlet (by a scheduler it was not given?): {lr.FIX}"
            for i, value, now in self._lr.overwritten()
        ]

    def forget_lr_sets(self) -> None:
        """A checkpoint put back other lr values: stop watching the ones set before."""
        if self._lr is not None:
            self._lr.forget()

    def _group_indices(self, group: str | None) -> list[int]:
        return [i for i, name in enumerate(self.groups) if group is None or name == group]

    def _decayed(self) -> list[int]:
        """The groups a plain `weight_decay=X` sets: those with weight decay now, so the groups a
        loop built without it (biases and norms, as the HF Trainer does) keep none; every group when
        none has any."""
        groups = self._optimizer.param_groups
        decayed = [i for i, g in enumerate(groups) if float(g["weight_decay"]) != 0.0]
        return decayed or list(range(len(groups)))

    def _apply_builtin(self, name: str, group: str | None, value: KnobValue) -> dict[str, str]:
        """Set a built-in optimizer knob; returns its ack detail (for weight_decay: the groups set
        and those kept without decay)."""
        new: float | tuple[float, ...]
        if name == "betas":
            assert isinstance(value, tuple) and len(value) == 2
            new = tuple(float(v) for v in value)
        else:
            assert isinstance(value, float | int) and not isinstance(value, bool)
            new = float(value)
            assert math.isfinite(new)
        indices = self._group_indices(group)
        detail: dict[str, str] = {}
        if name == "weight_decay" and group is None:
            decayed = self._decayed()
            kept = [i for i in indices if i not in decayed]
            indices = decayed
            if kept:
                detail["weight_decay_kept_at_0"] = ",".join(self.groups[i] for i in kept)
            detail.update({f"weight_decay@{self.groups[i]}": repr(new) for i in indices})
        for i in indices:
            pg = self._optimizer.param_groups[i]
            if name == "lr":
                assert isinstance(new, float) and self._lr is not None
                self._lr.set(i, new)
            elif isinstance(pg[name], torch.Tensor):  # capturable/tensor hyperparameters stay tensors
                pg[name].fill_(new)
            else:
                pg[name] = new
        return detail


def _has_knob(group: Mapping[str, Any], name: str) -> bool:
    if name not in group:
        return False
    value = group[name]
    if name == "betas":
        return isinstance(value, tuple | list) and len(value) == 2
    return isinstance(value, float | int | torch.Tensor) and not isinstance(value, bool)


def _read(group: Mapping[str, Any], name: str) -> KnobValue:
    value = group[name]
    if name == "betas":
        return _read_pair(value)
    return float(value)


def _read_pair(value: Any) -> tuple[float, float]:
    return (float(value[0]), float(value[1]))


def _user_value(get: Getter) -> KnobValue | None:
    try:
        return get()
    except Exception:  # a broken user getter must not break heartbeats
        return None
