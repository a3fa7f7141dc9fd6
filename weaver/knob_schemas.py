"""The knob schemas the ranks reported, kept across weaver restarts in a JetStream KV bucket.

A rank sends its knob schema in full only after it changes and every `_KNOBS_REFRESH_S`; between,
its heartbeats carry the schema's hash and the current values (`threadlet.reports`). A weaver that
just started (a restart, a standby taking over) knows no schema, so it could not check `set lr=...`
until each rank's next full report. `KnobSchemas` remembers every schema a rank sent in full, keyed
by job and hash, in memory and in the bucket; the new weaver asks the bucket for a hash it does not
know, off the heartbeat path and again every LOOKUP_RETRY_S until it has it (a bucket that does not
answer while a server restarts), so a rank's next heartbeat gives it the job's knobs.

I/O: `KnobSchemas`, owned by the `Weaver`, whose heartbeat path calls `remember` and `known` (no
I/O; the heartbeat decoder fills a hash-only heartbeat's schema in from `known`) and spawns `store`
and `fetch` (`want` says when).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from torchloom import knobs, wire
from torchloom.messages import Heartbeat, KnobSpec

log = logging.getLogger(__name__)

SCHEMA_BUCKET = "TORCHLOOM_KNOB_SCHEMAS"
SCHEMA_TTL_S = 30 * 24 * 3600.0  # a schema no weaver rewrote in a month is of no run still going
SCHEMA_BUCKET_BYTES = 16 * 1024 * 1024  # a few KiB per (job, schema): bounded against a flood
MEMORY_ENTRIES = 4096  # (job, hash) pairs kept in memory, oldest forgotten first
LOOKUP_TIMEOUT_S = 1.0
# A schema not found in the bucket (or a bucket not reachable: a server restarting) is asked for again
# after this long, never more often: a restarted weaver learns it as soon as the bucket answers.
LOOKUP_RETRY_S = 1.0


def schema_key(job: str, schema_hash: int) -> str:
    """The bucket key of a job's schema: `<job>.<hash as 16 hex digits>` (a job is a subject token)."""
    return f"{job}.{schema_hash & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class KnobSchemas:
    """Schemas by (job, hash): in memory, and in the `SCHEMA_BUCKET` KV bucket for the next weaver.

    Args:
        js: JetStream of the weaver's NATS connection.
        replicas: the bucket's replicas (the weaver's `replicas`).
        timeout_s: deadline of one bucket read or write.
    """

    def __init__(
        self, js: JetStreamContext, *, replicas: int = 1, timeout_s: float = LOOKUP_TIMEOUT_S
    ) -> None:
        self._js = js
        self._replicas = replicas
        self._timeout_s = timeout_s
        self._known: collections.OrderedDict[tuple[str, int], tuple[KnobSpec, ...]] = (
            collections.OrderedDict()
        )
        # (job, hash) -> when the bucket may be asked for it again (monotonic), oldest first.
        self._next_ask: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()
        self._kv: KeyValue | None = None

    def known(self, job: str, schema_hash: int) -> tuple[KnobSpec, ...] | None:
        """The schema of that hash, when this weaver has it in memory."""
        return self._known.get((job, schema_hash))

    def remember(self, hb: Heartbeat) -> bool:
        """Keep the schema of a heartbeat that carries it in full; True when it is new to this weaver
        (then the caller writes it to the bucket with `store(hb)`)."""
        key = (hb.job, hb.knobs_hash)
        if not hb.knobs or not hb.knobs_hash or key in self._known:
            return False
        if knobs.schema_hash(hb.knobs) != hb.knobs_hash:  # a hash that is not this schema's: keep neither
            return False
        self._keep(key, tuple(dataclasses.replace(s, value=None) for s in hb.knobs))
        return True

    def _keep(self, key: tuple[str, int], specs: tuple[KnobSpec, ...]) -> None:
        self._known[key] = specs
        while len(self._known) > MEMORY_ENTRIES:
            self._known.popitem(last=False)

    async def store(self, hb: Heartbeat) -> None:
        """Write the schema of `hb` to the bucket (a failure is logged: the bucket is an optimisation)."""
        specs = self._known.get((hb.job, hb.knobs_hash))
        if specs is None:
            return
        stored = Heartbeat(
            job=hb.job,
            run_id=hb.run_id,
            rank=0,
            world_size=0,
            incarnation="",
            knobs=specs,
            knobs_hash=hb.knobs_hash,
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                kv = await self._bucket()
                await kv.put(schema_key(hb.job, hb.knobs_hash), wire.encode(stored))
        except Exception as exc:  # NATS restarting, the bucket full: the next weaver waits for a report
            log.warning("could not store the knob schema of job %s: %r", hb.job, exc)

    def want(self, job: str, schema_hash: int) -> bool:
        """Whether to ask the bucket for this schema now: not in memory, and not asked within
        LOOKUP_RETRY_S (it is then marked asked). The caller runs `fetch` off the heartbeat path."""
        key = (job, schema_hash)
        if not schema_hash or key in self._known:
            return False
        now = time.monotonic()
        if self._next_ask.get(key, 0.0) > now:
            return False
        self._next_ask[key] = now + LOOKUP_RETRY_S
        self._next_ask.move_to_end(key)
        while len(self._next_ask) > MEMORY_ENTRIES:
            self._next_ask.popitem(last=False)
        return True

    async def fetch(self, job: str, schema_hash: int) -> None:
        """Read the schema of that hash from the bucket into memory (`known`); a miss or a failure
        leaves it unknown, to be asked for again (`want`)."""
        await self.lookup(job, schema_hash)

    async def lookup(self, job: str, schema_hash: int) -> tuple[KnobSpec, ...] | None:
        """The schema of that hash: from memory, else from the bucket (kept in memory when found);
        None when neither has it (a later ask, or the rank's next full report, brings it)."""
        key = (job, schema_hash)
        found = self._known.get(key)
        if found is not None or not schema_hash:
            return found
        try:
            async with asyncio.timeout(self._timeout_s):
                kv = await self._bucket()
                entry = await kv.get(schema_key(job, schema_hash))
            stored = wire.decode_heartbeat(entry.value or b"")
        except KeyNotFoundError:
            return None
        except Exception as exc:  # unreadable or unreachable: as if not stored
            log.warning("could not read the knob schema of job %s: %r", job, exc)
            return None
        # Only what this weaver wrote is in the bucket, but check that it is what was asked for.
        if stored.job != job or not stored.knobs or knobs.schema_hash(stored.knobs) != schema_hash:
            return None
        specs = tuple(dataclasses.replace(s, value=None) for s in stored.knobs)
        self._keep(key, specs)
        return specs

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(SCHEMA_BUCKET)
            except BucketNotFoundError:
                self._kv = await self._js.create_key_value(
                    bucket=SCHEMA_BUCKET,
                    history=1,
                    ttl=SCHEMA_TTL_S,
                    max_bytes=SCHEMA_BUCKET_BYTES,
                    replicas=self._replicas,
                    description="torchloom knob schemas by job and hash, for a restarted weaver",
                )
        return self._kv
