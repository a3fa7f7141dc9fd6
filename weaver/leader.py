"""Which of several weavers on one NATS is active: a lease in a JetStream KV bucket.

The active weaver rewrites the key every `renew_s` with an update that expects the revision it wrote
last (optimistic concurrency: two weavers can never both renew one revision). A standby polls the key
and takes it over with the same conditional update, on the revision it saw, once that revision has
stood still for `stale_after_s`; it creates the key when there is none (first start, expired after
`ttl_s`, or deleted by an active weaver that stopped cleanly, so a rolling upgrade hands over at
once). An active weaver that cannot renew for `stale_after_s` steps down, since a standby may hold
the lease by then; the commands stream's expected-last-sequence check still fences its publishes.

Pure: `next_move`. I/O: `Leadership` (one loop, run by its owner's TaskGroup) and `StandbyBackend`,
the gRPC backend that serves through the active weaver's backend or refuses with `NotActive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from torchloom import bus
from torchloom.errors import NatsUnavailable
from torchloom.messages import (
    AgentRefusal,
    JobEvent,
    Outcome,
    PolicyReply,
    PolicyRequest,
    ProposalDecision,
    StatusReply,
    SubmitRequest,
    WatchEvent,
)
from weaver.grpc_api import ControlBackend

log = logging.getLogger(__name__)

LEASE_BUCKET = "TORCHLOOM_LEADER"
LEASE_KEY = "weaver"


class NotActive(NatsUnavailable):
    """This weaver is a standby: the request goes to the active weaver (`active`, "" when unknown)."""

    def __init__(self, active: str) -> None:
        where = f"the active weaver is at {active}" if active else "no weaver holds the lease yet"
        super().__init__(f"this weaver is a standby: {where}; retry there")
        self.active = active


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseConfig:
    """Timing of the lease.

    Attributes:
        renew_s: how often the active weaver rewrites the key.
        stale_after_s: a revision standing still this long is the lease of a dead weaver; an active
            weaver that could not renew for this long steps down.
        ttl_s: the bucket's max age: a key nobody renews disappears after this long.
        poll_s: how often a standby reads the key.
    """

    renew_s: float = 0.5
    stale_after_s: float = 1.5
    ttl_s: float = 2.0
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        for name in ("renew_s", "stale_after_s", "ttl_s", "poll_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 60):
                raise ValueError(f"{name}={value!r} rejected: must be in (0, 60] seconds")
        if not self.poll_s <= self.renew_s < self.stale_after_s <= self.ttl_s:
            raise ValueError(
                f"lease timing rejected: needs poll_s ({self.poll_s:g}) <= renew_s ({self.renew_s:g}) "
                f"< stale_after_s ({self.stale_after_s:g}) <= ttl_s ({self.ttl_s:g})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """The key's value: who holds the lease and where its gRPC Control service listens."""

    holder: str
    grpc: str

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "grpc": self.grpc}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Lease | None:
        """The lease in `raw`, or None when it is not one (then nobody is taken to hold it)."""
        try:
            data = json.loads(raw or b"")
            return cls(holder=str(data["holder"]), grpc=str(data["grpc"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Seen:
    """The key as a standby last read it: its lease and revision (0: no key), and since when (its
    monotonic clock) that revision has stood still."""

    lease: Lease | None
    revision: int
    since: float


class Move(StrEnum):
    CREATE = "create"  # no key: create it (fails if another weaver created it first)
    TAKE_OVER = "take_over"  # its revision stood still past stale_after_s: update on that revision
    WAIT = "wait"  # a live lease of another weaver


def next_move(me: str, seen: Seen, now: float, config: LeaseConfig) -> Move:
    """What a weaver that does not hold the lease does next (pure)."""
    if seen.revision == 0:
        return Move.CREATE
    if (seen.lease is not None and seen.lease.holder == me) or now - seen.since >= config.stale_after_s:
        return Move.TAKE_OVER
    return Move.WAIT


class Leadership:
    """Holds, or waits for, the lease of `identity`. Run `run()` in a TaskGroup; `elected` is set while
    this weaver holds the lease and `lost` when it stepped down (both are cleared on the next change).

    Args:
        js: JetStream of the weaver's NATS connection.
        identity: unique per process (host, pid and a random part).
        grpc: this weaver's gRPC address, published in the lease for clients to follow.
    """

    def __init__(self, js: JetStreamContext, identity: str, grpc: str, config: LeaseConfig) -> None:
        self._js = js
        self.me = Lease(holder=identity, grpc=grpc)
        self.config = config
        self.elected = asyncio.Event()
        self.lost = asyncio.Event()
        self.holder: Lease | None = None
        self._revision = 0
        self._kv: KeyValue | None = None

    @property
    def active_address(self) -> str:
        """The gRPC address of the weaver holding the lease, as last seen ("" when unknown)."""
        return self.holder.grpc if self.holder is not None else ""

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(LEASE_BUCKET)
            except BucketNotFoundError:
                self._kv = await self._js.create_key_value(
                    bucket=LEASE_BUCKET,
                    history=1,
                    ttl=self.config.ttl_s,
                    description="torchloom weaver lease",
                )
        return self._kv

    async def run(self) -> None:
        """Wait for the lease, hold it until it is lost, and again; until cancelled."""
        while True:
            bus.check_cancelled()
            try:
                await self._win()
                await self._hold()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or restarting: a lease needs NATS; try again
                log.warning("weaver lease: %s", exc)
                self._step_down()
                await asyncio.sleep(self.config.poll_s)

    async def _read(self, kv: KeyValue) -> tuple[Lease | None, int]:
        try:
            async with asyncio.timeout(self.config.renew_s * 2):
                entry = await kv.get(LEASE_KEY)
        except KeyNotFoundError:  # never written, expired, or deleted by a weaver that stopped
            return None, 0
        return Lease.decode(entry.value), entry.revision or 0

    async def _win(self) -> None:
        kv = await self._bucket()
        seen = Seen(lease=None, revision=-1, since=time.monotonic())
        while True:
            bus.check_cancelled()
            lease, revision = await self._read(kv)
            if revision != seen.revision:
                seen = Seen(lease=lease, revision=revision, since=time.monotonic())
                self.holder = lease
            move = next_move(self.me.holder, seen, time.monotonic(), self.config)
            try:
                async with asyncio.timeout(self.config.renew_s * 2):
                    if move is Move.CREATE:
                        self._revision = await kv.create(LEASE_KEY, self.me.encode())
                    elif move is Move.TAKE_OVER:
                        self._revision = await kv.update(LEASE_KEY, self.me.encode(), last=seen.revision)
            except KeyWrongLastSequenceError:  # another weaver moved first
                await asyncio.sleep(self.config.poll_s)
                continue
            if move is not Move.WAIT:
                was = seen.lease.grpc if seen.lease is not None else "nobody"
                log.info("weaver lease won (revision %d; held before by %s)", self._revision, was)
                self.holder = self.me
                self.lost.clear()
                self.elected.set()
                return
            await asyncio.sleep(self.config.poll_s)

    async def _hold(self) -> None:
        kv = await self._bucket()
        renewed = time.monotonic()
        while True:
            bus.check_cancelled()
            await asyncio.sleep(self.config.renew_s)
            try:
                async with asyncio.timeout(self.config.renew_s):
                    self._revision = await kv.update(LEASE_KEY, self.me.encode(), last=self._revision)
                renewed = time.monotonic()
            except KeyWrongLastSequenceError:
                log.warning("weaver lease lost: another weaver took it over")
                self._step_down()
                return
            except Exception as exc:
                if time.monotonic() - renewed >= self.config.stale_after_s:
                    log.warning(
                        "weaver lease lost: not renewed for %.1f s (%s)", time.monotonic() - renewed, exc
                    )
                    self._step_down()
                    return

    def _step_down(self) -> None:
        if self.elected.is_set():
            self.elected.clear()
            self.lost.set()
        if self.holder == self.me:
            self.holder = None

    async def release(self) -> None:
        """Give the lease up (delete the key if still ours) so a standby takes over at once."""
        if not self.elected.is_set() or self._kv is None:
            return
        self._step_down()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.config.renew_s):
                await self._kv.delete(LEASE_KEY, last=self._revision)


class StandbyBackend:
    """The gRPC backend of a weaver that may be a standby: it serves through `active` (the started
    weaver's backend) while this weaver holds the lease, and otherwise refuses every call with
    `NotActive` naming the active weaver, which the Control service answers as UNAVAILABLE."""

    def __init__(self) -> None:
        self.leadership: Leadership | None = None  # set once the service's address is known
        self.active: ControlBackend | None = None

    def _backend(self) -> ControlBackend:
        if self.active is None:
            raise NotActive(self.leadership.active_address if self.leadership is not None else "")
        return self.active

    async def submit(self, req: SubmitRequest) -> Outcome:
        return await self._backend().submit(req)

    def status(self, job: str = "") -> StatusReply:
        return self._backend().status(job)

    def iter_watch(self, job: str = "") -> AsyncIterator[WatchEvent]:
        return self._backend().iter_watch(job)

    def journal(
        self, job: str = "", *, follow: bool = False, run_id: str = "", command_id: str = ""
    ) -> AsyncIterator[Outcome | JobEvent]:
        backend = self._backend()
        if run_id or command_id:
            return backend.journal(job, follow=follow, run_id=run_id, command_id=command_id)
        return backend.journal(job, follow=follow)  # also a weaver without the run/command filters

    def set_policy(self, req: PolicyRequest) -> PolicyReply:
        return self._backend().set_policy(req)

    def get_policy(self, req: PolicyRequest) -> PolicyReply:
        return self._backend().get_policy(req)

    def decide_proposal(self, req: ProposalDecision, decided_by: str = "") -> JobEvent:
        return self._backend().decide_proposal(req, decided_by)

    async def submit_agent(self, req: SubmitRequest) -> Outcome:
        return await self._backend().submit_agent(req)

    def report_agent_refusal(self, identity: str, report: AgentRefusal) -> JobEvent:
        return self._backend().report_agent_refusal(identity, report)

    def refuse_call(self, message: str, *, job: str = "", key: str = "", **attrs: str) -> None:
        if self.active is not None:
            self.active.refuse_call(message, job=job, key=key, **attrs)
        else:  # a standby journals nothing; the log keeps the refusal
            log.warning("%s", message)
