"""Knob schemas and the pure validation of config changes, shared by the weaver and the threadlet.

A change is validated as a whole: either every assignment is valid and a typed dict comes back, or
`CommandRejected` names the first bad key, what it got and what would be right. Nothing is partial.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

from torchloom.errors import CommandRejected
from torchloom.messages import KnobSpec, KnobType, KnobValue

# Built-in optimizer knobs. The threadlet reports them only where the optimizer has the parameter.
BUILTIN_SPECS: dict[str, KnobSpec] = {
    "lr": KnobSpec(
        name="lr",
        type=KnobType.FLOAT,
        min=0.0,
        min_exclusive=True,
        max=10.0,
        description="learning rate of every parameter group (or of one: lr@group)",
    ),
    "weight_decay": KnobSpec(
        name="weight_decay",
        type=KnobType.FLOAT,
        min=0.0,
        max=10.0,
        description="weight decay of every parameter group (or of one: weight_decay@group)",
    ),
    "momentum": KnobSpec(
        name="momentum",
        type=KnobType.FLOAT,
        min=0.0,
        max=1.0,
        description="momentum (SGD, RMSprop) of every parameter group (or of one: momentum@group)",
    ),
    "betas": KnobSpec(
        name="betas",
        type=KnobType.FLOAT_LIST,
        min=0.0,
        max=1.0,
        max_exclusive=True,
        description="Adam/AdamW (beta1,beta2), e.g. 0.9,0.999 (or of one group: betas@group)",
    ),
    "eps": KnobSpec(
        name="eps",
        type=KnobType.FLOAT,
        min=0.0,
        min_exclusive=True,
        max=1.0,
        description="optimizer epsilon of every parameter group (or of one: eps@group)",
    ),
    # Training-loop knobs: reported once the loop reads them through the threadlet's helpers.
    "grad_clip_norm": KnobSpec(
        name="grad_clip_norm",
        type=KnobType.FLOAT,
        min=0.0,
        max=1e6,
        description="max total gradient norm for clip_grad_ (0 disables clipping)",
    ),
    "grad_accum_steps": KnobSpec(
        name="grad_accum_steps",
        type=KnobType.INT,
        min=1,
        max=1024,
        description="micro-batches accumulated per optimizer step",
    ),
    # Data mixture knobs of threadlet.data.MixtureSampler (structure of `mix` checked by the rank).
    "mix": KnobSpec(
        name="mix",
        type=KnobType.STR,
        description="data mixture NAME:WEIGHT,... (weights >= 0, normalized), e.g. code:0.5,math:0.5",
    ),
    "batch_size": KnobSpec(
        name="batch_size",
        type=KnobType.INT,
        min=1,
        max=65536,
        description="samples per batch drawn by the mixture sampler",
    ),
}

# Float-list knobs whose length is fixed (checked before bounds, so the message names the length).
LIST_LENGTHS: dict[str, int] = {"betas": 2}


def split_key(key: str) -> tuple[str, str | None]:
    """Split `"lr@head"` into `("lr", "head")` and `"lr"` into `("lr", None)`."""
    name, sep, group = key.partition("@")
    if not name or (sep and not group):
        raise CommandRejected(
            f"{key!r} is not a knob key: expected NAME or NAME@GROUP (e.g. lr or lr@head)", key=key
        )
    return name, (group if sep else None)


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI `KEY=VALUE` words into raw strings; typing happens in `validate_set`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CommandRejected(f"{item!r} is not an assignment: expected KEY=VALUE (e.g. lr=3e-4)")
        if key in out:
            raise CommandRejected(f"{key!r} is assigned twice in one command", key=key)
        out[key] = value.strip()
    if not out:
        raise CommandRejected("no assignments given: expected KEY=VALUE (e.g. lr=3e-4)")
    return out


def _describe_bounds(spec: KnobSpec) -> str:
    lo = "-inf" if spec.min is None else f"{spec.min:g}"
    hi = "inf" if spec.max is None else f"{spec.max:g}"
    left = "(" if spec.min is None or spec.min_exclusive else "["
    right = ")" if spec.max is None or spec.max_exclusive else "]"
    return f"{left}{lo}, {hi}{right}"


def _check_bounds(key: str, spec: KnobSpec, number: float, shown: str) -> None:
    if not math.isfinite(number):
        raise CommandRejected(f"{key}={shown} rejected: must be a finite number", key=key)
    too_low = spec.min is not None and (number <= spec.min if spec.min_exclusive else number < spec.min)
    too_high = spec.max is not None and (number >= spec.max if spec.max_exclusive else number > spec.max)
    if too_low or too_high:
        raise CommandRejected(f"{key}={shown} rejected: must be in {_describe_bounds(spec)}", key=key)


def _to_float(key: str, raw: KnobValue) -> float:
    if isinstance(raw, bool):
        raise CommandRejected(f"{key}={raw!r} rejected: expected a float, got a bool", key=key)
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
    raise CommandRejected(f"{key}={raw!r} rejected: expected a float (e.g. 0.001)", key=key)


def coerce(key: str, spec: KnobSpec, raw: KnobValue) -> KnobValue:
    """Return `raw` converted to the knob's type and checked against its bounds and choices."""
    if spec.type is KnobType.FLOAT:
        number = _to_float(key, raw)
        _check_bounds(key, spec, number, str(raw))
        return number
    if spec.type is KnobType.INT:
        value: int | None = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw)
            except ValueError:
                value = None
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        if value is None:
            raise CommandRejected(f"{key}={raw!r} rejected: expected an integer (e.g. 4)", key=key)
        _check_bounds(key, spec, float(value), str(raw))
        return value
    if spec.type is KnobType.BOOL:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
            return raw.lower() in {"true", "1", "yes", "on"}
        raise CommandRejected(f"{key}={raw!r} rejected: expected true or false", key=key)
    if spec.type is KnobType.STR:
        if not isinstance(raw, str):
            raise CommandRejected(f"{key}={raw!r} rejected: expected a string", key=key)
        if spec.choices and raw not in spec.choices:
            raise CommandRejected(
                f"{key}={raw!r} rejected: must be one of {', '.join(spec.choices)}", key=key
            )
        return raw
    # FLOAT_LIST: "0.9,0.999" or a sequence of numbers.
    parts: list[KnobValue]
    if isinstance(raw, str):
        parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
    elif isinstance(raw, tuple):
        parts = list(raw)
    else:
        raise CommandRejected(
            f"{key}={raw!r} rejected: expected comma-separated floats (e.g. 0.9,0.999)", key=key
        )
    if not parts:
        raise CommandRejected(
            f"{key}={raw!r} rejected: expected comma-separated floats (e.g. 0.9,0.999)", key=key
        )
    numbers = tuple(_to_float(key, p.strip() if isinstance(p, str) else p) for p in parts)
    length = LIST_LENGTHS.get(spec.name)
    if length is not None and len(numbers) != length:
        example = "0.9,0.999" if spec.name == "betas" else ",".join(["0.5"] * length)
        raise CommandRejected(
            f"{key}={raw!r} rejected: expected exactly {length} comma-separated floats (e.g. {example})",
            key=key,
        )
    for n in numbers:
        _check_bounds(key, spec, n, str(raw))
    return numbers


def validate_set(schema: Mapping[str, KnobSpec], values: Mapping[str, KnobValue]) -> dict[str, KnobValue]:
    """Validate a whole config change against a job's knob schema.

    Args:
        schema: knob name to spec, as the job reported it.
        values: `name` or `name@group` to a raw (str) or typed value.

    Returns:
        The same keys with typed values.

    Raises:
        CommandRejected: on an unknown knob or group, a wrong type, NaN/inf or a value out of
            bounds. The message names the key and the expected type or bound.
    """
    if not values:
        raise CommandRejected("empty config change: give at least one KEY=VALUE")
    out: dict[str, KnobValue] = {}
    for key in sorted(values):
        name, group = split_key(key)
        spec = schema.get(name)
        if spec is None:
            known = ", ".join(sorted(schema)) or "(none reported yet)"
            raise CommandRejected(f"unknown knob {name!r}: this job's knobs are {known}", key=key)
        if group is not None and group not in spec.groups:
            groups = ", ".join(spec.groups) or "(none: the knob is not per group)"
            raise CommandRejected(
                f"{key!r} names no parameter group of knob {name!r}: its groups are {groups}",
                key=key,
            )
        out[key] = coerce(key, spec, values[key])
    return out


def schema_of(specs: Iterable[KnobSpec]) -> dict[str, KnobSpec]:
    """Index knob specs by name."""
    return {spec.name: spec for spec in specs}


def schema_hash(specs: Iterable[KnobSpec]) -> int:
    """A stable 64-bit hash of a knob schema without the current values (heartbeats send the schema
    only when this changes, and the hash otherwise). Never 0, which means "no hash"."""
    digest = hashlib.blake2b(digest_size=8)
    for spec in sorted(specs, key=lambda s: s.name):
        # Bounds as floats: the wire carries them as doubles, so an int bound (grad_accum_steps'
        # min=1) must hash as the receiver decodes it, or no receiver can check the hash.
        fields = (
            spec.name, spec.type.value, _bound(spec.min), _bound(spec.max), spec.min_exclusive,
            spec.max_exclusive, spec.description, spec.groups, spec.choices,
        )  # fmt: skip
        digest.update(repr(fields).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest(), "big") or 1


def _bound(value: float | None) -> float | None:
    return None if value is None else float(value)
