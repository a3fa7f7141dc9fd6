"""The weaver's heartbeat fast path (`wire.HeartbeatDecoder`): a rank's unchanged knob schema and
device health are reused from its previous heartbeat, never converted again; every heartbeat still
decodes equal to `wire.decode_heartbeat`, folds into the same liveness state, and a heartbeat with a
changed schema (or from a new process of the rank) decodes it afresh. Also: the schema hash a rank
sends is the one the weaver computes from the decoded schema (int bounds included)."""

from __future__ import annotations

import dataclasses

from tests.unit.factories import heartbeat
from torchloom import knobs, wire
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import DeviceHealth, Heartbeat
from weaver import liveness
from weaver.model import WeaverState

SPECS = tuple(
    dataclasses.replace(BUILTIN_SPECS[name], value=value)
    for name, value in (("grad_accum_steps", 2), ("lr", 1e-3), ("weight_decay", 0.01))
)
HASH = knobs.schema_hash(SPECS)
DEVICE = DeviceHealth(kind="cuda", device="GPU-0", nvml_available=True, utilization_pct=90.0, xids=(79,))


def _sequence() -> list[Heartbeat]:
    """What one rank sends: the schema in full, hash-only heartbeats (device unchanged, then moved),
    a new schema, then a new process of the rank with the first schema again."""
    full = heartbeat(0, knobs=SPECS, knobs_hash=HASH, device=DEVICE, step=1)
    values = {s.name: s.value for s in SPECS if s.value is not None}
    hashed = dataclasses.replace(full, knobs=(), knob_values=values, step=2)
    moved = dataclasses.replace(hashed, device=dataclasses.replace(DEVICE, utilization_pct=50.0), step=3)
    new_specs = (*SPECS, dataclasses.replace(BUILTIN_SPECS["grad_clip_norm"], value=1.0))
    changed = dataclasses.replace(full, knobs=new_specs, knobs_hash=knobs.schema_hash(new_specs), step=4)
    reborn = dataclasses.replace(full, incarnation="other", step=0)
    return [full, hashed, hashed, moved, changed, changed, reborn, dataclasses.replace(reborn, device=None)]


def test_the_schema_hash_survives_the_wire_with_int_bounds() -> None:
    assert isinstance(BUILTIN_SPECS["grad_accum_steps"].min, int)
    decoded = wire.decode_heartbeat(wire.encode(heartbeat(0, knobs=SPECS, knobs_hash=HASH)))
    assert knobs.schema_hash(decoded.knobs) == HASH


def test_the_fast_path_decodes_what_the_full_decode_does_and_folds_the_same() -> None:
    decoder = wire.HeartbeatDecoder()
    fast, full = WeaverState(), WeaverState()
    for i, hb in enumerate(_sequence()):
        data = wire.encode(hb)
        got, want = decoder.decode(data), wire.decode_heartbeat(data)
        assert got == want == hb
        liveness.observe_heartbeat(fast, got, float(i))
        liveness.observe_heartbeat(full, want, float(i))
        assert fast == full


def test_unchanged_parts_are_reused_and_changed_ones_decoded_again() -> None:
    decoder = wire.HeartbeatDecoder()
    full, hashed, hashed_again, moved, changed, changed_again, reborn, no_device = (
        decoder.decode(wire.encode(hb)) for hb in _sequence()
    )
    assert hashed.device is full.device and hashed_again.device is full.device  # not converted again
    assert moved.device is not full.device and moved.device is not None
    assert moved.device.utilization_pct == 50.0
    assert changed.knobs != full.knobs and changed.knobs_hash != full.knobs_hash  # the new schema
    assert changed_again.knobs is changed.knobs  # the same schema again: reused
    assert reborn.knobs == full.knobs and reborn.knobs is not changed.knobs  # a new process: afresh
    assert reborn.device == full.device and reborn.device is not changed.device
    assert no_device.device is None


def test_the_decoder_forgets_the_oldest_sender_past_its_bound() -> None:
    decoder = wire.HeartbeatDecoder(max_senders=2)
    first = decoder.decode(wire.encode(heartbeat(0, device=DEVICE)))
    decoder.decode(wire.encode(heartbeat(1, device=DEVICE)))
    decoder.decode(wire.encode(heartbeat(2, device=DEVICE)))
    again = decoder.decode(wire.encode(heartbeat(0, device=DEVICE)))
    assert again == first and again.device is not first.device  # rank 0 was forgotten
