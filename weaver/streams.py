"""The weaver's JetStream I/O: reading the journal and a run's commands, storing a command under the
run's expected last sequence, making each rank's command consumer, and the outbox that publishes
journal entries and events in order, each under a Nats-Msg-Id and retried until stored.

No decisions and no weaver state: `weaver.service` calls these and folds what they return into its
state through `weaver.submits` and `weaver.recovery`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from torchloom import bus, subjects, wire
from torchloom.errors import NatsUnavailable
from torchloom.messages import Ack, Command, JobEvent, Outcome
from weaver.admission import WEAVER_JOB

log = logging.getLogger(__name__)

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
_WRONG_LAST_SEQUENCE = 10071
# JetStream's error code for a stream the server does not have (not "no message found", 10037).
_STREAM_NOT_FOUND = 10059
# Outbound events waiting for JetStream; past this new events are dropped rather than held. Outcomes
# are never dropped: there is one per command, and the journal must hold each.
OUTBOX_SIZE = 10_000
# Pause between attempts to store the outbox's oldest message (a restarting server or stream leader).
_RETRY_WAIT_S = (0.1, 2.0)
# Rank consumers this weaver remembers having made (a repeat costs one idempotent request, no more).
RANK_CONSUMERS_REMEMBERED = 65_536
# After a job's stream was found missing, its new ranks wait this long before the next attempt (or
# until the weaver makes the stream for a command, which makes every rank's consumer at once).
_NO_STREAM_RETRY_S = 5.0


class SeqConflict(Exception):
    """Another writer stored a command on the run's subject since this weaver last looked."""


@dataclass(frozen=True, slots=True)
class StoredAcks:
    """A job's acks as the acks stream holds them (`Streams.stored_acks`).

    Attributes:
        acks: the job's acks stored since the time asked for, oldest first (malformed ones skipped).
        dropped_until_s: acks stored before this time (the server's clock) may be gone: the stream
            has removed its oldest messages (their age or its limits) up to there. 0.0: it never
            removed one.
    """

    acks: list[Ack]
    dropped_until_s: float


class Streams:
    """Reads and command writes on the weaver's JetStream streams, each under a deadline of `timeout_s`."""

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self.js = js
        self.timeout_s = timeout_s

    async def read(
        self,
        stream: str,
        subject: str,
        *,
        follow: bool,
        since_s: float | None = None,
        missing_ok: bool = True,
    ) -> AsyncIterator[Msg]:
        """Messages of `stream` matching `subject`, oldest first, through an ordered consumer; with
        `since_s`, those stored from that time on (the server's clock).

        Without `follow` it ends at the last matching message stored when it was called. A stream
        the server does not have reads as empty, unless not `missing_ok`.

        Raises:
            NatsUnavailable: not `missing_ok`, and the server has no such stream.
        """
        js, deadline = self.js, self.timeout_s
        last, newest_at = 0, None
        try:
            async with asyncio.timeout(deadline):
                newest = await js.get_last_msg(stream, subject)
            last, newest_at = newest.seq or 0, newest.time
        except NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND and not missing_ok:
                # Not an empty journal: a store that does not hold it (or a server that has not
                # loaded it) cannot tell what happened, and must not say "nothing".
                raise NatsUnavailable(f"the server has no {stream} stream") from None
        start = None if since_s is None else datetime.datetime.fromtimestamp(since_s, datetime.UTC)
        if not follow and (last == 0 or (start is not None and newest_at is not None and newest_at < start)):
            return  # nothing stored (since `since_s`) to wait for
        config = None
        if start is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        async with asyncio.timeout(deadline):
            sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
        try:
            while True:
                bus.check_cancelled()
                # Following waits for new entries as long as the reader wants them.
                msg = await sub.next_msg(timeout=None if follow else deadline)
                yield msg
                if not follow and msg.metadata.sequence.stream >= last:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def journal(self, job: str = "", *, follow: bool = False) -> AsyncIterator[Outcome | JobEvent]:
        """The durable journal: final command outcomes and job events, oldest first.

        Args:
            job: one job's entries, or every job's for "".
            follow: keep streaming new entries; otherwise end at the last entry stored now.

        Raises:
            ValueError: `job` is not a valid job name.
            NatsUnavailable: JetStream did not answer in time, or has no journal stream.
        """
        token = subjects.check_token("job", job) if job else "*"
        # Both journal.<job> and events.<job> and nothing else of the stream match this filter.
        subject = f"{subjects.PREFIX}.*.{token}"
        journal_prefix = subjects.journal_all()[:-1]
        try:
            async for msg in self.read(subjects.STREAM_JOURNAL, subject, follow=follow, missing_ok=False):
                try:
                    entry: Outcome | JobEvent
                    if msg.subject.startswith(journal_prefix):
                        entry = wire.decode_outcome(msg.data)
                    else:
                        entry = wire.decode_event(msg.data)
                except ValueError as exc:
                    log.warning("skipped a malformed journal entry on %s: %s", msg.subject, exc)
                    continue
                if (entry.job or WEAVER_JOB) != msg.subject.rsplit(".", 1)[1]:
                    # Not the weaver's (it files each entry under its own job): e.g. a JetStream answer
                    # or a copy of another stored message, aimed here as a reply subject, which
                    # nats-server does not check (docs/security.md, "Reply subjects").
                    log.warning("skipped a journal entry of job %r filed on %s", entry.job, msg.subject)
                    continue
                yield entry
        except TimeoutError as exc:
            raise NatsUnavailable(f"the journal stream did not answer within {self.timeout_s:g}s") from exc

    async def commands(self, job: str, run_id: str) -> list[tuple[Command, int]]:
        """Every stored command of a run with its stream sequence, oldest first; malformed ones skipped.

        Raises:
            NatsUnavailable: the commands stream did not answer in time.
        """
        commands: list[tuple[Command, int]] = []
        try:
            async for msg in self.read(
                subjects.stream_commands_of(job), subjects.commands(job, run_id), follow=False
            ):
                with contextlib.suppress(ValueError):
                    commands.append((wire.decode_command(msg.data), msg.metadata.sequence.stream))
        except TimeoutError as exc:
            raise NatsUnavailable(f"the commands stream did not answer for {job}: {exc}") from exc
        return commands

    async def stored_acks(self, job: str, *, since_s: float) -> StoredAcks:
        """The acks of `job` the acks stream stored from `since_s` on (the server's clock), and up to
        when it may have dropped some: what a restarted weaver completes its predecessor's commands
        from, whatever its durable consumer still delivers.

        Raises:
            NatsUnavailable: the acks stream did not answer in time.
        """
        acks: list[Ack] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                state = (await self.js.stream_info(subjects.STREAM_ACKS)).state
                dropped_until_s = 0.0
                if state.first_seq > 1 and state.messages == 0:
                    dropped_until_s = time.time()  # every ack it ever held is gone
                elif state.first_seq > 1:
                    first = await self.js.get_msg(subjects.STREAM_ACKS, seq=state.first_seq, next=True)
                    dropped_until_s = first.time.timestamp() if first.time is not None else time.time()
            async for msg in self.read(
                subjects.STREAM_ACKS, subjects.acks(job), follow=False, since_s=since_s
            ):
                with contextlib.suppress(ValueError):
                    acks.append(wire.decode_ack(msg.data))
        except TimeoutError as exc:
            raise NatsUnavailable(
                f"the acks stream did not answer for {job} within {self.timeout_s:g}s"
            ) from exc
        return StoredAcks(acks, dropped_until_s)

    async def last_command(self, job: str, run_id: str) -> tuple[int, int]:
        """`(seq, stream sequence)` of the run's last stored command; `(0, 0)` when it has none.

        Raises:
            NatsUnavailable: the stream could not be read.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.js.get_last_msg(
                    subjects.stream_commands_of(job), subjects.commands(job, run_id)
                )
        except NotFoundError:
            return 0, 0
        except Exception as exc:
            raise NatsUnavailable(f"cannot read the last command of {job}/{run_id}: {exc}") from exc
        return wire.decode_command(raw.data or b"").seq, raw.seq or 0

    async def commands_after(self, job: str, run_id: str, stream_seq: int) -> list[tuple[Command, int]]:
        """The run's stored commands after stream sequence `stream_seq`, oldest first, with theirs.

        Usually none or one: what another writer, or a publish of ours whose answer was lost, stored
        since the weaver last looked.

        Raises:
            NatsUnavailable: the stream could not be read.
        """
        subject = subjects.commands(job, run_id)
        found: list[tuple[Command, int]] = []
        seq = stream_seq
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    raw = await self.js.get_msg(
                        subjects.stream_commands_of(job), seq=seq + 1, subject=subject, next=True
                    )
            except NotFoundError:
                return found
            except Exception as exc:
                raise NatsUnavailable(f"cannot read the commands of {job}/{run_id}: {exc}") from exc
            seq = raw.seq or seq + 1
            with contextlib.suppress(ValueError):
                found.append((wire.decode_command(raw.data or b""), seq))

    async def store_command(
        self, cmd: Command, data: bytes, expected_stream_seq: int, *, stream: bus.JobCommands
    ) -> tuple[int, bool]:
        """Store `data`, the signed encoding of `cmd` (`Signer.encode_signed`), in the job's command
        `stream` (published on its secret capture subject, stored as `subjects.commands`), only if
        the run's subject still ends at `expected_stream_seq`.

        Returns:
            The stream sequence of the command and whether JetStream already held a message with
            its id (`Nats-Msg-Id` = command id: stored by an earlier attempt, nothing new stored).

        Raises:
            SeqConflict: another writer stored a command there first (the seq may be taken).
            NatsUnavailable: the command could not be stored.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                ack = await self.js.publish(
                    stream.subject(cmd.run_id),
                    data,
                    headers={
                        # The msg id lets JetStream drop a duplicate if this publish is ever retried.
                        "Nats-Msg-Id": cmd.command_id,
                        # Two weavers must never hand out the same seq: JetStream refuses the second.
                        "Nats-Expected-Last-Subject-Sequence": str(expected_stream_seq),
                    },
                )
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise SeqConflict(str(exc.description)) from exc
            raise NatsUnavailable(f"command #{cmd.seq} for {cmd.job} was not stored: {exc}") from exc
        except Exception as exc:
            raise NatsUnavailable(f"command #{cmd.seq} for {cmd.job} was not stored: {exc}") from exc
        return ack.seq, bool(ack.duplicate)


class RankConsumers:
    """Makes each rank process's command consumer (`bus.rank_consumer`): a threadlet may pull from
    it but may create no consumer, so no rank chooses a delivery subject (docs/security.md).

    A rank's consumer is made when its first heartbeat is admitted, if the job's command stream
    exists; otherwise right before the run's first command is stored (`ensure_run`). Failures are
    logged, never raised into the heartbeat path: the rank keeps asking, and the next command
    tries again.
    """

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self.js = js
        self.timeout_s = timeout_s
        self._made: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._no_stream_until: dict[str, float] = {}  # job -> monotonic time of the next attempt

    def wanted(self, job: str, run_id: str, rank: int, incarnation: str) -> bool:
        """Whether this rank's consumer is not known to exist and may be made now."""
        try:
            name = subjects.rank_consumer(run_id, rank, incarnation)
        except ValueError:
            return False  # admission keeps such a heartbeat out; never a consumer name
        return name not in self._made and time.monotonic() >= self._no_stream_until.get(job, 0.0)

    async def ensure(self, job: str, run_id: str, rank: int, incarnation: str) -> None:
        """Make the rank's consumer unless this weaver already did (a failure is logged)."""
        name = subjects.rank_consumer(run_id, rank, incarnation)
        if name in self._made:
            return
        self._made[name] = None  # claimed: a heartbeat meanwhile does not ask again
        try:
            async with asyncio.timeout(self.timeout_s):
                await bus.ensure_rank_consumer(self.js, job, run_id, rank, incarnation)
        except NotFoundError:
            del self._made[name]
            self._no_stream_until[job] = time.monotonic() + _NO_STREAM_RETRY_S
            return
        except Exception as exc:  # nats-py raises several types for "not now"
            del self._made[name]
            log.warning("could not make the command consumer of %s rank %d: %r", job, rank, exc)
            return
        while len(self._made) > RANK_CONSUMERS_REMEMBERED:
            self._made.popitem(last=False)

    def forget(self) -> None:
        """The connection to the server came back: the server may have restarted and lost every
        rank consumer (their state is in its memory, `bus.rank_consumer`), so each is made again at
        its rank's next heartbeat. Where it still exists, making it again changes nothing."""
        if self._made:
            log.info(
                "reconnected: the %d rank command consumers are made again at their next heartbeats",
                len(self._made),
            )
        self._made.clear()
        self._no_stream_until.clear()

    async def ensure_run(self, job: str, run_id: str, ranks: list[tuple[int, str]]) -> None:
        """Right after the job's stream was made for a command: the consumer of every `(rank,
        incarnation)` of the run, so each rank reads the command as soon as it is stored."""
        self._no_stream_until.pop(job, None)
        wanted = [(r, inc) for r, inc in ranks if self.wanted(job, run_id, r, inc)]
        await asyncio.gather(*(self.ensure(job, run_id, r, inc) for r, inc in wanted))


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One message to store: its `msg_id` makes a retried publish one stored message; `then` runs
    once it is stored (e.g. acknowledging the acks an outcome was made of)."""

    subject: str
    payload: bytes
    msg_id: str
    then: Callable[[], Awaitable[None]] | None = None


class Outbox:
    """Journal entries and events waiting to be published, in order, by one loop (`run`).

    A message that fails to publish is retried (same Nats-Msg-Id, so it is stored once) until it is
    stored, and the ones behind it wait: the journal keeps its order and loses nothing while a server
    restarts. Bounded: while JetStream is behind by `size` messages, new events are dropped (and
    logged); outcomes are always kept (one per command, bounded by the commands in flight).
    """

    def __init__(self, size: int = OUTBOX_SIZE) -> None:
        self._size = size
        self._queue: collections.deque[OutboxItem] = collections.deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str = "",
        keep: bool = False,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Queue a message without waiting. `msg_id` defaults to a fresh one; without `keep` the
        message is dropped when the outbox is full."""
        if not keep and len(self._queue) >= self._size:
            self.dropped += 1
            log.warning("outbox full: dropped a message for %s (%d so far)", subject, self.dropped)
            return
        self._queue.append(OutboxItem(subject, payload, msg_id or uuid.uuid4().hex, then))
        self._ready.set()

    async def run(self, publish: Callable[[OutboxItem], Awaitable[object]]) -> None:
        """Publish queued messages with `publish(item)`, oldest first, until cancelled."""
        wait = _RETRY_WAIT_S[0]
        while True:
            bus.check_cancelled()  # a publish's answer may have swallowed our cancellation
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            item = self._queue[0]
            try:
                await publish(item)
            except nats.errors.MaxPayloadError as exc:
                # Never storable, so never retried: it would hold every entry behind it forever.
                # Outcomes are bounded (`weaver.outcomes`), so this is a server with a small max_payload.
                log.error(
                    "dropped a %d-byte message for %s that the server refuses: %s",
                    len(item.payload),
                    item.subject,
                    exc,
                )
            except Exception as exc:  # not stored: the weaver keeps going and tries again
                log.warning("could not publish to %s (retrying in %.1fs): %s", item.subject, wait, exc)
                await asyncio.sleep(wait)
                wait = min(_RETRY_WAIT_S[1], wait * 2)
                continue
            wait = _RETRY_WAIT_S[0]
            self._queue.popleft()
            if item.then is not None:
                try:
                    await item.then()
                except Exception as exc:
                    log.warning("after publishing to %s: %s", item.subject, exc)
