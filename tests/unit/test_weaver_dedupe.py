"""Idempotent submission, decided without a server: a command id maps to one decision (final, in
flight or refused), rebuilt from the journal and the commands stream after a restart, and every
journal entry carries the message id that makes a re-publish a no-op."""

from __future__ import annotations

from tests.unit import factories as f
from torchloom import wire
from torchloom.messages import (
    AckStatus,
    Action,
    ActionKind,
    Issuer,
    JobEvent,
    KnobSpec,
    KnobType,
    Outcome,
    OutcomeStatus,
    SetConfig,
    SubmitRequest,
)
from weaver import dedupe, outcomes, recovery, submits
from weaver.model import WeaverState

LR = KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, max=10.0, min_exclusive=True, value=0.1)


def _set(lr: float, command_id: str = "cid-1") -> SubmitRequest:
    return SubmitRequest(
        job=f.JOB,
        body=SetConfig(values={"lr": lr}),
        command_id=command_id,
        issuer=Issuer(kind="cli", identity="ann@host"),
    )


def test_a_new_or_empty_id_is_unknown() -> None:
    s = f.running(knobs=(LR,))
    assert dedupe.lookup(s, "cid-1") is None
    assert dedupe.lookup(s, "") is None


def test_an_id_in_flight_is_found_as_its_command_and_keeps_its_seq() -> None:
    s = f.running(knobs=(LR,))
    cmd = submits.plan_submit(s, _set(0.2), 100.0, 5.0, command_id="cid-1")
    found = dedupe.lookup(s, "cid-1")
    assert found == cmd and found.seq == 1
    assert s.jobs[f.JOB].last_seq == 1  # looking it up consumed no seq


def test_a_decided_id_is_answered_with_its_outcome() -> None:
    s = f.running(knobs=(LR,))
    submits.plan_submit(s, _set(0.2), 100.0, 5.0, command_id="cid-1")
    final = None
    for rank in (0, 1):
        final = outcomes.record_ack(s, f.ack(1, rank, command_id="cid-1"), 101.0)
    assert final is not None and final.status is OutcomeStatus.APPLIED
    dedupe.remember(s, final)
    assert dedupe.lookup(s, "cid-1") == final


def test_remember_is_bounded_and_forgets_the_oldest_first() -> None:
    s = WeaverState()
    for i in range(5):
        dedupe.remember(s, Outcome(command_id=f"c{i}", job="j", status=OutcomeStatus.APPLIED), limit=3)
    assert list(s.decided) == ["c2", "c3", "c4"]
    dedupe.remember(s, Outcome(command_id="", job="j", status=OutcomeStatus.APPLIED), limit=3)
    assert "" not in s.decided


def test_a_refusal_keeps_the_client_id_issuer_and_run_and_has_no_command() -> None:
    out = dedupe.refused_outcome(_set(-1.0), "lr=-1 rejected", 5.0, run_id=f.RUN)
    assert out.command_id == "cid-1" and out.command is None
    assert out.status is OutcomeStatus.REJECTED and out.reason == "lr=-1 rejected"
    assert out.issuer == Issuer(kind="cli", identity="ann@host") and out.run_id == f.RUN
    unnamed = dedupe.refused_outcome(SubmitRequest(body=SetConfig(values={})), "no", 5.0)
    assert len(unnamed.command_id) == 32  # an unnamed submit still gets an id to journal under


def test_a_refusal_keeps_what_was_asked_through_the_wire_unless_it_is_too_large() -> None:
    out = dedupe.refused_outcome(_set(-1.0), "lr=-1 rejected", 5.0, run_id=f.RUN)
    assert out.attempted == SetConfig(values={"lr": -1.0})
    decoded = wire.decode_outcome(wire.encode(out))
    assert decoded == out and decoded.attempted == SetConfig(values={"lr": -1.0})
    event = outcomes.outcome_event(out, 6.0)
    assert event.message == "set lr=-1.0: rejected (lr=-1 rejected)" and event.run_id == f.RUN
    huge = SubmitRequest(job=f.JOB, body=Action(kind=ActionKind.EVAL, args={"x": "y" * wire.BODY_MAX_BYTES}))
    big = dedupe.refused_outcome(huge, "too large", 5.0)
    assert big.attempted is None and wire.decode_outcome(wire.encode(big)).attempted is None
    assert outcomes.outcome_event(big, 6.0).message == "command: rejected (too large)"


def test_journal_msg_ids_name_one_entry_per_seq_or_refusal() -> None:
    cmd = f.set_config(7, lr=0.1)
    a = Outcome(command_id=cmd.command_id, job=f.JOB, status=OutcomeStatus.APPLIED, command=cmd)
    b = Outcome(command_id=cmd.command_id, job=f.JOB, status=OutcomeStatus.TIMEOUT, command=cmd)
    assert dedupe.journal_msg_id(a) == dedupe.journal_msg_id(b) == f"outcome:{f.JOB}:{f.RUN}:7"
    refused = dedupe.refused_outcome(_set(-1.0), "no", 1.0)
    assert dedupe.journal_msg_id(refused) == "refused:cid-1"


def test_journal_match_filters_by_run_and_command() -> None:
    cmd = f.set_config(1, lr=0.1)
    outcome = Outcome(command_id=cmd.command_id, job=f.JOB, status=OutcomeStatus.APPLIED, command=cmd)
    refused = dedupe.refused_outcome(_set(-1.0), "no", 1.0, run_id="r2")
    event = JobEvent(job=f.JOB, run_id=f.RUN, kind="rank_joined")
    assert all(dedupe.journal_match(e) for e in (outcome, refused, event))
    assert dedupe.journal_match(outcome, run_id=f.RUN) and not dedupe.journal_match(refused, run_id=f.RUN)
    assert dedupe.journal_match(refused, run_id="r2") and dedupe.journal_match(event, run_id=f.RUN)
    assert dedupe.journal_match(outcome, command_id=cmd.command_id)
    assert not dedupe.journal_match(refused, command_id=cmd.command_id)
    assert not dedupe.journal_match(event, command_id=cmd.command_id)


def test_recovery_rebuilds_decided_ids_and_in_flight_commands() -> None:
    done = f.set_config(1, lr=0.1)
    applied = Outcome(
        command_id=done.command_id,
        job=f.JOB,
        status=OutcomeStatus.APPLIED,
        command=done,
        results=(),
    )
    refused = dedupe.refused_outcome(_set(-1.0, "cid-refused"), "no", 1.0, run_id=f.RUN)
    started = JobEvent(job=f.JOB, run_id=f.RUN, kind="run_started", attrs={"world_size": "2"})
    s = WeaverState()
    recovery.replay_journal(s, [started, applied, refused])
    in_flight = f.set_config(2, lr=0.2)
    recovery.replay_commands(s, f.JOB, f.RUN, [(done, 1), (in_flight, 2)])
    assert dedupe.lookup(s, done.command_id) == applied
    assert dedupe.lookup(s, "cid-refused") == refused
    assert dedupe.lookup(s, in_flight.command_id) == in_flight
    # The recovered command completes from the (redelivered) acks; no second seq is handed out.
    job = s.jobs[f.JOB]
    assert job.last_seq == 2 and job.seq_known
    final = None
    for rank in (0, 1):
        final = outcomes.record_ack(
            s, f.ack(2, rank, AckStatus.APPLIED, command_id=in_flight.command_id), 9.0
        )
    assert final is not None and final.status is OutcomeStatus.APPLIED and final.command == in_flight


def test_a_stored_command_the_weaver_lost_track_of_is_adopted_from_the_stream_tail() -> None:
    # The publish was stored but its answer was lost: the weaver abandoned it. Reading the tail of
    # the run's commands brings it back in flight under the same seq, so a retry finds it.
    s = f.running(knobs=(LR,))
    cmd = submits.plan_submit(s, _set(0.2), 100.0, 5.0, command_id="cid-1")
    submits.abandon(s, cmd)
    assert dedupe.lookup(s, "cid-1") is None and not s.jobs[f.JOB].seq_known
    recovery.replay_commands(s, f.JOB, f.RUN, [(cmd, 1)])
    assert dedupe.lookup(s, "cid-1") == cmd
    nxt = submits.plan_submit(s, _set(0.3, "cid-2"), 101.0, 5.0, command_id="cid-2")
    assert nxt.seq == 2


def test_a_seq_another_writer_stored_while_ours_was_in_flight_is_never_handed_out_again() -> None:
    # Found flaky in test_two_weavers_never_publish_the_same_seq: while our publish of seq 1 was in
    # flight, a read of the tail (a heartbeat's, without the submit lock) found the other weaver's
    # seq 1; then our publish failed the subject-sequence check and was abandoned. Abandoning must
    # not free seq 1 again, and the retry must not read past it and reuse it: seq 2 is next.
    s = f.running(knobs=(LR,))
    ours = submits.plan_submit(s, _set(0.2, "ours"), 100.0, 5.0, command_id="ours")
    assert ours.seq == 1
    theirs = submits.plan_submit(f.running(knobs=(LR,)), _set(0.3, "theirs"), 100.0, 5.0, command_id="theirs")
    recovery.replay_commands(s, f.JOB, f.RUN, [(theirs, 7)])
    assert dedupe.lookup(s, "theirs") == theirs and dedupe.lookup(s, "ours") is None
    submits.abandon(s, ours)
    job = s.jobs[f.JOB]
    assert job.last_seq == 1 and job.last_stream_seq == 7 and not job.seq_known
    recovery.replay_commands(s, f.JOB, f.RUN, [])  # the reread tail after stream seq 7: nothing new
    nxt = submits.plan_submit(s, _set(0.2, "ours"), 101.0, 5.0, command_id="ours")
    assert nxt.seq == 2
