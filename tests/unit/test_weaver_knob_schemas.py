"""The pure parts of `weaver.knob_schemas`: bucket keys and filling a hash-only heartbeat."""

from __future__ import annotations

import dataclasses

from torchloom import knobs
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import Heartbeat
from weaver.knob_schemas import schema_key, with_schema

SPECS = (BUILTIN_SPECS["lr"], BUILTIN_SPECS["weight_decay"])


def test_the_key_is_the_job_and_the_hash_in_16_hex_digits() -> None:
    assert schema_key("job-a", 1) == "job-a.0000000000000001"
    assert schema_key("j", knobs.schema_hash(SPECS)).split(".")[1] == f"{knobs.schema_hash(SPECS):016x}"


def test_a_hash_only_heartbeat_gets_the_schema_with_its_own_values() -> None:
    hb = Heartbeat(
        job="j", run_id="r", rank=0, world_size=1, incarnation="i",
        knobs_hash=knobs.schema_hash(SPECS), knob_values={"lr": 0.5},
    )  # fmt: skip
    filled = with_schema(hb, tuple(dataclasses.replace(s, value=None) for s in SPECS))
    assert [s.name for s in filled.knobs] == ["lr", "weight_decay"]
    assert {s.name: s.value for s in filled.knobs} == {"lr": 0.5, "weight_decay": None}
    assert knobs.schema_hash(filled.knobs) == hb.knobs_hash
