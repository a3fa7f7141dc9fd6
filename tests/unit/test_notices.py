"""weaver.notices: a rank's follow-up notice ack becomes one journaled event per (job, rank, kind) and
interval, naming the rank, the command and the rank's text; unknown kinds are refused."""

from __future__ import annotations

from torchloom import naming
from torchloom.messages import Ack, AckStatus
from weaver import notices

TEXT = "lr@default=0.05 set by torchloom was changed to 0.0495 outside the threadlet: pass scheduler=..."


def notice(rank: int = 0, kind: str = naming.LR_OVERWRITTEN, text: str = TEXT, seq: int = 3) -> Ack:
    return Ack(
        command_id=f"cmd-{seq}",
        job="j",
        run_id="r1",
        seq=seq,
        rank=rank,
        incarnation="inc0",
        status=AckStatus.APPLIED,
        step=41,
        detail={naming.ACK_NOTICE: kind, naming.ACK_NOTICE_MESSAGE: text},
    )


def test_only_an_ack_with_a_notice_is_one() -> None:
    assert notices.is_notice(notice())
    plain = Ack(
        command_id="c", job="j", run_id="r1", seq=1, rank=0, incarnation="i", status=AckStatus.APPLIED,
        detail={"lr": "0.05"},
    )  # fmt: skip
    assert not notices.is_notice(plain)


def test_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    assert notices.check_notice(notice()) is None
    reason = notices.check_notice(notice(kind="format_disk"))
    assert reason is not None and "'format_disk'" in reason and naming.LR_OVERWRITTEN in reason


def test_the_event_names_rank_command_and_fix() -> None:
    ev = notices.Notices().note(notice(rank=1), now=100.0)
    assert ev is not None
    assert (ev.job, ev.run_id, ev.kind, ev.command_id) == ("j", "r1", naming.LR_OVERWRITTEN, "cmd-3")
    assert ev.message == f"rank 1, command seq 3 (cmd-3): {TEXT}"
    assert ev.attrs == {"rank": "1", "seq": "3", "step": "41", "count": "1"}
    assert ev.time_s == 100.0


def test_rate_limited_per_job_rank_and_kind_with_a_count() -> None:
    n = notices.Notices(interval_s=10.0)
    assert n.note(notice(rank=0), 100.0) is not None
    assert n.note(notice(rank=0, seq=4), 101.0) is None  # same rank and kind: limited
    assert n.note(notice(rank=0, seq=5), 102.0) is None
    assert n.note(notice(rank=1), 102.0) is not None  # another rank is not held back
    later = n.note(notice(rank=0, seq=6), 110.5)
    assert later is not None and later.attrs["count"] == "3"
    assert later.message.endswith("(2 more like it since the last report)")


def test_a_long_text_is_cut() -> None:
    ev = notices.Notices().note(notice(text="x" * 5000), 1.0)
    assert ev is not None and ev.message.count("x") == notices.MAX_MESSAGE_CHARS


def test_msg_id_is_stable_per_rank_incarnation_and_command() -> None:
    assert notices.msg_id(notice()) == notices.msg_id(notice())
    assert notices.msg_id(notice()) != notices.msg_id(notice(rank=1))
    assert notices.msg_id(notice()) != notices.msg_id(notice(seq=4))
