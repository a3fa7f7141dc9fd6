"""The weaver's heartbeat fast path (`wire.HeartbeatDecoder`): a rank's unchanged knob schema and
device health are reused from its previous heartbeat, never converted again; every heartbeat still
decodes equal to `wire.decode_heartbeat`, folds into the same liveness state, and a heartbeat with a
changed schema (or from a new process of the rank) decodes it afresh. Also: the schema hash a rank
sends is the one the weaver computes from the decoded schema (int bounds included)."""

from __future__ import annotations

import dataclasses

from tests.unit.factories import heartbeat
from torchloom import knobs, subjects, wire
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import DeviceHealth, Heartbeat, KnobSpec, RankState
from weaver import liveness
from weaver.model import WeaverState
from weaver.telemetry import heartbeat_subject

SPECS = tuple(
    dataclasses.replace(BUILTIN_SPECS[name], value=value)
    for name, value in (("grad_accum_steps", 2), ("lr", 1e-3), ("weight_decay", 0.01))
)
HASH = knobs.schema_hash(SPECS)
DEVICE = DeviceHealth(kind="cuda", device="GPU-0", nvml_available=True, utilization_pct=90.0, xids=(79,))


def _progress(step: int) -> dict[str, object]:
    """The fields that move from one heartbeat to the next (read straight off the message)."""
    return {
        "step": step,
        "tick": 2 * step,
        "sent_at_s": 100.0 + step / 5,
        "step_time_s": 0.1 + step / 1000,
        "last_seq": step // 2,
        "state": RankState.PAUSED if step % 3 == 2 else RankState.RUNNING,
    }


def _sequence() -> list[Heartbeat]:
    """What one rank sends: the schema in full, hash-only heartbeats (device unchanged, then moved,
    then a value changed), a new schema, then a new process of the rank with the first schema again;
    its progress moves every time."""
    full = heartbeat(0, knobs=SPECS, knobs_hash=HASH, device=DEVICE, host="h", pid=7, **_progress(1))
    values = {s.name: s.value for s in SPECS if s.value is not None}
    hashed = dataclasses.replace(full, knobs=(), knob_values=values, **_progress(2))
    hashed_on = dataclasses.replace(hashed, **_progress(3))
    moved = dataclasses.replace(
        hashed_on, device=dataclasses.replace(DEVICE, utilization_pct=50.0), **_progress(4)
    )
    lr = dataclasses.replace(moved, knob_values={**values, "lr": 2e-3}, **_progress(5))
    new_specs = (*SPECS, dataclasses.replace(BUILTIN_SPECS["grad_clip_norm"], value=1.0))
    changed = dataclasses.replace(
        full, knobs=new_specs, knobs_hash=knobs.schema_hash(new_specs), **_progress(6)
    )
    changed_on = dataclasses.replace(changed, **_progress(7))
    reborn = dataclasses.replace(full, incarnation="other", **_progress(0))
    return [
        full,
        hashed,
        hashed_on,
        moved,
        lr,
        changed,
        changed_on,
        reborn,
        dataclasses.replace(reborn, device=None),
    ]


def test_the_schema_hash_survives_the_wire_with_int_bounds() -> None:
    assert isinstance(BUILTIN_SPECS["grad_accum_steps"].min, int)
    decoded = wire.decode_heartbeat(wire.encode(heartbeat(0, knobs=SPECS, knobs_hash=HASH)))
    assert knobs.schema_hash(decoded.knobs) == HASH


def test_the_fast_path_decodes_what_the_full_decode_does_and_folds_the_same() -> None:
    decoder = wire.HeartbeatDecoder()
    fast, full = WeaverState(), WeaverState()
    for i, hb in enumerate(_sequence()):
        data = wire.encode(hb)
        (got, sent), want = decoder.decode(data), wire.decode_heartbeat(data)
        assert got == want == hb and sent == bool(hb.knobs)
        liveness.observe_heartbeat(fast, got, float(i))
        liveness.observe_heartbeat(full, want, float(i))
        assert fast == full


def test_unchanged_parts_are_reused_and_changed_ones_decoded_again() -> None:
    decoder = wire.HeartbeatDecoder()
    full, hashed, hashed_again, moved, _, changed, changed_again, reborn, no_device = (
        decoder.decode(wire.encode(hb))[0] for hb in _sequence()
    )
    assert hashed_again.knob_values is hashed.knob_values  # the rest of the message unchanged: reused
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
    first, _ = decoder.decode(wire.encode(heartbeat(0, device=DEVICE)))
    decoder.decode(wire.encode(heartbeat(1, device=DEVICE)))
    decoder.decode(wire.encode(heartbeat(2, device=DEVICE)))
    again, _ = decoder.decode(wire.encode(heartbeat(0, device=DEVICE)))
    assert again == first and again.device is not first.device  # rank 0 was forgotten


def test_a_hash_only_heartbeat_gets_the_schema_its_receiver_knows_asked_once_per_change() -> None:
    """With `schema`, a hash-only heartbeat decodes with the schema the receiver knows for its
    hash, filled with its own values: asked when the hash or values change (a changed value makes
    a new spec for that knob only) and again while unknown; an unchanged heartbeat asks nothing."""
    known: dict[int, tuple[KnobSpec, ...]] = {}
    asked: list[int] = []

    def schema(job: str, rank: int, incarnation: str, digest: int) -> tuple[KnobSpec, ...] | None:
        asked.append(digest)
        return known.get(digest)

    decoder = wire.HeartbeatDecoder(schema=schema)
    values = {s.name: s.value for s in SPECS if s.value is not None}
    hashed = heartbeat(0, knobs_hash=HASH, knob_values=values)
    first, sent = decoder.decode(wire.encode(hashed))
    assert (first.knobs, sent, asked) == ((), False, [HASH])  # not known yet
    decoder.decode(wire.encode(dataclasses.replace(hashed, step=1)))
    assert asked == [HASH, HASH]  # asked again while unknown
    known[HASH] = tuple(dataclasses.replace(s, value=None) for s in SPECS)  # as the weaver keeps it
    filled, _ = decoder.decode(wire.encode(dataclasses.replace(hashed, step=2)))
    assert filled.knobs == SPECS and len(asked) == 3
    again, _ = decoder.decode(wire.encode(dataclasses.replace(hashed, step=3)))
    assert again.knobs is filled.knobs and len(asked) == 3  # nothing changed: not asked
    known[HASH] = filled.knobs  # a receiver that answers with the rank's last specs (the weaver)
    lr, _ = decoder.decode(wire.encode(dataclasses.replace(hashed, knob_values={**values, "lr": 5e-3})))
    assert len(asked) == 4 and {s.name: s.value for s in lr.knobs}["lr"] == 5e-3
    assert [a is b for a, b in zip(lr.knobs, filled.knobs, strict=True)] == [s.name != "lr" for s in SPECS]
    full, sent = decoder.decode(wire.encode(heartbeat(0, knobs=SPECS, knobs_hash=HASH)))
    assert full.knobs == SPECS and sent and len(asked) == 4  # sent in full: nothing to ask


def test_the_heartbeat_subject_test_agrees_with_the_pattern() -> None:
    prefix = subjects.heartbeats_all().removesuffix("*.*")
    for subject in (
        subjects.heartbeat("job", 3),
        subjects.heartbeat("a-b_c", 4095),
        f"{prefix}job",
        f"{prefix}job.3.x",
        f"{prefix}.3",
        f"{prefix}job.",
        f"{subjects.PREFIX}.metrics.job.3",
        f"x{prefix}job.3",
        "",
    ):
        assert heartbeat_subject(subject, prefix) == subjects.matches(subjects.heartbeats_all(), subject), (
            subject
        )
