"""The NATS connection as every torchloom component opens it, and the JetStream streams it needs.

Connections reconnect forever with a short wait, so a restarting server costs seconds, not the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from torchloom import subjects
from torchloom.credentials import ClientAuth
from torchloom.errors import NatsUnavailable
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

    async def _error(exc: Exception) -> None:
        log.debug("nats %s: %s", name, redact_url(str(exc)))
        last_error[:] = [exc]
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
) -> StreamConfig:
    """A file-backed stream that drops its oldest messages at its limits and deduplicates retries."""
    return StreamConfig(
        name=name,
        subjects=captures,
        subject_transform=transform,
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


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1, shared_commands: bool = True) -> None:
    """Create (or update) the command, journal and acks streams; idempotent.

    Args:
        shared_commands: also the one TORCHLOOM_COMMANDS stream for every job. False leaves the
            commands to per-job streams (`ensure_job_commands`), which role permissions can name.
    """
    configs = [
        _stream(
            subjects.STREAM_JOURNAL,
            [subjects.journal_all(), subjects.events_all()],
            max_age_s=JOURNAL_MAX_AGE_S,
            max_msgs=JOURNAL_MAX_MSGS,
            max_bytes=JOURNAL_MAX_BYTES,
            replicas=replicas,
            description="torchloom: command outcomes and job events (the audit trail)",
        ),
        _stream(
            subjects.STREAM_ACKS,
            [subjects.acks_all()],
            max_age_s=ACKS_MAX_AGE_S,
            max_msgs=ACKS_MAX_MSGS,
            max_bytes=ACKS_MAX_BYTES,
            replicas=replicas,
            description="torchloom: every rank's acks, until the weaver has journaled their outcomes",
        ),
    ]
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
        configs.insert(0, shared)
    for config in configs:
        await _add_or_update(js, config)


_CAPTURE_TOKEN_BYTES = 16


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
    token = None
    with contextlib.suppress(NotFoundError):
        token = _token_of((await js.stream_info(name)).config, job)
    config = job_commands_stream(job, token or secrets.token_hex(_CAPTURE_TOKEN_BYTES), replicas=replicas)
    # Another weaver may have made it first with its own token: the server's copy decides.
    stored = _token_of((await _add_or_update(js, config)).config, job)
    if stored is None:
        raise NatsUnavailable(
            f"the command stream of job {job} was stored without its subject transform: torchloom needs "
            "nats-server 2.10 or later"
        )
    return JobCommands(stream=name, job=job, token=stored)


def rank_consumer(job: str, run_id: str, rank: int, incarnation: str) -> ConsumerConfig:
    """The durable pull consumer one rank process reads its run's commands from, every one from the
    run's first: on the job's command stream, filtered on the run's subject, acknowledged one by one.

    The weaver makes it (`ensure_rank_consumer`); a threadlet's credential may only pull from it and
    acknowledge, so no rank chooses where JetStream delivers (docs/security.md).
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
    try:
        await js.add_consumer(subjects.stream_commands_of(job), config)
    except APIError as exc:
        if exc.err_code != _CONSUMER_EXISTS:  # made before with an older config: it still delivers
            raise
    assert config.durable_name is not None  # rank_consumer always names it
    return config.durable_name


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


async def _add_or_update(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """The stream as the server holds it after creating `config`, or updating the stream to it."""
    try:
        return await js.add_stream(config)
    except BadRequestError:
        return await js.update_stream(config)
