"""A restarted weaver knows the knob schema a rank sent its predecessor (`weaver.knob_schemas`): the
ranks' heartbeats carry only the schema's hash most of the time, and the first such heartbeat after a
restart gives the new weaver the job's knobs, so a `set lr=...` right after a takeover is checked
against them, never refused as an unknown knob nor answered "not ready" until the next full report.

The test plays the ranks by publishing real heartbeats; the weavers are real, on a real nats-server.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tests.integration.helpers import until, weaver_config
from torchloom import knobs, subjects, wire
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import Heartbeat, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver

JOB = "schemas"
RUN = "run1"
KNOBS = (dataclasses.replace(BUILTIN_SPECS["lr"], value=0.01),)


def _heartbeat(*, full: bool) -> Heartbeat:
    return Heartbeat(
        job=JOB,
        run_id=RUN,
        rank=0,
        world_size=1,
        incarnation="inc-0",
        step=3,
        sent_at_s=time.time(),
        knobs=KNOBS if full else (),
        knobs_hash=knobs.schema_hash(KNOBS),
        knob_values={} if full else {"lr": 0.02},
    )


async def test_a_restarted_weaver_gets_the_schema_from_a_hash_only_heartbeat(
    nats_server: EmbeddedNats, nc: Any
) -> None:
    async def knobs_of(client: ControlClient) -> dict[str, object]:
        try:
            reply = await client.status(JOB)
        except JobNotFound:
            return {}
        return {k.name: k.value for k in reply.jobs[0].knobs}

    async with open_weaver(weaver_config(nats_server)) as w1, ControlClient(w1.grpc_address) as client:

        async def full_schema_seen() -> bool:
            await nc.publish(subjects.heartbeat(JOB, 0), wire.encode(_heartbeat(full=True)))
            return "lr" in await knobs_of(client)

        await until("the first weaver knowing lr", full_schema_seen)
        # Stored by a task of the weaver: its bucket entry is there once the key can be read back.
        schemas = w1.weaver._schemas
        assert schemas is not None

        async def stored() -> bool:
            try:  # the weaver makes the bucket in the background: it may not exist yet either
                kv = await nc.jetstream().key_value("TORCHLOOM_KNOB_SCHEMAS")
                await kv.get(f"{JOB}.{knobs.schema_hash(KNOBS):016x}")
            except Exception:
                return False
            return True

        await until("the schema stored", stored)

    async with open_weaver(weaver_config(nats_server)) as w2, ControlClient(w2.grpc_address) as client:
        # Only hash-only heartbeats from here on: the schema must come from the bucket.
        async def hash_only_seen() -> bool:
            await nc.publish(subjects.heartbeat(JOB, 0), wire.encode(_heartbeat(full=False)))
            return await knobs_of(client) == {"lr": 0.02}

        await until("the restarted weaver knowing lr from a hash", hash_only_seen)
        out = await client.submit(
            SubmitRequest(job=JOB, body=SetConfig(values={"lr": "0.03"}), command_id="c1", timeout_s=0.2)
        )
        # Validated and sent (no rank acks here, so it times out in flight), not refused.
        assert out.status is OutcomeStatus.TIMEOUT, out
        assert out.command is not None and out.command.body == SetConfig(values={"lr": 0.03})


async def test_a_heartbeat_whose_hash_is_not_its_schema_is_not_kept(
    nats_server: EmbeddedNats, nc: Any
) -> None:
    forged = dataclasses.replace(_heartbeat(full=True), knobs_hash=12345)
    async with open_weaver(weaver_config(nats_server)) as w1:
        schemas = w1.weaver._schemas
        assert schemas is not None
        assert not schemas.remember(forged)
        assert schemas.known(JOB, 12345) is None
        assert await schemas.lookup(JOB, 12345) is None
