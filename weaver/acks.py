"""The weaver's durable ack feed: every rank's acks, read from the TORCHLOOM_ACKS stream through a
durable consumer, each acknowledged to JetStream only once the outcome it helped decide is journaled.

So a weaver killed at any point loses no ack: what it had not journaled yet is delivered again to
the next weaver, which rebuilt the command as pending from the commands stream and completes it.
No decisions here: the service says, per ack, which command it belongs to (or that it is of no use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from torchloom import bus, subjects

log = logging.getLogger(__name__)

# An unacknowledged ack is delivered again after this long: a delivery lost while the weaver
# reconnected (a push consumer's in-flight messages) comes back this soon. A held one is told "in
# progress" (`AckFeed._keep_held`) once held half of this, so it does not come back while its
# command waits for its last ack; one that comes back all the same (a journal write retried past it)
# replaces the delivery held before (one per stream sequence).
ACK_WAIT_S = 2.0
# Acks held (not yet acknowledged) at most: pending commands x ranks. Past it JetStream pauses the
# delivery, so it is far above any real backlog.
MAX_ACK_PENDING = 65_536

# An ack that cannot be judged yet (its rank has not reported since the weaver started) comes back
# after this long.
RETRY_DELAY_S = 0.5


class Retry:
    """A handler's answer: deliver this ack again shortly (see RETRY_DELAY_S)."""


RETRY = Retry()
# What a command is known by while its outcome is open: (job, run id, seq).
CommandKey = tuple[str, str, int]
# Folds one ack message into the weaver's state and says what to do with it: hold it until the
# outcome of the open command with this key is journaled, acknowledge it now (None: of no further
# use, e.g. malformed, refused or about a decided command), or RETRY it shortly.
Handler = Callable[[Msg], CommandKey | Retry | None]


class AckFeed:
    """Follows TORCHLOOM_ACKS with a durable consumer (each weaver name has its own, so every weaver
    sees every ack, and a restarted one resumes where its predecessor stopped).

    Args:
        durable: the consumer's name (`WeaverConfig.acks_consumer`).
        handler: called with each decoded ack, on the event loop.
        take_over: the consumer may still be bound to a predecessor that lost the lease (stalled or
            cut off, its connection not yet dropped by the server): replace it (`WeaverConfig.
            acks_take_over`). Only a weaver that holds the lease may: it fences the old one's feed.
    """

    def __init__(self, durable: str, handler: Handler, *, take_over: bool = False) -> None:
        self._durable = durable
        self._handler = handler
        self._take_over = take_over
        self._held: dict[CommandKey, dict[int, Msg]] = {}
        # When each held command's acks were last told "in progress" (or its first was held).
        self._refreshed_at: dict[CommandKey, float] = {}
        self._keeper: asyncio.Task[None] | None = None
        # Commands whose outcome is decided but not journaled yet (`hold`): their acks stay held.
        self._journaling: set[CommandKey] = set()
        self._sub: Any = None

    async def start(self, js: JetStreamContext) -> None:
        """Bind (or create) the durable consumer and start delivery (taking it over first when
        allowed and still bound to another subscription)."""
        start_seq = await self._replace_bound(js) if self._take_over else None
        config = ConsumerConfig(
            durable_name=self._durable,
            deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=MAX_ACK_PENDING,
            max_deliver=-1,
            # A consumer whose weaver is gone this long is removed; a new one starts from the oldest
            # ack the stream still holds (as old as this), so nothing is missed either way.
            inactive_threshold=bus.ACKS_MAX_AGE_S,
        )
        self._sub = await js.subscribe(
            subjects.acks_all(),
            durable=self._durable,
            stream=subjects.STREAM_ACKS,
            cb=self._on_msg,
            manual_ack=True,
            config=config,
            pending_msgs_limit=MAX_ACK_PENDING,
        )
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_held(ACK_WAIT_S / 2), name="weaver-acks-held")

    async def _replace_bound(self, js: JetStreamContext) -> int | None:
        """Delete the durable consumer when a subscription (a predecessor's) is still bound to it, so
        that one gets no more acks; return the stream sequence the new consumer starts at: the first
        ack the old one had not had acknowledged, so none is lost (None: nothing to replace)."""
        try:
            info = await js.consumer_info(subjects.STREAM_ACKS, self._durable)
        except NotFoundError:
            return None
        if not info.push_bound:
            return None
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        log.warning(
            "acks consumer %s is still bound to a weaver that lost the lease: replacing it from stream "
            "sequence %d",
            self._durable,
            floor + 1,
        )
        with contextlib.suppress(NotFoundError):  # gone meanwhile (its inactive threshold)
            await js.delete_consumer(subjects.STREAM_ACKS, self._durable)
        return floor + 1

    async def stop(self) -> None:
        """Stop delivery (the durable consumer stays on the server for the next weaver)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def on_live(self, msg: Msg) -> None:
        """An ack published on the public ack subject, which no stream stores: a rank's refusal of an
        unverified command, or the ack of a rank that knows no ack token (an older threadlet), taken
        now or never. The acks stream's own copy of each ack it stored (published again there for
        live readers, with a `Nats-Stream` header) is skipped: the durable feed delivers that one."""
        if self._sub is None or (msg.headers or {}).get("Nats-Stream"):
            return
        self._take_live(msg)

    def _take_live(self, msg: Msg) -> None:
        if self._sub is None:  # stopped meanwhile
            return
        try:
            key = self._handler(msg)
        except Exception:  # a bug in a handler must not stop the subscription
            log.exception("ack handling failed on %s", msg.subject)
            return
        if isinstance(key, Retry):  # its rank has not reported since the weaver started: soon
            asyncio.get_running_loop().call_later(RETRY_DELAY_S, self._take_live, msg)

    def held(self) -> int:
        return sum(len(v) for v in self._held.values())

    async def _on_msg(self, msg: Msg) -> None:
        try:
            key = self._handler(msg)
        except Exception:  # a bug in a handler must not stall the feed
            log.exception("ack handling failed on %s", msg.subject)
            key = None
        if key is None:
            await _ack(msg)
        elif isinstance(key, Retry):
            try:
                await msg.nak(delay=RETRY_DELAY_S)
            except Exception as exc:  # without the nak it comes back after ACK_WAIT_S
                log.debug("could not nak an ack message: %s", exc)
        else:
            self._held.setdefault(key, {})[msg.metadata.sequence.stream] = msg
            self._refreshed_at.setdefault(key, time.monotonic())

    async def _keep_held(self, every_s: float) -> None:
        """Tell JetStream that the acks of a command held for over `every_s` are still in progress
        (one small publish each), so it does not deliver them again while the command waits for its
        last ack. Without it, once commands take longer than ACK_WAIT_S (a weaver that falls
        behind), every early ack came back every ACK_WAIT_S and the weaver that was behind took
        each again: profiled at 1,000 ranks, 145,098 deliveries for 15,000 acks. A held ack waits
        at most `every_s` and a half before it is told (the look runs every half of `every_s`)."""
        while True:
            await asyncio.sleep(every_s / 2)
            now = time.monotonic()
            for key, since in list(self._refreshed_at.items()):
                if now - since < every_s or key not in self._refreshed_at:
                    continue
                self._refreshed_at[key] = now
                for msg in list(self._held.get(key, {}).values()):
                    try:
                        await msg.in_progress()
                    except Exception as exc:  # then it comes back, as it did before
                        log.debug("could not mark a held ack in progress: %s", exc)

    def hold(self, key: CommandKey) -> None:
        """The outcome of command `key` is decided and on its way to the journal: until `release(key)`,
        its acks stay held, also those JetStream delivers again meanwhile (a journal write retried
        past ACK_WAIT_S), which the handler must then answer with `key` (`journaling`)."""
        self._journaling.add(key)

    def journaling(self, key: CommandKey) -> bool:
        """Whether the outcome of command `key` is decided but not journaled yet (`hold`)."""
        return key in self._journaling

    async def release(self, key: CommandKey) -> None:
        """The outcome of command `key` is journaled: acknowledge every ack held for it."""
        self._journaling.discard(key)
        self._refreshed_at.pop(key, None)
        for msg in self._held.pop(key, {}).values():
            await _ack(msg)


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack()
    except Exception as exc:  # a lost ack-ack only means a redelivery, which is ignored
        log.debug("could not acknowledge an ack message: %s", exc)
