"""The weaver's JetStream I/O: reading the journal and a run's commands, storing a command under the
run's expected last sequence, and the outbox that publishes journal entries and events in order.

No decisions and no weaver state: `weaver.service` calls these and folds what they return into its
state through `weaver.submits` and `weaver.recovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from torchloom import subjects, wire
from torchloom.errors import NatsUnavailable
from torchloom.messages import Command, JobEvent, Outcome

log = logging.getLogger(__name__)

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
_WRONG_LAST_SEQUENCE = 10071
# Outbound journal/event publishes waiting for JetStream; past this we drop rather than grow.
OUTBOX_SIZE = 10_000


class SeqConflict(Exception):
    """Another writer stored a command on the run's subject since this weaver last looked."""


class Streams:
    """Reads and command writes on the weaver's JetStream streams, each under a deadline of `timeout_s`."""

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self.js = js
        self.timeout_s = timeout_s

    async def read(self, stream: str, subject: str, *, follow: bool) -> AsyncIterator[Msg]:
        """Messages of `stream` matching `subject`, oldest first, through an ordered consumer.

        Without `follow` it ends at the last matching message stored when it was called.
        """
        js, deadline = self.js, self.timeout_s
        try:
            async with asyncio.timeout(deadline):
                last = (await js.get_last_msg(stream, subject)).seq or 0
        except NotFoundError:
            last = 0
        if last == 0 and not follow:
            return
        async with asyncio.timeout(deadline):
            sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        try:
            while True:
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
            NatsUnavailable: JetStream did not answer in time.
        """
        token = subjects.check_token("job", job) if job else "*"
        # Both journal.<job> and events.<job> and nothing else of the stream match this filter.
        subject = f"{subjects.PREFIX}.*.{token}"
        journal_prefix = subjects.journal_all()[:-1]
        try:
            async for msg in self.read(subjects.STREAM_JOURNAL, subject, follow=follow):
                try:
                    if msg.subject.startswith(journal_prefix):
                        yield wire.decode_outcome(msg.data)
                    else:
                        yield wire.decode_event(msg.data)
                except ValueError as exc:
                    log.warning("skipped a malformed journal entry on %s: %s", msg.subject, exc)
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
                subjects.STREAM_COMMANDS, subjects.commands(job, run_id), follow=False
            ):
                with contextlib.suppress(ValueError):
                    commands.append((wire.decode_command(msg.data), msg.metadata.sequence.stream))
        except TimeoutError as exc:
            raise NatsUnavailable(f"the commands stream did not answer for {job}: {exc}") from exc
        return commands

    async def last_command(self, job: str, run_id: str) -> tuple[int, int]:
        """`(seq, stream sequence)` of the run's last stored command; `(0, 0)` when it has none.

        Raises:
            NatsUnavailable: the stream could not be read.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.js.get_last_msg(subjects.STREAM_COMMANDS, subjects.commands(job, run_id))
        except NotFoundError:
            return 0, 0
        except Exception as exc:
            raise NatsUnavailable(f"cannot read the last command of {job}/{run_id}: {exc}") from exc
        return wire.decode_command(raw.data or b"").seq, raw.seq or 0

    async def store_command(self, cmd: Command, expected_stream_seq: int) -> int:
        """Store `cmd` in JetStream, only if the run's subject still ends at `expected_stream_seq`.

        Returns:
            The stream sequence JetStream gave the command.

        Raises:
            SeqConflict: another writer stored a command there first (the seq may be taken).
            NatsUnavailable: the command could not be stored.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                ack = await self.js.publish(
                    subjects.commands(cmd.job, cmd.run_id),
                    wire.encode(cmd),
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
        return ack.seq


class Outbox:
    """Journal entries and events waiting to be published, in order, by one loop (`run`).

    Bounded: when JetStream falls behind by `size` messages, new ones are dropped (and logged) rather
    than held without limit. Publishing is best effort; a failed publish is logged and skipped.
    """

    def __init__(self, size: int = OUTBOX_SIZE) -> None:
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(size)

    def put(self, subject: str, payload: bytes) -> None:
        """Queue a message without waiting; drop it when the outbox is full."""
        try:
            self._queue.put_nowait((subject, payload))
        except asyncio.QueueFull:
            log.warning("outbox full: dropped a message for %s", subject)

    async def run(self, publish: Callable[[str, bytes], Awaitable[object]]) -> None:
        """Publish queued messages with `publish(subject, payload)` until cancelled."""
        while True:
            subject, payload = await self._queue.get()
            try:
                await publish(subject, payload)
            except Exception as exc:  # the journal is best effort; the weaver must keep going
                log.warning("could not publish to %s: %s", subject, exc)
