"""The journal feed request the weaver accepts from a page (weaver/ui_feeds.py): only an inbox of
the role that asked, no wildcard, a bounded number of entries; the consumer it makes delivers there."""

from __future__ import annotations

import json

import pytest
from nats.js.api import AckPolicy, DeliverPolicy

from torchloom import subjects
from weaver.ui_feeds import FEED_MAX_ENTRIES, FeedLimits, FeedRefused, FeedReply, FeedRequest, feed_consumer


def _body(deliver: object, max_entries: object = 2000) -> bytes:
    return json.dumps({"deliver": deliver, "max_entries": max_entries}).encode()


def test_a_request_for_an_inbox_of_its_own_role_is_taken() -> None:
    req = FeedRequest.decode("ui-viewer", _body("_INBOX.ui-viewer.feed.abc123"))
    assert req == FeedRequest(deliver="_INBOX.ui-viewer.feed.abc123", max_entries=2000)


@pytest.mark.parametrize(
    ("owner", "body", "match"),
    [
        ("ui-viewer", _body("_INBOX.ui-operator.feed.x"), "must be an inbox subject of ui-viewer"),
        ("ui-viewer", _body("torchloom.v1.cmd.B.r1"), "must be an inbox subject"),
        ("ui-viewer", _body("_INBOX.ui-viewer.>"), "no wildcards"),
        ("ui-viewer", _body("_INBOX.ui-viewer.a.*"), "no wildcards"),
        ("ui-viewer", _body("_INBOX.ui-viewer."), "must be an inbox subject"),
        ("ui-viewer", _body("_INBOX.ui-viewerx.a"), "must be an inbox subject"),
        ("ui-viewer", _body(7), "must be an inbox subject"),
        ("ui-viewer", _body("_INBOX.ui-viewer.a", 0), r"must be in \[1, "),
        ("ui-viewer", _body("_INBOX.ui-viewer.a", FEED_MAX_ENTRIES + 1), r"must be in \[1, "),
        ("ui-viewer", _body("_INBOX.ui-viewer.a", True), r"must be in \[1, "),
        ("ui-viewer", b"not json", "not JSON"),
        ("ui-viewer", b"[1]", "JSON object"),
        ("weaver", _body("_INBOX.weaver.a"), "for ui-viewer and ui-operator, not 'weaver'"),
    ],
)
def test_a_request_that_does_not_fit_is_refused_naming_the_expected_form(
    owner: str, body: bytes, match: str
) -> None:
    with pytest.raises(FeedRefused, match=match):
        FeedRequest.decode(owner, body)


def test_the_feed_delivers_to_the_checked_inbox_from_the_start_and_cleans_itself_up() -> None:
    config = feed_consumer("ui-feed-x", "_INBOX.ui-viewer.feed.a", 42, 5.0)
    assert config.deliver_subject == "_INBOX.ui-viewer.feed.a"
    assert (config.deliver_policy, config.opt_start_seq) == (DeliverPolicy.BY_START_SEQUENCE, 42)
    assert config.ack_policy == AckPolicy.NONE and config.durable_name is None
    assert config.inactive_threshold == 5.0 and config.mem_storage
    assert config.filter_subjects == [subjects.journal_all(), subjects.events_all()]


def test_a_reply_is_json_and_limits_are_checked() -> None:
    assert json.loads(FeedReply(consumer="c", first_seq=1, last_seq=3).encode()) == {
        "consumer": "c",
        "first_seq": 1,
        "last_seq": 3,
        "error": "",
    }
    with pytest.raises(ValueError, match="per_owner=0"):
        FeedLimits(per_owner=0)
    with pytest.raises(ValueError, match="need 0 < inactive_s <= max_age_s"):
        FeedLimits(inactive_s=10.0, max_age_s=5.0)
