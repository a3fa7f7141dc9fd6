"""Subject names and the protobuf codec round trip, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchloom import messages as m
from torchloom import subjects, wire


def test_subjects_are_versioned_and_scoped() -> None:
    assert subjects.commands("job-1", "abc") == "torchloom.v1.cmd.job-1.abc"
    assert subjects.heartbeat("j", 3) == "torchloom.v1.hb.j.3"
    assert subjects.acks("j") == "torchloom.v1.ack.j"
    assert subjects.metrics("j", 0) == "torchloom.v1.metrics.j.0"
    assert subjects.events("j") == "torchloom.v1.events.j"
    assert subjects.journal("j") == "torchloom.v1.journal.j"
    assert subjects.api_submit() == "torchloom.v1.api.submit"
    assert subjects.api_decide() == "torchloom.v1.api.decide"
    for name in [
        subjects.commands_all(),
        subjects.heartbeats_all(),
        subjects.acks_all(),
        subjects.metrics_all(),
        subjects.events_all(),
        subjects.journal_all(),
    ]:
        assert name.startswith("torchloom.v1.")


def test_the_capture_subjects_hold_their_token_and_name_what_they_store() -> None:
    token = "0123456789abcdef" * 2
    assert subjects.ack_capture(token, "j") == f"torchloom.v1.wack.{token}.j"
    assert subjects.matches(subjects.ack_captures_of("j"), subjects.ack_capture(token, "j"))
    assert not subjects.matches(subjects.ack_captures_of("k"), subjects.ack_capture(token, "j"))
    assert subjects.journal_capture(token, subjects.events("j")) == f"torchloom.v1.wj.{token}.events.j"
    assert subjects.journal_capture(token, subjects.journal_all()) == f"torchloom.v1.wj.{token}.journal.*"
    assert subjects.matches(
        subjects.event_captures_all(), subjects.journal_capture(token, subjects.events("j"))
    )
    assert subjects.matches(
        subjects.journal_capture_root(token), subjects.journal_capture(token, subjects.journal("j"))
    )
    # Only journal entries and events go to the journal's capture subjects, and a token is one token.
    for public in (
        subjects.acks("j"),
        subjects.commands("j", "r"),
        "elsewhere.events.j",
        "torchloom.v1.events",
    ):
        with pytest.raises(ValueError, match=r"expected torchloom\.v1\.journal\.<job> or \.events\.<job>"):
            subjects.journal_capture(token, public)
    with pytest.raises(ValueError, match="ack token"):
        subjects.ack_capture("a.b", "j")


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", ">", "x" * 65])
def test_bad_job_names_are_refused_naming_the_form(bad: str) -> None:
    with pytest.raises(ValueError, match=r"A-Z, a-z, 0-9, '_' and '-'"):
        subjects.commands(bad, "run")


def test_roundtrip_of_every_message() -> None:
    issuer = m.Issuer(kind="ui", identity="alice@host")
    cmd = m.Command(
        command_id="c1",
        job="j",
        run_id="r",
        seq=7,
        issuer=issuer,
        issued_at_s=12.5,
        body=m.SetConfig(values={"lr": 0.1, "betas": (0.9, 0.99), "steps": 3, "on": True, "mode": "x"}),
    )
    action = m.Command(
        command_id="c2",
        job="j",
        run_id="r",
        seq=8,
        issuer=issuer,
        issued_at_s=1.0,
        body=m.Action(kind=m.ActionKind.ROLLBACK, args={"checkpoint": "ckpt-1"}),
        ack_token="ab" * 16,
    )
    ack = m.Ack(
        command_id="c1",
        job="j",
        run_id="r",
        seq=7,
        rank=1,
        incarnation="i",
        status=m.AckStatus.REJECTED,
        reason="no",
        step=42,
        decided_at_s=2.0,
        received_at_s=1.5,
        detail={"checkpoint": "ckpt-1"},
        branch="b1",
        refused_by_peer=True,
    )
    outcome = m.Outcome(
        command_id="c1",
        job="j",
        status=m.OutcomeStatus.APPLIED,
        command=cmd,
        results=(m.RankResult(rank=0, status=m.AckStatus.APPLIED, step=4, detail={"k": "v"}, branch="main"),),
        submitted_at_s=1.0,
    )
    metrics = m.StepMetrics(job="j", run_id="r", rank=0, step=3, values={"loss": 0.5})
    event = m.JobEvent(job="j", kind="rank_dead", attrs={"rank": "1"})
    assert wire.decode_command(wire.encode(cmd)) == cmd
    assert wire.decode_command(wire.encode(action)) == action
    assert wire.decode_ack(wire.encode(ack)) == ack
    assert wire.decode_outcome(wire.encode(outcome)) == outcome
    assert wire.decode_metrics(wire.encode(metrics)) == metrics
    assert wire.decode_event(wire.encode(event)) == event
    for ev in (metrics, event, outcome):
        assert wire.decode_watch_event(wire.encode_watch_event(ev)) == ev
    req = m.SubmitRequest(job="j", issuer=issuer, timeout_s=3.0, body=m.SetConfig(values={"lr": "1e-3"}))
    assert wire.decode_submit_request(wire.encode(req)) == req
    status = m.StatusReply(
        jobs=(
            m.JobStatus(
                job="j",
                run_id="r",
                world_size=2,
                last_seq=3,
                ranks=(
                    m.RankStatus(
                        rank=0,
                        step=5,
                        knobs={"lr": 0.1},
                        device=m.DeviceHealth(xids=(79,)),
                        health="hung",
                        health_reason="r",
                        branch="b1",
                    ),
                ),
                knobs=(m.KnobSpec(name="lr", type=m.KnobType.FLOAT, min=0.0, min_exclusive=True, value=0.1),),
                checkpoints=(
                    m.CheckpointInfo(id="ckpt-1", tag="t", step=9, branch="main", path="/x", seq=2),
                ),
                branches=(
                    m.BranchInfo(id="b1", parent="main", from_checkpoint="ckpt-1", fork_step=9, seq=3),
                ),
                branch="b1",
            ),
        )
    )
    assert wire.decode_status_reply(wire.encode(status)) == status
    hb = m.Heartbeat(
        job="j",
        run_id="r",
        rank=0,
        world_size=1,
        incarnation="i",
        tick=12,
        branch="b1",
        fault_injection_allowed=True,
    )
    assert wire.decode_heartbeat(wire.encode(hb)) == hb
    jr = m.JournalRequest(job="j", follow=True)
    assert wire.decode_journal_request(wire.encode(jr)) == jr


def test_malformed_bytes_raise_wire_error() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_command(b"\xff\xff\xff")
    with pytest.raises(wire.WireError, match="neither a config change nor an action"):
        wire.decode_command(b"")


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.floats(allow_nan=False), max_size=5))
def test_set_values_roundtrip(values: dict[str, float]) -> None:
    cmd = m.Command(
        command_id="c",
        job="j",
        run_id="r",
        seq=1,
        issuer=m.Issuer(),
        issued_at_s=0.0,
        body=m.SetConfig(values=values),
    )
    assert wire.decode_command(wire.encode(cmd)).body == m.SetConfig(values=dict(sorted(values.items())))
