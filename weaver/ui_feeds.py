"""The web page's journal feeds: the weaver makes a short-lived push consumer on the journal that
delivers only to an inbox of the browser role that asked, so the browser roles create no consumer
and choose no delivery subject (docs/security.md, "Delivery subjects").

The page subscribes to `_INBOX.<role>.feed.<id>` (only that role may read its inbox), then asks on
`subjects.api_feed(role)` (only that role may publish there) with JSON `{"deliver": that subject,
"max_entries": N}`. The weaver answers `{"consumer", "first_seq", "last_seq", "error"}`: the journal's
newest N entries up to `last_seq` arrive on the inbox, each with its stored subject and a `$JS.ACK`
reply subject that carries its stream sequence. A feed nobody listens to is deleted by nats-server
after `FeedLimits.inactive_s`; the weaver deletes one older than `max_age_s` and holds at most
`per_owner` per role.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from torchloom import subjects
from torchloom.credentials import BROWSER_ROLES

log = logging.getLogger(__name__)

# Who may ask for a feed: the browser roles, each on its own api.feed.<role> subject.
OWNERS = tuple(role.value for role in BROWSER_ROLES)
FEED_MAX_ENTRIES = 10_000  # a page loads its newest entries (2,000 today), not 90 days of them
FEEDS_PER_OWNER = 16  # open feeds per browser role (a tab, or a reconnect of one, makes one each)
FEED_INACTIVE_S = 5.0  # nats-server deletes a feed this long after its inbox lost its subscriber
FEED_MAX_AGE_S = 120.0  # a page reads its history in seconds; an older feed is deleted
FEED_CONSUMER_PREFIX = "ui-feed-"
# At the cap, the weaver asks JetStream which feeds still exist at most this often per role, so a
# flood of requests is refused without a request to JetStream for each.
FEED_RECHECK_S = 1.0
# After the role's inbox prefix: one to four tokens, no wildcard (nats.js's nuid is one token).
_DELIVER_REST = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,3}$")


class FeedRefused(Exception):
    """The feed was not made; the message says why (sent to the page as the reply's `error`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedLimits:
    """Bounds on the feeds the weaver makes for the browser roles."""

    per_owner: int = FEEDS_PER_OWNER
    inactive_s: float = FEED_INACTIVE_S
    max_age_s: float = FEED_MAX_AGE_S

    def __post_init__(self) -> None:
        if self.per_owner < 1:
            raise ValueError(f"per_owner={self.per_owner} rejected: must be >= 1")
        if not 0 < self.inactive_s <= self.max_age_s:
            raise ValueError(
                f"inactive_s={self.inactive_s:g}, max_age_s={self.max_age_s:g} rejected: "
                "need 0 < inactive_s <= max_age_s"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedRequest:
    """What the page asks for: where to deliver (an inbox of its role) and how many entries."""

    deliver: str
    max_entries: int

    @classmethod
    def decode(cls, owner: str, data: bytes) -> FeedRequest:
        """Parse the page's JSON request for `owner` (a browser role).

        Raises:
            FeedRefused: malformed, or `deliver` is not an inbox subject of `owner`.
        """
        if owner not in OWNERS:
            raise FeedRefused(f"journal feeds are for {' and '.join(OWNERS)}, not {owner!r}")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeedRefused(f"feed request is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise FeedRefused('feed request must be a JSON object {"deliver": ..., "max_entries": ...}')
        deliver, max_entries = body.get("deliver"), body.get("max_entries")
        prefix = f"{subjects.inbox_prefix(owner)}."
        if not (
            isinstance(deliver, str)
            and deliver.startswith(prefix)
            and _DELIVER_REST.match(deliver.removeprefix(prefix))
        ):
            raise FeedRefused(
                f"deliver={deliver!r} rejected: must be an inbox subject of {owner}, {prefix}<id> "
                "(no wildcards)"
            )
        if not (
            isinstance(max_entries, int)
            and not isinstance(max_entries, bool)
            and 1 <= max_entries <= FEED_MAX_ENTRIES
        ):
            raise FeedRefused(f"max_entries={max_entries!r} rejected: must be in [1, {FEED_MAX_ENTRIES}]")
        return cls(deliver=deliver, max_entries=max_entries)


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedReply:
    """The weaver's answer. `last_seq` 0 and no `error`: the journal is empty, nothing is delivered.
    `refused` (not sent): the request did not fit (its form, the cap), rather than JetStream failing."""

    consumer: str = ""
    first_seq: int = 0
    last_seq: int = 0
    error: str = ""
    refused: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {
                "consumer": self.consumer,
                "first_seq": self.first_seq,
                "last_seq": self.last_seq,
                "error": self.error,
            }
        ).encode()


def feed_consumer(name: str, deliver: str, start_seq: int, inactive_s: float) -> ConsumerConfig:
    """An ephemeral push consumer on the journal from `start_seq`, delivering to `deliver` (an inbox
    the weaver checked), in memory, unacknowledged, deleted once nobody listened for `inactive_s`."""
    return ConsumerConfig(
        name=name,
        description="torchloom: a web page's journal history",
        deliver_subject=deliver,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE,
        # What the browser roles may read anyway: outcomes and job events (the whole stream today).
        filter_subjects=[subjects.journal_all(), subjects.events_all()],
        inactive_threshold=inactive_s,
        mem_storage=True,
        num_replicas=1,
    )


class UiFeeds:
    """Makes the browser roles' journal feeds, at most `limits.per_owner` per role at a time.

    Args:
        js: the weaver's JetStream context (its role may create consumers).
        timeout_s: deadline of each request to JetStream.
        limits: bounds on the feeds.
    """

    def __init__(self, js: JetStreamContext, timeout_s: float, limits: FeedLimits | None = None) -> None:
        self.js = js
        self.timeout_s = timeout_s
        self.limits = limits or FeedLimits()
        self._open: dict[str, dict[str, float]] = {owner: {} for owner in OWNERS}  # name -> made at
        self._checked_at: dict[str, float] = {}  # owner -> when its feeds' existence was last asked
        self._lock = asyncio.Lock()  # a role's count and its new feed change together

    def held(self, owner: str) -> int:
        """How many feeds this weaver counts as open for `owner`."""
        return len(self._open.get(owner, {}))

    async def answer(self, owner: str, data: bytes) -> FeedReply:
        """Make a feed for the request `data` of `owner`; every failure is an answer with `error`."""
        try:
            request = FeedRequest.decode(owner, data)
            async with self._lock, asyncio.timeout(self.timeout_s):
                return await self._open_feed(owner, request)
        except FeedRefused as exc:
            return FeedReply(error=str(exc), refused=True)
        except TimeoutError:
            return FeedReply(error=f"the journal did not answer within {self.timeout_s:g}s: ask again")
        except Exception as exc:  # nats-py raises several types for "not now"
            log.warning("could not make a journal feed for %s: %r", owner, exc)
            return FeedReply(error=f"the journal feed could not be made: {exc}")

    async def _open_feed(self, owner: str, request: FeedRequest) -> FeedReply:
        try:
            state = (await self.js.stream_info(subjects.STREAM_JOURNAL)).state
        except NotFoundError:
            return FeedReply()  # no weaver has written a journal entry yet
        if state.messages == 0 or state.last_seq == 0:
            return FeedReply()
        start = max(state.first_seq, state.last_seq - request.max_entries + 1)
        await self._make_room(owner)
        name = f"{FEED_CONSUMER_PREFIX}{uuid.uuid4().hex}"
        config = feed_consumer(name, request.deliver, start, self.limits.inactive_s)
        await self.js.add_consumer(subjects.STREAM_JOURNAL, config)
        self._open[owner][name] = time.monotonic()
        return FeedReply(consumer=name, first_seq=start, last_seq=state.last_seq)

    async def _make_room(self, owner: str) -> None:
        """Forget the role's feeds that are gone (deleting those past their age) so a new one fits.

        Raises:
            FeedRefused: the role still holds `per_owner` live feeds.
        """
        feeds, limits = self._open[owner], self.limits
        now = time.monotonic()
        for name, made in list(feeds.items()):
            if now - made > limits.max_age_s:
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_consumer(subjects.STREAM_JOURNAL, name)
                del feeds[name]
        if len(feeds) < limits.per_owner:
            return
        if now - self._checked_at.get(owner, -FEED_RECHECK_S) >= FEED_RECHECK_S:
            self._checked_at[owner] = now
            for name in list(feeds):  # nats-server deleted those whose page stopped listening
                try:
                    await self.js.consumer_info(subjects.STREAM_JOURNAL, name)
                except NotFoundError:
                    del feeds[name]
        if len(feeds) >= limits.per_owner:
            raise FeedRefused(
                f"{owner} already holds {len(feeds)} journal feeds, the most a browser role may hold: "
                f"one is freed {limits.inactive_s:g}s after its page stops listening, or "
                f"{limits.max_age_s:g}s after it was made"
            )
