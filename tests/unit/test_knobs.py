"""Pure validation of config changes: types, bounds, NaN/inf, unknown keys and groups."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, parse_assignments, schema_of, split_key, validate_set
from torchloom.messages import KnobSpec, KnobType


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "abc"}, "lr='abc' rejected: expected a float"),
        ({"lr": "-1"}, "lr=-1 rejected: must be in (0, 10]"),
        ({"lr": "0"}, "lr=0 rejected: must be in (0, 10]"),
        ({"lr": "11"}, "lr=11 rejected: must be in (0, 10]"),
        ({"lr": "nan"}, "lr=nan rejected: must be a finite number"),
        ({"lr": "inf"}, "lr=inf rejected: must be a finite number"),
        ({"lr": True}, "expected a float, got a bool"),
        ({"nosuch": "1"}, "unknown knob 'nosuch': this job's knobs are batch_size, betas, eps,"),
        ({"lr@head": "0.1"}, "'lr@head' names no parameter group of knob 'lr'"),
        ({"weight_decay": "-0.1"}, "weight_decay=-0.1 rejected: must be in [0, 10]"),
    ],
)
def test_bad_values_are_rejected_with_the_bound_or_type(values: dict[str, str], message: str) -> None:
    with pytest.raises(CommandRejected) as info:
        validate_set(BUILTIN_SPECS, values)
    assert message in str(info.value)


def test_whole_change_is_rejected_when_one_key_is_bad() -> None:
    with pytest.raises(CommandRejected) as info:
        validate_set(BUILTIN_SPECS, {"lr": "0.1", "weight_decay": "nan"})
    assert info.value.key == "weight_decay"


def test_valid_values_are_typed() -> None:
    out = validate_set(BUILTIN_SPECS, {"lr": "3e-4", "weight_decay": 0})
    assert out == {"lr": 3e-4, "weight_decay": 0.0}
    assert all(isinstance(v, float) for v in out.values())


def test_group_scoped_key_is_checked_against_reported_groups() -> None:
    spec = KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, min_exclusive=True, groups=("body", "head"))
    assert validate_set({"lr": spec}, {"lr@head": "0.5"}) == {"lr@head": 0.5}


@pytest.mark.parametrize(
    ("spec", "raw", "expected"),
    [
        (KnobSpec(name="n", type=KnobType.INT, min=1, max=64), "4", 4),
        (KnobSpec(name="b", type=KnobType.BOOL), "on", True),
        (KnobSpec(name="s", type=KnobType.STR, choices=("a", "b")), "b", "b"),
        (
            KnobSpec(name="betas", type=KnobType.FLOAT_LIST, min=0, max=1, max_exclusive=True),
            "0.9,0.99",
            (0.9, 0.99),
        ),
    ],
)
def test_other_types_coerce(spec: KnobSpec, raw: str, expected: object) -> None:
    assert validate_set({spec.name: spec}, {spec.name: raw}) == {spec.name: expected}


@pytest.mark.parametrize(
    ("spec", "raw", "message"),
    [
        (KnobSpec(name="n", type=KnobType.INT, min=1, max=64), "4.5", "expected an integer"),
        (KnobSpec(name="n", type=KnobType.INT, min=1, max=64), "65", "must be in [1, 64]"),
        (KnobSpec(name="b", type=KnobType.BOOL), "maybe", "expected true or false"),
        (KnobSpec(name="s", type=KnobType.STR, choices=("a", "b")), "c", "must be one of a, b"),
        (
            KnobSpec(name="betas", type=KnobType.FLOAT_LIST, min=0, max=1, max_exclusive=True),
            "0.9,1",
            "[0, 1)",
        ),
    ],
)
def test_other_types_reject(spec: KnobSpec, raw: str, message: str) -> None:
    with pytest.raises(
        CommandRejected, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        validate_set({spec.name: spec}, {spec.name: raw})


def test_parse_assignments() -> None:
    assert parse_assignments(["lr=1e-3", " weight_decay = 0.1"]) == {"lr": "1e-3", "weight_decay": "0.1"}
    for bad in (["lr"], ["=3"], []):
        with pytest.raises(CommandRejected, match="KEY=VALUE"):
            parse_assignments(bad)
    with pytest.raises(CommandRejected, match="assigned twice"):
        parse_assignments(["lr=1", "lr=2"])


def test_split_key() -> None:
    assert split_key("lr") == ("lr", None)
    assert split_key("lr@head") == ("lr", "head")
    with pytest.raises(CommandRejected, match="NAME@GROUP"):
        split_key("lr@")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_lr_accepts_exactly_the_finite_values_in_bounds(x: float) -> None:
    ok = math.isfinite(x) and 0 < x <= 10
    try:
        out = validate_set(schema_of(BUILTIN_SPECS.values()), {"lr": repr(x)})
    except CommandRejected:
        assert not ok
    else:
        assert ok and out["lr"] == x
