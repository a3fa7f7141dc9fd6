"""Heartbeats carry the knob schema only when it changes (and every few seconds): otherwise its hash
and the current values, and the weaver fills the schema in from the last full heartbeat of the
same rank process. The threadlet's `Reporter`, the wire and the weaver's liveness fold, without a bus."""

from __future__ import annotations

import dataclasses

from tests.unit.factories import heartbeat, local_config
from threadlet import reports
from threadlet.optim_knobs import KnobBoard
from threadlet.reports import Reporter
from threadlet.state import RankContext, TrainingState
from torchloom import knobs, wire
from torchloom.messages import KnobSpec, KnobType, RankState
from weaver import liveness
from weaver.model import WeaverState

SPEC = KnobSpec(name="dropout", type=KnobType.FLOAT, min=0.0, max=1.0, description="p")


def test_schema_hash_ignores_values_and_sees_every_spec_change() -> None:
    base = knobs.schema_hash([SPEC])
    assert base == knobs.schema_hash([dataclasses.replace(SPEC, value=0.3)])
    assert base != knobs.schema_hash([dataclasses.replace(SPEC, max=0.9)])
    assert base != knobs.schema_hash([SPEC, dataclasses.replace(SPEC, name="other")])
    assert knobs.schema_hash([]) != 0


def test_reporter_sends_the_schema_when_it_changes_then_only_its_hash() -> None:
    board = KnobBoard(None, None)
    value = [0.1]
    board.register(SPEC, lambda: value[0], lambda v: None, None)
    now = [100.0]
    rep = Reporter(local_config(), RankContext.detect(), TrainingState(), board, None, clock=lambda: now[0])
    first = rep.status(RankState.RUNNING)
    assert [s.name for s in first.knobs] == ["dropout"] and first.knobs_hash == knobs.schema_hash(first.knobs)
    for _ in range(3):  # within the full window the schema keeps riding along
        assert rep.status(RankState.RUNNING).knobs
    rep.outbox._knobs_full_until = 0.0  # the window has passed
    value[0] = 0.2
    # The values are read again at most every KNOB_VALUES_PERIOD_S (a status step stays cheap)...
    assert rep.status(RankState.RUNNING).knob_values == {"dropout": 0.1}
    now[0] += reports.KNOB_VALUES_PERIOD_S  # ... which has passed
    later = rep.status(RankState.RUNNING)
    assert later.knobs == () and later.knobs_hash == first.knobs_hash
    assert later.knob_values == {"dropout": 0.2}
    value[0] = 0.3
    rep.status_due()  # a command changed knobs: read at the next status
    assert rep.status(RankState.RUNNING).knob_values == {"dropout": 0.3}
    assert wire.decode_heartbeat(wire.encode(later)) == later
    board.register(dataclasses.replace(SPEC, name="extra"), lambda: 1.0, lambda v: None, None)
    changed = rep.status(RankState.RUNNING)
    assert {s.name for s in changed.knobs} == {"dropout", "extra"} and changed.knobs_hash != first.knobs_hash


def test_weaver_fills_a_hash_only_heartbeat_from_the_rank_s_last_schema() -> None:
    state = WeaverState()
    spec = dataclasses.replace(SPEC, value=0.1)
    h = knobs.schema_hash([spec])
    liveness.observe_heartbeat(state, heartbeat(0, knobs=(spec,), knobs_hash=h), 1.0)
    liveness.observe_heartbeat(state, heartbeat(0, knobs_hash=h, knob_values={"dropout": 0.4}), 2.0)
    job = next(iter(state.jobs.values()))
    assert job.knobs == (dataclasses.replace(SPEC, value=0.4),)
    assert job.ranks[0].heartbeat.knobs == (dataclasses.replace(SPEC, value=0.4),)
    # An unknown hash (another schema, or a new process of the rank) fills nothing in.
    liveness.observe_heartbeat(state, heartbeat(0, knobs_hash=h + 1, knob_values={"dropout": 0.5}), 3.0)
    assert job.ranks[0].heartbeat.knobs == ()
    assert job.knobs == (dataclasses.replace(SPEC, value=0.4),)  # the job keeps the last schema it saw
    liveness.observe_heartbeat(state, heartbeat(1, knobs_hash=h, knob_values={"dropout": 0.4}), 3.0)
    assert job.ranks[1].heartbeat.knobs == ()


def test_unchanged_values_reuse_the_last_specs_and_a_change_of_type_does_not() -> None:
    state = WeaverState()
    spec = dataclasses.replace(SPEC, value=0.1)
    h = knobs.schema_hash([spec])
    liveness.observe_heartbeat(state, heartbeat(0, knobs=(spec,), knobs_hash=h), 1.0)
    job = next(iter(state.jobs.values()))
    first = job.ranks[0].heartbeat.knobs
    liveness.observe_heartbeat(state, heartbeat(0, knobs_hash=h, knob_values={"dropout": 0.1}), 2.0)
    assert job.ranks[0].heartbeat.knobs is first and job.knobs is first  # no new specs per heartbeat
    liveness.observe_heartbeat(state, heartbeat(0, knobs_hash=h), 3.0)  # a value not reported: kept
    assert job.ranks[0].heartbeat.knobs is first
    int_spec = dataclasses.replace(SPEC, name="accum", type=KnobType.INT, value=1)
    h2 = knobs.schema_hash([int_spec])
    liveness.observe_heartbeat(state, heartbeat(0, knobs=(int_spec,), knobs_hash=h2), 4.0)
    liveness.observe_heartbeat(state, heartbeat(0, knobs_hash=h2, knob_values={"accum": 1.0}), 5.0)
    assert type(job.ranks[0].heartbeat.knobs[0].value) is float  # 1.0 == 1, yet reported as a float
