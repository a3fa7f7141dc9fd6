"""`weaver.knob_schemas`: bucket keys, filling a hash-only heartbeat, and the weaver's heartbeat path
filling it from the schemas it keeps."""

from __future__ import annotations

import dataclasses
import time

import pytest
from nats.aio.msg import Msg

from tests.unit.factories import JOB, heartbeat
from torchloom import knobs, subjects, wire
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import Heartbeat, KnobSpec
from weaver import knob_schemas
from weaver.config import WeaverConfig
from weaver.knob_schemas import KnobSchemas, schema_key
from weaver.service import Weaver

SPECS = (BUILTIN_SPECS["lr"], BUILTIN_SPECS["weight_decay"])


def test_the_key_is_the_job_and_the_hash_in_16_hex_digits() -> None:
    assert schema_key("job-a", 1) == "job-a.0000000000000001"
    assert schema_key("j", knobs.schema_hash(SPECS)).split(".")[1] == f"{knobs.schema_hash(SPECS):016x}"


def test_a_hash_only_heartbeat_gets_the_schema_with_its_own_values() -> None:
    hb = Heartbeat(
        job="j", run_id="r", rank=0, world_size=1, incarnation="i",
        knobs_hash=knobs.schema_hash(SPECS), knob_values={"lr": 0.5},
    )  # fmt: skip
    kept = tuple(dataclasses.replace(s, value=None) for s in SPECS)  # as `KnobSchemas` keeps them
    asked: list[tuple[str, int, str, int]] = []

    def known(job: str, rank: int, incarnation: str, digest: int) -> tuple[KnobSpec, ...]:
        asked.append((job, rank, incarnation, digest))
        return kept

    decoder = wire.HeartbeatDecoder(schema=known)
    filled, sent = decoder.decode(wire.encode(hb))
    assert not sent and asked == [("j", 0, "i", hb.knobs_hash)]
    assert [s.name for s in filled.knobs] == ["lr", "weight_decay"]
    assert {s.name: s.value for s in filled.knobs} == {"lr": 0.5, "weight_decay": None}
    assert knobs.schema_hash(filled.knobs) == hb.knobs_hash
    again, _ = decoder.decode(wire.encode(dataclasses.replace(hb, step=1)))
    assert again.knobs is filled.knobs and len(asked) == 1  # same hash and values: not asked again


# ---- the weaver's heartbeat path ------------------------------------------------------------------


def _msg(hb: Heartbeat) -> Msg:
    return Msg(_client=None, subject=subjects.heartbeat(hb.job, hb.rank), data=wire.encode(hb))  # type: ignore[arg-type]


def _lr_in_status(weaver: Weaver) -> object:
    (job,) = weaver.status(JOB).jobs
    return job.ranks[0].knobs.get("lr")


async def test_a_schema_lost_from_a_ranks_last_heartbeat_comes_back_from_the_weavers_memory() -> None:
    """A rank sends its schema in full only after a change and every 30 s, so a weaver cannot count
    on its last heartbeat having it: after one without the schema (another holder of the job's
    credential sent it, with the rank's incarnation), the rank's next hash-only heartbeat is filled
    from the schemas the weaver keeps by hash, not left without knobs until the next full one."""
    weaver = Weaver(WeaverConfig(nats_url="nats://127.0.0.1:1"))
    weaver._schemas = KnobSchemas(None)  # type: ignore[arg-type]  # memory only: no bucket is asked
    specs = tuple(dataclasses.replace(s, value=v) for s, v in zip(SPECS, (0.25, 0.01), strict=True))
    digest = knobs.schema_hash(specs)
    await weaver.telemetry.on_heartbeat(_msg(heartbeat(0, world=1, knobs=specs, knobs_hash=digest)))
    assert _lr_in_status(weaver) == 0.25
    await weaver.telemetry.on_heartbeat(_msg(heartbeat(0, world=1)))  # no schema, no hash, no values
    assert _lr_in_status(weaver) is None
    hash_only = heartbeat(0, world=1, knobs_hash=digest, knob_values={"lr": 0.5, "weight_decay": 0.01})
    await weaver.telemetry.on_heartbeat(_msg(hash_only))
    assert _lr_in_status(weaver) == 0.5


def test_an_unknown_schema_is_asked_for_again_each_second_not_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One failed bucket read (a server restarting) must not leave a restarted weaver without the
    schema until the rank's next full report: it asks again after LOOKUP_RETRY_S, never sooner."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    schemas = KnobSchemas(None)  # type: ignore[arg-type]  # `want` does no I/O
    assert schemas.want("j", 7)
    assert not schemas.want("j", 7)  # asked just now
    now[0] += knob_schemas.LOOKUP_RETRY_S / 2
    assert not schemas.want("j", 7)
    now[0] += knob_schemas.LOOKUP_RETRY_S
    assert schemas.want("j", 7)  # the last ask found nothing: again
    assert not schemas.want("j", 0)  # no hash: no schema to ask for
    full = heartbeat(0, world=1, knobs=SPECS, knobs_hash=knobs.schema_hash(SPECS))
    assert schemas.remember(full)
    now[0] += 10 * knob_schemas.LOOKUP_RETRY_S
    assert not schemas.want("j", knobs.schema_hash(SPECS))  # known: never asked
