"""The weaver lease's pure side: what a weaver without the lease does next, the lease's wire form and
timing checks; the client's address lists (an active weaver and its standbys)."""

from __future__ import annotations

import pytest

from torchloom import discovery
from torchloom.client import weaver_addresses
from weaver.leader import Lease, LeaseConfig, Move, NotActive, Seen, StandbyBackend, next_move

CFG = LeaseConfig()  # renew 0.5 s, stale after 1.5 s
OTHER = Lease(holder="b:2:x", grpc="127.0.0.1:5002")


@pytest.mark.parametrize(
    ("seen", "now", "move"),
    [
        (Seen(lease=None, revision=0, since=10.0), 10.0, Move.CREATE),  # no key: first start, expired
        (Seen(lease=OTHER, revision=7, since=10.0), 11.0, Move.WAIT),  # a live lease
        (Seen(lease=OTHER, revision=7, since=10.0), 11.49, Move.WAIT),
        (Seen(lease=OTHER, revision=7, since=10.0), 11.5, Move.TAKE_OVER),  # stood still 1.5 s
        (Seen(lease=None, revision=7, since=10.0), 11.5, Move.TAKE_OVER),  # garbage in the key
        (Seen(lease=Lease(holder="me", grpc="x:1"), revision=7, since=10.0), 10.0, Move.TAKE_OVER),
    ],
)
def test_next_move(seen: Seen, now: float, move: Move) -> None:
    assert next_move("me", seen, now, CFG) is move


def test_lease_round_trip_and_garbage() -> None:
    assert Lease.decode(OTHER.encode()) == OTHER
    for raw in (b"", b"{", b"[]", b'{"holder": "x"}', None):
        assert Lease.decode(raw) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"renew_s": 0}, r"renew_s=0 rejected: must be in \(0, 60\] seconds"),
        ({"ttl_s": float("nan")}, "ttl_s=nan rejected"),
        ({"renew_s": 2.0}, r"needs poll_s \(0.2\) <= renew_s \(2\) < stale_after_s \(1.5\) <= ttl_s \(2\)"),
        ({"stale_after_s": 3.0}, r"stale_after_s \(3\) <= ttl_s \(2\)"),
        ({"poll_s": 0.6}, r"poll_s \(0.6\) <= renew_s \(0.5\)"),
    ],
)
def test_lease_timing_is_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeaseConfig(**kwargs)


def test_a_standby_refuses_naming_the_active_weaver() -> None:
    backend = StandbyBackend()
    with pytest.raises(NotActive, match="no weaver holds the lease yet") as caught:
        backend.status("j")
    assert caught.value.active == ""
    assert "the active weaver is at 127.0.0.1:5002; retry there" in str(NotActive("127.0.0.1:5002"))


def test_address_lists() -> None:
    assert weaver_addresses("127.0.0.1:1, 127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert discovery.check_address("127.0.0.1:1,127.0.0.1:2") == "127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(ValueError, match=r"expected HOST:PORT .* or several separated by commas"):
        weaver_addresses("127.0.0.1:1,nohost")
    with pytest.raises(ValueError, match="or several separated by commas"):
        discovery.check_address("127.0.0.1:1,127.0.0.1:0")
