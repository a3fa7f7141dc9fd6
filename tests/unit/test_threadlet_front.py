"""The Threadlet front: local and bus mode build the same attributes (so `resumed_from` and the rest
exist in both), and decided commands are frozen `Decided` records with a JSON form."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

import threadlet
from tests.unit.factories import local_config, set_config
from threadlet.state import Decided
from torchloom.messages import AckStatus

PUBLIC = (
    "config", "applied", "resumed_from", "group", "rank", "world_size", "local_rank", "incarnation",
    "host", "pid", "step_count", "tick", "branch", "rounds", "paused", "should_stop", "training",
    "grad_accum_steps",
)  # fmt: skip


def test_local_mode_has_resumed_from_and_the_same_attributes_as_bus_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TORCHLOOM_NATS_URL", raising=False)
    with threadlet.attach() as local, threadlet.attach(config=local_config()) as bus:
        assert local.config.local and not bus.config.local
        assert local.resumed_from == "" and bus.resumed_from == ""
        assert set(vars(local)) == set(vars(bus))
        for name in PUBLIC:
            getattr(local, name)
            getattr(bus, name)
        local.step()
        assert (local.step_count, local.tick, local.branch, local.applied) == (1, 1, "main", [])


def test_decided_commands_are_frozen_records_with_a_json_form() -> None:
    with threadlet.attach(config=local_config()) as tl:
        tl.knob("batch", int, min=1, max=64, get=lambda: 8, apply=lambda v: None)
        tl._agreement.file(set_config(1, batch=16), time.time())
        tl.step()
        (decided,) = tl.applied
    assert isinstance(decided, Decided) and decided.applied
    assert (decided.seq, decided.kind, decided.status, decided.step) == (1, "set", AckStatus.APPLIED, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decided.step = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        decided.values["batch"] = 1  # type: ignore[index]
    assert json.loads(json.dumps(decided.to_json())) == {
        "seq": 1,
        "command_id": decided.command_id,
        "kind": "set",
        "status": "applied",
        "step": 1,
        "branch": "main",
        "reason": "",
        "values": {"batch": 16},
        "args": {},
        "detail": {},
    }
