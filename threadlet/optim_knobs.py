"""The knobs a rank exposes: built-in optimizer knobs (lr, weight_decay, per parameter group) and
user knobs registered with `Threadlet.knob`; schema for validation and apply on the training thread."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from torchloom.knobs import BUILTIN_SPECS, split_key
from torchloom.messages import KnobSpec, KnobType, KnobValue

Getter = Callable[[], KnobValue]
Applier = Callable[[KnobValue], None]

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


class KnobBoard:
    """Every knob of one rank.

    `schema` is an immutable snapshot safe to read from the background thread; everything else is
    called on the training thread only.

    Args:
        optimizer: a torch optimizer, or None for user knobs only.
        scheduler: an LR scheduler whose `base_lrs` must follow lr changes, or None.
    """

    def __init__(self, optimizer: Any = None, scheduler: Any = None) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self.groups: tuple[str, ...] = group_names(optimizer) if optimizer is not None else ()
        self._builtin: tuple[str, ...] = ()
        if optimizer is not None:
            groups = optimizer.param_groups
            self._builtin = tuple(
                name for name in ("lr", "weight_decay") if groups and all(name in g for g in groups)
            )
        self._user: dict[str, tuple[KnobSpec, Getter, Applier]] = {}
        self.schema: Mapping[str, KnobSpec] = self._build_schema()

    def _build_schema(self) -> dict[str, KnobSpec]:
        out = {name: dataclasses.replace(BUILTIN_SPECS[name], groups=self.groups) for name in self._builtin}
        out.update({name: spec for name, (spec, _, _) in self._user.items()})
        return out

    def register(self, spec: KnobSpec, get: Getter, apply: Applier) -> None:
        """Add a user knob; its name must be new."""
        if spec.name in self.schema:
            raise ValueError(f"knob {spec.name!r} rejected: a knob of that name already exists")
        split_key(spec.name)
        if "@" in spec.name:
            raise ValueError(f"knob name {spec.name!r} rejected: '@' is reserved for groups (lr@head)")
        self._user[spec.name] = (spec, get, apply)
        # Swap in a new mapping so the background thread never sees a dict mid-update.
        self.schema = self._build_schema()

    def group_values(self, name: str) -> dict[str, float]:
        """Current value of a built-in knob per parameter group."""
        if self._optimizer is None or name not in self._builtin:
            return {}
        return {g: float(pg[name]) for g, pg in zip(self.groups, self._optimizer.param_groups, strict=True)}

    def value(self, name: str) -> KnobValue | None:
        """Current value of a knob (for a built-in: that of the first parameter group)."""
        if name in self._builtin:
            return float(self._optimizer.param_groups[0][name])
        entry = self._user.get(name)
        if entry is None:
            return None
        try:
            return entry[1]()
        except Exception:  # a broken user getter must not break heartbeats
            return None

    def specs(self) -> tuple[KnobSpec, ...]:
        """The schema with current values, for heartbeats."""
        return tuple(
            dataclasses.replace(spec, value=self.value(name)) for name, spec in sorted(self.schema.items())
        )

    def apply(self, values: Mapping[str, KnobValue]) -> None:
        """Apply validated, typed values (keys `name` or `name@group`).

        Setting lr also sets the scheduler's `base_lrs` (and each group's `initial_lr`) so a
        scheduler does not silently undo the change at its next step.
        """
        for key in sorted(values):
            name, group = split_key(key)
            value = values[key]
            if name in self._builtin:
                self._apply_builtin(name, group, value)
            else:
                self._user[name][2](value)

    def _apply_builtin(self, name: str, group: str | None, value: KnobValue) -> None:
        assert isinstance(value, float | int) and not isinstance(value, bool)
        number = float(value)
        assert math.isfinite(number)
        for i, (gname, pg) in enumerate(zip(self.groups, self._optimizer.param_groups, strict=True)):
            if group is not None and gname != group:
                continue
            pg[name] = number
            if name == "lr":
                if "initial_lr" in pg:
                    pg["initial_lr"] = number
                base_lrs = getattr(self._scheduler, "base_lrs", None)
                if base_lrs is not None and i < len(base_lrs):
                    base_lrs[i] = number
