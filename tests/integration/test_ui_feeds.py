"""The web page's journal feeds (weaver/ui_feeds.py) against a real nats-server running torchloom's
role table and a real weaver: a browser role reads the journal only through the feed the weaver made
for it, delivered to its own inbox; the weaver refuses a delivery subject outside that inbox and more
feeds than a role may hold; a feed whose page stopped listening goes away."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.helpers import until, weaver_config
from tests.integration.test_nats_permissions import (  # noqa: F401 (the fixture: a server with the role table)
    DECIDE_S,
    connect_as,
    secured,
)
from torchloom import bus, subjects
from torchloom.credentials import CredentialStore, Role, inbox_prefix
from torchloom.nats_server import EmbeddedNats
from weaver import ui_feeds
from weaver.service import Weaver

JOURNAL = subjects.STREAM_JOURNAL


@pytest.fixture
async def weaver(secured: tuple[EmbeddedNats, CredentialStore]) -> AsyncIterator[Weaver]:  # noqa: F811
    server, _ = secured
    async with Weaver(weaver_config(server)) as w:
        yield w


@pytest.fixture
async def js(weaver: Weaver) -> JetStreamContext:
    """The weaver's JetStream, with five journal entries written."""
    js = weaver.nats.jetstream()
    journal = await bus.journal_of(js)  # the journal stores only what comes on its capture subjects
    assert journal is not None
    for i in range(5):
        await js.publish(journal.subject(subjects.events("A")), f"entry-{i}".encode())
    return js


async def ask(nc: Client, owner: Role, deliver: str, max_entries: int = 100) -> dict[str, Any]:
    """The page's request: a feed of the newest `max_entries` entries on `deliver`."""
    body = json.dumps({"deliver": deliver, "max_entries": max_entries}).encode()
    reply = await nc.request(subjects.api_feed(owner.value), body, timeout=DECIDE_S)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


def stream_seq(reply: str) -> int:
    """The stream sequence in a delivery's `$JS.ACK.<stream>.<consumer>.<n>.<sseq>...` subject."""
    return int(reply.split(".")[5])


async def test_a_viewer_reads_the_journal_through_the_feed_the_weaver_made_on_its_inbox(
    secured: tuple[EmbeddedNats, CredentialStore],  # noqa: F811
    js: JetStreamContext,
) -> None:
    server, store = secured
    viewer = await connect_as(server, store, Role.UI_VIEWER)
    try:
        deliver = f"{inbox_prefix(Role.UI_VIEWER)}.feed.t1"
        sub = await viewer.subscribe(deliver)
        answer = await ask(viewer, Role.UI_VIEWER, deliver, max_entries=3)
        assert answer["error"] == "" and answer["consumer"].startswith(ui_feeds.FEED_CONSUMER_PREFIX)
        last = answer["last_seq"]
        assert answer["first_seq"] == last - 2
        got = [await sub.next_msg(timeout=DECIDE_S) for _ in range(3)]
        assert [stream_seq(m.reply) for m in got] == [last - 2, last - 1, last]
        for m in got:  # each delivery keeps its stored subject and data
            stored = await js.get_msg(JOURNAL, stream_seq(m.reply))
            assert (m.subject, m.data) == (stored.subject, stored.data)
        assert got[-1].reply.split(".")[-1] == "0"  # nothing pending: the page knows it is done

        # The weaver delivers only to an inbox of the role that asked (the subject names it).
        for elsewhere in (
            f"{inbox_prefix(Role.UI_OPERATOR)}.feed.t1",
            subjects.commands("B", "r1"),
            f"{inbox_prefix(Role.UI_VIEWER)}.>",
            f"{inbox_prefix(Role.UI_VIEWER)}.*",
        ):
            refused = await ask(viewer, Role.UI_VIEWER, elsewhere)
            assert "must be an inbox subject of ui-viewer" in refused["error"], refused
            assert refused["consumer"] == ""
        refused = await ask(viewer, Role.UI_VIEWER, deliver, max_entries=ui_feeds.FEED_MAX_ENTRIES + 1)
        assert f"must be in [1, {ui_feeds.FEED_MAX_ENTRIES}]" in refused["error"], refused
    finally:
        await viewer.close()


async def test_the_weaver_refuses_more_feeds_than_a_role_may_hold_and_an_abandoned_one_goes_away(
    secured: tuple[EmbeddedNats, CredentialStore],  # noqa: F811
    weaver: Weaver,
    js: JetStreamContext,
) -> None:
    server, store = secured
    operator = await connect_as(server, store, Role.UI_OPERATOR)
    try:
        subs, names = [], []
        for i in range(ui_feeds.FEEDS_PER_OWNER):
            deliver = f"{inbox_prefix(Role.UI_OPERATOR)}.feed.cap{i}"
            subs.append(await operator.subscribe(deliver))
            answer = await ask(operator, Role.UI_OPERATOR, deliver)
            assert answer["error"] == "", answer
            names.append(answer["consumer"])
        over = await ask(operator, Role.UI_OPERATOR, f"{inbox_prefix(Role.UI_OPERATOR)}.feed.over")
        assert f"already holds {ui_feeds.FEEDS_PER_OWNER} journal feeds" in over["error"], over
        assert over["consumer"] == ""
        assert weaver.refusals.total.get("api", 0) == 1  # counted, and announced as a refused event

        # The page of the first feed goes away: nats-server deletes its consumer once nobody listened
        # for the inactive threshold, and the role may have a feed again.
        await subs[0].unsubscribe()

        async def gone() -> bool:
            try:
                await js.consumer_info(JOURNAL, names[0])
            except NotFoundError:
                return True
            return False

        await until("the abandoned feed deleted", gone, timeout_s=ui_feeds.FEED_INACTIVE_S + DECIDE_S)
        for name in names[1:]:  # the others, still listened to, stay
            await js.consumer_info(JOURNAL, name)
        deliver = f"{inbox_prefix(Role.UI_OPERATOR)}.feed.again"
        await operator.subscribe(deliver)
        again = await ask(operator, Role.UI_OPERATOR, deliver)
        assert again["error"] == "" and again["consumer"], again
    finally:
        await operator.close()
