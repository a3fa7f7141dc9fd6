"""The NATS connection as every torchloom component opens it, and the JetStream streams it needs.

Connections reconnect forever with a short wait, so a restarting server costs seconds, not the run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from torchloom import subjects
from torchloom.errors import NatsUnavailable

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]

# Retention of the durable streams: the journal is an audit trail, so keep it long.
COMMANDS_MAX_AGE_S = 30 * 24 * 3600.0
JOURNAL_MAX_AGE_S = 90 * 24 * 3600.0
# Acks matter until their command's outcome is journaled (seconds to minutes); a day covers a weaver
# that stays down a long time, the byte cap a flood.
ACKS_MAX_AGE_S = 24 * 3600.0
ACKS_MAX_BYTES = 1024 * 1024 * 1024
# JetStream stores a message once per Nats-Msg-Id within this window: a retried publish of a command,
# an ack or a journal entry (or a restarted weaver completing the same outcome) is not stored twice.
DUPLICATE_WINDOW_S = 120.0


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 2.0,
    reconnect_wait_s: float = 0.25,
    on_disconnected: Callback | None = None,
    on_reconnected: Callback | None = None,
) -> Client:
    """Open a NATS connection that reconnects forever.

    Raises:
        NatsUnavailable: when the first connection cannot be made before `connect_timeout_s`.
    """

    async def _error(exc: Exception) -> None:
        log.debug("nats %s: %s", name, exc)

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
            )
    except Exception as exc:  # nats raises several unrelated types for "cannot connect"
        raise NatsUnavailable(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from exc


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create (or update) the command and journal streams; idempotent."""
    configs = [
        StreamConfig(
            name=subjects.STREAM_COMMANDS,
            subjects=[subjects.commands_all()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=COMMANDS_MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
            description="torchloom: every validated command, per job and run",
        ),
        StreamConfig(
            name=subjects.STREAM_JOURNAL,
            subjects=[subjects.journal_all(), subjects.events_all()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=JOURNAL_MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
            description="torchloom: command outcomes and job events (the audit trail)",
        ),
        StreamConfig(
            name=subjects.STREAM_ACKS,
            subjects=[subjects.acks_all()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=ACKS_MAX_AGE_S,
            max_bytes=ACKS_MAX_BYTES,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
            description="torchloom: every rank's acks, until the weaver has journaled their outcomes",
        ),
    ]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
