"""The NATS connection as every torchloom component opens it, and the JetStream streams it needs.

Connections reconnect forever with a short wait, so a restarting server costs seconds, not the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from torchloom import subjects
from torchloom.credentials import ClientAuth
from torchloom.errors import NatsRefused, NatsUnavailable
from torchloom.private_files import redact_url

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]

# Retention of the durable streams: the journal is an audit trail, so keep it long.
COMMANDS_MAX_AGE_S = 30 * 24 * 3600.0
JOURNAL_MAX_AGE_S = 90 * 24 * 3600.0
# Every stream is bounded in bytes and messages too, so no flood fills the store (oldest dropped first).
JOURNAL_MAX_MSGS = 10_000_000
JOURNAL_MAX_BYTES = 4 * 1024 * 1024 * 1024
COMMANDS_MAX_MSGS = 1_000_000
COMMANDS_MAX_BYTES = 1024 * 1024 * 1024
ACKS_MAX_MSGS = 10_000_000
# Acks matter until their command's outcome is journaled (seconds to minutes); a day covers a weaver
# that stays down a long time, the byte cap a flood.
ACKS_MAX_AGE_S = 24 * 3600.0
ACKS_MAX_BYTES = 1024 * 1024 * 1024
# JetStream stores a message once per Nats-Msg-Id within this window: a retried publish of a command,
# an ack or a journal entry (or a restarted weaver completing the same outcome) is not stored twice.
DUPLICATE_WINDOW_S = 120.0
# A job's command stream is bounded so one job's flood cannot fill the store (oldest dropped first).
JOB_COMMANDS_MAX_MSGS = 100_000
JOB_COMMANDS_MAX_BYTES = 256 * 1024 * 1024
# A rank's command consumer (`rank_consumer`): an unacknowledged delivery (a pull whose answer was lost)
# comes again after this; the rank drops a repeat by its seq.
RANK_CONSUMER_ACK_WAIT_S = 5.0
# A consumer nobody pulled from this long belongs to a process that is gone: the server deletes it.
RANK_CONSUMER_INACTIVE_S = 3600.0
# JetStream's error code when a consumer of that name exists with another config.
_CONSUMER_EXISTS = 10148


def check_cancelled() -> None:
    """Raise CancelledError when the current task's cancellation was swallowed by an await.

    nats-py waits for every request's answer with `asyncio.wait_for`, which on Python 3.11 returns
    the answer and drops a cancellation that arrives as the answer does (CPython gh-86296, fixed in
    3.12): the task goes on with `cancelling()` still set, and a loop that then waits on an event
    waits forever (a weaver's close hung so, once in a few dozen restarts). Every long-lived loop
    that makes NATS requests calls this once per turn, so a cancelled loop always stops.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 2.0,
    reconnect_wait_s: float = 0.25,
    on_disconnected: Callback | None = None,
    on_reconnected: Callback | None = None,
    credentials: ClientAuth | None = None,
    on_error: ErrorCallback | None = None,
) -> Client:
    """Open a NATS connection that reconnects forever.

    Args:
        credentials: how to authenticate (the role's nkey seed file and inbox prefix); None connects
            as the URL says (anonymous, or `user:pass@` inside the URL for a user's own server).
        on_error: called with each asynchronous error, e.g. a permissions violation the server
            reports for a publish or subscribe this role may not make.

    Raises:
        NatsUnavailable: when the first connection cannot be made before `connect_timeout_s`.
    """

    last_error: list[Exception] = []
    refused: list[Exception] = []  # an "Authorization Violation" (nats-py raises it as a plain Error too)

    async def _error(exc: Exception) -> None:
        log.debug("nats %s: %s", name, redact_url(str(exc)))
        last_error[:] = [exc]
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower():
            refused[:] = [exc]
        if on_error is not None:
            await on_error(exc)

    async def _noop() -> None:
        return None

    try:
        async with asyncio.timeout(connect_timeout_s + 1.0):
            return await nats.connect(
                # A cluster is a comma-separated list (nats://a:4222,nats://b:4222): connect to any.
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                connect_timeout=connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_wait_s,
                ping_interval=5,
                max_outstanding_pings=2,
                error_cb=_error,
                disconnected_cb=on_disconnected or _noop,
                reconnected_cb=on_reconnected or _noop,
                **(credentials.nats_options() if credentials is not None else {}),
            )
    except Exception as exc:  # nats raises several unrelated types for "cannot connect"
        why = redact_url(str(exc)) or type(exc).__name__
        if last_error:  # e.g. "Authorization Violation" when the credentials are missing or wrong
            why += f" (last error: {redact_url(str(last_error[0])) or type(last_error[0]).__name__})"
        if refused:
            raise NatsRefused(
                f"NATS at {redact_url(url)} refused the credentials: {redact_url(str(refused[0]))}"
            ) from exc
        raise NatsUnavailable(f"cannot reach NATS at {redact_url(url)}: {why}") from exc


def _stream(
    name: str,
    captures: list[str],
    *,
    max_age_s: float,
    replicas: int,
    description: str,
    max_msgs: int | None = None,
    max_bytes: int | None = None,
    transform: SubjectTransform | None = None,
    republish: RePublish | None = None,
) -> StreamConfig:
    """A file-backed stream that drops its oldest messages at its limits and deduplicates retries."""
    return StreamConfig(
        name=name,
        subjects=captures,
        subject_transform=transform,
        republish=republish,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_msgs=max_msgs,
        max_bytes=max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
        description=description,
    )


# The journal and acks streams publish every message they store again, on its stored (public) subject:
# `journal.<job>`, `events.<job>`, `ack.<job>`. Live readers (the web page, taps) subscribe there and
# see exactly what is stored, once; nats-server publishes the copy, so no role needs the right to.
_PUBLIC_COPY = RePublish(
    src=f"{subjects.PREFIX}.*.*", dest=f"{subjects.PREFIX}." + "{{wildcard(1)}}.{{wildcard(2)}}"
)
_CAPTURE_TOKEN_BYTES = 16
# The acks stream captures the ack subject of this many jobs at most (the newest; the weaver adds a
# job's when it makes the job's first command of its life): a config update must fit in one message.
ACKS_MAX_CAPTURES = 4096
# The acks stream needs a subject before any job has one (without, nats-server would capture the
# stream's name): an ack capture of this job name with a random token nobody is told.
_ACKS_PLACEHOLDER_JOB = "_"


@dataclass(frozen=True, slots=True)
class JournalStream:
    """The journal stream as its rightful publishers write to it.

    TORCHLOOM_JOURNAL captures only `subjects.journal_capture(token, ...)` (the weaver's outcomes and
    events, the launchers' events) and stores each entry under its public subject (`journal.<job>`,
    `events.<job>`; a stream subject transform), where every reader reads and where nats-server
    publishes it again for live readers. `token` is random per stream and readable only by the weaver
    and launcher roles (the stream's config): nobody else can have anything stored in the journal, not
    even an answer aimed there through a reply subject (docs/security.md, "Reply subjects").
    """

    token: str

    def subject(self, public: str) -> str:
        """Where to publish what the journal stores as `public` (a subject or pattern of
        `subjects.journal`/`subjects.events`)."""
        return subjects.journal_capture(self.token, public)


def journal_stream(token: str, *, replicas: int = 1) -> StreamConfig:
    """The config of the journal stream whose capture token is `token` (see `JournalStream`)."""
    return _stream(
        subjects.STREAM_JOURNAL,
        [
            subjects.journal_capture(token, subjects.journal_all()),
            subjects.journal_capture(token, subjects.events_all()),
        ],
        max_age_s=JOURNAL_MAX_AGE_S,
        max_msgs=JOURNAL_MAX_MSGS,
        max_bytes=JOURNAL_MAX_BYTES,
        replicas=replicas,
        description="torchloom: command outcomes and job events (the audit trail)",
        transform=SubjectTransform(src=subjects.journal_capture_root(token), dest=f"{subjects.PREFIX}.>"),
        republish=_PUBLIC_COPY,
    )


def acks_stream(captures: list[str], *, replicas: int = 1) -> StreamConfig:
    """The config of the acks stream capturing `captures` (`subjects.ack_capture` of each job the weaver
    gave a token), each stored as `subjects.acks(job)`."""
    return _stream(
        subjects.STREAM_ACKS,
        captures,
        max_age_s=ACKS_MAX_AGE_S,
        max_msgs=ACKS_MAX_MSGS,
        max_bytes=ACKS_MAX_BYTES,
        replicas=replicas,
        description="torchloom: every rank's acks, until the weaver has journaled their outcomes",
        transform=SubjectTransform(
            src=subjects.ack_captures_all(), dest=subjects.acks("{{wildcard(2)}}", check=False)
        ),
        republish=_PUBLIC_COPY,
    )


def _journal_token_of(config: StreamConfig) -> str | None:
    """The capture token of an existing journal stream, None for another layout (an older version's
    stream captured the public subjects themselves)."""
    captured = config.subjects or []
    head = f"{subjects.PREFIX}.wj."
    token = captured[0].removeprefix(head).partition(".")[0] if captured else ""
    try:
        expected = journal_stream(token)
    except ValueError:
        return None
    same = (
        sorted(captured) == sorted(expected.subjects or [])
        and config.subject_transform == expected.subject_transform
    )
    return token if same else None


def _ack_captures_of(config: StreamConfig) -> list[str]:
    """The ack capture subjects of an existing acks stream, in its order ([] for an older layout)."""
    if config.subject_transform is None:
        return []
    return [s for s in config.subjects or [] if subjects.matches(subjects.ack_captures_all(), s)]


async def ensure_streams(
    js: JetStreamContext, *, replicas: int = 1, shared_commands: bool = True
) -> JournalStream:
    """Create (or update) the journal and acks streams, and the shared command stream; idempotent.
    An existing journal stream keeps its capture token and the acks stream the jobs it captures;
    streams in an older layout (capturing the public subjects) are given their capture subjects.

    Args:
        shared_commands: also the one TORCHLOOM_COMMANDS stream for every job. False leaves the
            commands to per-job streams (`ensure_job_commands`), which role permissions can name.

    Returns:
        The journal stream, for its capture subjects.

    Raises:
        NatsUnavailable: the server took the journal without its subject transform (nats-server
            older than 2.10).
    """
    token = await _ensure_tokened(
        js, subjects.STREAM_JOURNAL, lambda t: journal_stream(t, replicas=replicas), _journal_token_of
    )
    await _ensure_acks(js, replicas)
    if shared_commands:
        shared = _stream(
            subjects.STREAM_COMMANDS,
            [subjects.commands_all()],
            max_age_s=COMMANDS_MAX_AGE_S,
            max_msgs=COMMANDS_MAX_MSGS,
            max_bytes=COMMANDS_MAX_BYTES,
            replicas=replicas,
            description="torchloom: every validated command, per job and run",
        )
        await _add_or_update(js, shared)
    return JournalStream(token=token)


_ACKS_KEPT_FIELDS = ("max_age", "max_msgs", "max_bytes", "duplicate_window", "subject_transform", "republish")


async def _ensure_acks(js: JetStreamContext, replicas: int) -> None:
    """Make the acks stream, or give one of an older layout its capture subjects; an existing one is
    written only when its limits or layout changed, keeping its jobs' captures. So while a weaver
    runs, only its `ensure_ack_capture` writes that list (a standby starting does not undo an add)."""
    try:
        config: StreamConfig | None = (await js.stream_info(subjects.STREAM_ACKS)).config
    except NotFoundError:
        config = None
    captures = _ack_captures_of(config) if config is not None else []
    placeholder = subjects.ack_capture(secrets.token_hex(_CAPTURE_TOKEN_BYTES), _ACKS_PLACEHOLDER_JOB)
    wanted = acks_stream(captures or [placeholder], replicas=replicas)
    if config is None:
        await _add_or_update(js, wanted)
    elif not captures or any(getattr(config, f) != getattr(wanted, f) for f in _ACKS_KEPT_FIELDS):
        await js.update_stream(wanted)


async def journal_of(js: JetStreamContext) -> JournalStream | None:
    """The journal stream's capture token as the stream holds it (stream info: the weaver and launcher
    roles only); None when there is no journal stream yet, or one of an older layout.

    Raises:
        NotFoundError: there is no journal stream (no weaver has started on this server yet).
    """
    token = _journal_token_of((await js.stream_info(subjects.STREAM_JOURNAL)).config)
    return None if token is None else JournalStream(token=token)


class EventPublisher:
    """Publishes job events where the journal stores them, for a process that is not the weaver (the
    control plane's own events, a launcher's): on the journal's capture subject, whose token it reads
    once from the stream (a launcher role may read that stream's info and nothing else of
    JetStream), so its events are stored whether or not a weaver is up. Until it could read one (no
    journal stream yet: no weaver has started on this server; or no answer) an event goes to its
    public subject, seen live and stored nowhere, and the next event asks again after `retry_s`.

    Args:
        nc: the process's connection (weaver or launcher role).
        timeout_s: the deadline of reading the token.
    """

    def __init__(self, nc: Client, *, timeout_s: float = 2.0, retry_s: float = 5.0) -> None:
        self._nc = nc
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._journal: JournalStream | None = None
        self._asked_at = -float("inf")

    async def _capture(self, public: str) -> str:
        if self._journal is None and time.monotonic() - self._asked_at >= self._retry_s:
            self._asked_at = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_s):
                    self._journal = await journal_of(self._nc.jetstream())
            except Exception as exc:  # none yet, or not now (a restarting server): the public subject
                log.debug("could not read the journal stream's capture subject: %r", exc)
        return public if self._journal is None else self._journal.subject(public)

    async def publish(self, job: str, data: bytes) -> None:
        """Publish an encoded JobEvent of `job` (core NATS, as every event)."""
        await self._nc.publish(await self._capture(subjects.events(job)), data)


@dataclass(frozen=True, slots=True)
class JobCommands:
    """One job's command stream as the weaver writes to it.

    The stream captures only `subjects.commands_capture(token, job)` and stores each message under
    `subjects.commands(job, run)` (a stream subject transform, nats-server 2.10 or later), which is
    what ranks, history and replays read. `token` is random per stream and readable only by the
    weaver role (the stream's config): no other client can aim a publish, or a JetStream answer to a
    reply subject of its choosing, at a subject this stream stores.
    """

    stream: str
    job: str
    token: str

    def subject(self, run_id: str) -> str:
        """Where the weaver publishes a command of run `run_id` (stored as `commands(job, run_id)`)."""
        return subjects.command_capture(self.token, self.job, run_id)

    @property
    def ack_token(self) -> str:
        """The job's ack token: the ranks publish their acks on `subjects.ack_capture(ack_token, job)`
        (each signed command carries it). Derived one way from the stream's token, so every weaver
        computes the same one and a rank, which knows it, learns nothing of the command token."""
        digest = hashlib.sha256(f"torchloom ack token\0{self.job}\0{self.token}".encode()).hexdigest()
        return digest[: 2 * _CAPTURE_TOKEN_BYTES]


def job_commands_stream(job: str, token: str, *, replicas: int = 1) -> StreamConfig:
    """The config of one job's command stream: captures `subjects.commands_capture(token, job)`,
    stores `subjects.commands_of(job)`; bounded, deduplicating (see `JobCommands`).

    It cannot coexist with the shared TORCHLOOM_COMMANDS stream (both store the job's subjects):
    a weaver uses either that one (`ensure_streams`) or one per job (`ensure_job_commands`).
    """
    capture = subjects.commands_capture(token, job)
    return _stream(
        subjects.stream_commands_of(job),
        [capture],
        max_age_s=COMMANDS_MAX_AGE_S,
        max_msgs=JOB_COMMANDS_MAX_MSGS,
        max_bytes=JOB_COMMANDS_MAX_BYTES,
        replicas=replicas,
        description=f"torchloom: the validated commands of job {job}, every run",
        transform=SubjectTransform(src=capture, dest=subjects.commands(job, "{{wildcard(1)}}", check=False)),
    )


def _token_of(config: StreamConfig, job: str) -> str | None:
    """The capture token of an existing job command stream, None for another layout (an older
    version's stream captured the public subjects themselves)."""
    captured = config.subjects or []
    transform = config.subject_transform
    if len(captured) != 1 or transform is None:
        return None
    head, _, rest = captured[0].partition(".wcmd.")
    token, _, tail = rest.partition(".")
    if head != subjects.PREFIX or tail != f"{job}.*":
        return None
    try:
        return subjects.check_token("capture token", token)
    except ValueError:
        return None


async def ensure_job_commands(js: JetStreamContext, job: str, *, replicas: int = 1) -> JobCommands:
    """Create (or update) the command stream of `job`; idempotent. An existing stream keeps its
    capture token; one in an older layout (capturing the public subjects) gets one.

    Raises:
        NatsUnavailable: the server took the stream without its subject transform (nats-server
            older than 2.10).
    """
    name = subjects.stream_commands_of(job)
    token = await _ensure_tokened(
        js, name, lambda t: job_commands_stream(job, t, replicas=replicas), lambda c: _token_of(c, job)
    )
    return JobCommands(stream=name, job=job, token=token)


async def ensure_ack_capture(js: JetStreamContext, commands: JobCommands) -> None:
    """Make the acks stream capture the ack subject of `commands.job` (`JobCommands.ack_token`),
    replacing an older token of that job; idempotent. The weaver calls it (one writer: the stream's
    subject list is read, changed and written back) before the job's first command of its life.

    Raises:
        NotFoundError: there is no acks stream (`ensure_streams` makes it).
    """
    info = await js.stream_info(subjects.STREAM_ACKS)
    captures = _ack_captures_of(info.config)
    wanted = subjects.ack_capture(commands.ack_token, commands.job)
    if wanted in captures:
        return
    others = (subjects.ack_captures_of(commands.job), subjects.ack_captures_of(_ACKS_PLACEHOLDER_JOB))
    kept = [c for c in captures if not any(subjects.matches(o, c) for o in others)]
    kept = [*kept, wanted][-ACKS_MAX_CAPTURES:]  # the newest
    await js.update_stream(dataclasses.replace(info.config, subjects=kept))


def rank_consumer(job: str, run_id: str, rank: int, incarnation: str) -> ConsumerConfig:
    """The durable pull consumer one rank process reads its run's commands from, every one from the
    run's first: on the job's command stream, filtered on the run's subject, acknowledged one by one.

    The weaver makes it (`ensure_rank_consumer`); a threadlet's credential may only pull from it and
    acknowledge, so no rank chooses where JetStream delivers (docs/security.md).

    Its state (what it delivered and what was acknowledged) is kept in the server's memory, while
    the commands themselves stay in the stream's file store. On file, every delivery and every
    acknowledgement is a write of the consumer's state: one command to 1,000 rank consumers took
    0.26 to 0.7 s to reach the last of them on an otherwise idle server, against 20 to 35 ms in
    memory (`bench/consumer_fanout.py`; docs/benchmarks.md, "Session 8"). A restarted server has
    forgotten such a consumer: the weaver makes it again after it reconnects
    (`weaver.streams.RankConsumers.forget`), it delivers the run's commands from the first again,
    and the rank drops the seqs it already decided (`threadlet.agreement`), so nothing is lost or
    applied twice.
    """
    return ConsumerConfig(
        durable_name=subjects.rank_consumer(run_id, rank, incarnation),
        description=f"torchloom: commands of {job} run {run_id} for rank {rank}",
        filter_subject=subjects.commands(job, run_id),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=RANK_CONSUMER_ACK_WAIT_S,
        max_deliver=-1,
        inactive_threshold=RANK_CONSUMER_INACTIVE_S,
        mem_storage=True,
    )


async def ensure_rank_consumer(
    js: JetStreamContext, job: str, run_id: str, rank: int, incarnation: str
) -> str:
    """Create the rank's command consumer (`rank_consumer`) unless it exists; returns its name.

    Raises:
        NotFoundError: the job has no command stream yet.
        ValueError: a name is not a valid subject token.
    """
    config = rank_consumer(job, run_id, rank, incarnation)
    assert config.durable_name is not None  # rank_consumer always names it
    stream = subjects.stream_commands_of(job)
    try:
        await js.add_consumer(stream, config)
    except APIError as exc:
        if exc.err_code == _CONSUMER_EXISTS:  # made before with an older config: it still delivers
            return config.durable_name
        # One an older torchloom made keeps its state on file, and the server refuses to change that
        # ("storage type can not be updated", a generic create error): it delivers the same commands.
        try:
            info = await js.consumer_info(stream, config.durable_name)
        except NotFoundError:
            raise exc from None
        if info.config.filter_subject != config.filter_subject:
            raise
    return config.durable_name


_T = TypeVar("_T")

# First per-request timeout of `retry_dropped` (doubling after each timeout).
DROPPED_FIRST_S = 1.0


async def retry_dropped(
    nc: Client,
    call: Callable[[JetStreamContext], Awaitable[_T]],
    *,
    total_s: float,
    first_s: float = DROPPED_FIRST_S,
) -> _T:
    """Run `call` (idempotent JetStream API requests) through a context whose requests time out
    after `first_s`, and again after a timeout with that doubled, for `total_s` in all.

    A JetStream cluster drops API requests for a moment after a server rejoins (docs/benchmarks.md,
    "A weaver restarted after a NATS server restart"): such a request never answers, so one long
    timeout only waits longer, and asking again a second later answers at once.

    Raises:
        TimeoutError: no attempt answered within `total_s`.
    """
    end = time.monotonic() + total_s
    attempt_s = first_s
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"JetStream did not answer within {total_s:g} s")
        try:
            async with asyncio.timeout(left):
                return await call(nc.jetstream(timeout=min(attempt_s, left)))
        except TimeoutError:  # nats-py's own TimeoutError is one too
            if end - time.monotonic() <= 0:
                raise
            log.info("a JetStream request got no answer within %.1f s: asking again", min(attempt_s, left))
            attempt_s *= 2


async def remove_shared_commands(js: JetStreamContext) -> int:
    """Delete the shared TORCHLOOM_COMMANDS stream of an older store, if there is one; return how
    many messages it held (0 when there was none).

    It captures every job's command subjects, so while it exists no per-job stream can be created
    (JetStream refuses overlapping streams). Its commands belong to runs of an earlier version,
    whose ranks followed that stream; the journal keeps their outcomes.
    """
    try:
        info = await js.stream_info(subjects.STREAM_COMMANDS)
    except NotFoundError:
        return 0
    held = int(info.state.messages)
    await js.delete_stream(subjects.STREAM_COMMANDS)
    log.warning(
        "deleted the shared stream %s (%d command(s) of earlier runs) to make room for per-job command "
        "streams; the journal keeps every outcome",
        subjects.STREAM_COMMANDS,
        held,
    )
    return held


async def _ensure_tokened(
    js: JetStreamContext,
    name: str,
    config_of: Callable[[str], StreamConfig],
    token_of: Callable[[StreamConfig], str | None],
) -> str:
    """Create stream `name` as `config_of(token)`, or update it to that, keeping the capture token it
    holds (`token_of` its config; a new random one for a stream without); return the stored token.

    Two writers at once: the second one's create fails and it reads the first one's token, so both
    publish on the same subjects.

    Raises:
        NatsUnavailable: the server stored the stream without its subject transform (nats-server
            older than 2.10).
    """
    for _ in range(3):
        info: StreamInfo | None = None
        with contextlib.suppress(NotFoundError):
            info = await js.stream_info(name)
        token = token_of(info.config) if info is not None else None
        config = config_of(token or secrets.token_hex(_CAPTURE_TOKEN_BYTES))
        if info is None:
            try:
                info = await js.add_stream(config)
            except BadRequestError:
                continue  # made meanwhile by another writer: read its token
        else:
            info = await js.update_stream(config)
        stored = token_of(info.config)
        if stored is None:
            raise NatsUnavailable(
                f"stream {name} was stored without its subject transform: torchloom needs nats-server 2.10 "
                "or later"
            )
        return stored
    raise NatsUnavailable(f"stream {name} kept changing while it was being made; try again")


async def _add_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream of `config`, or update the existing one to it."""
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
