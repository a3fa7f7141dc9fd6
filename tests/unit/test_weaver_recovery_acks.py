"""weaver.recovery after a restart: commands a previous weaver left undecided are decided from the acks
the acks stream holds (`replay_acks`), or end as TIMEOUT when the stream may have dropped their acks
(`unanswerable`); what the journal says of each rank is not said twice (`replay_journal`)."""

from __future__ import annotations

from tests.unit import factories as f
from torchloom import naming
from torchloom.messages import AckStatus, Command, Heartbeat, JobEvent, OutcomeStatus, RankState
from weaver import liveness, outcomes, recovery
from weaver.model import WeaverState


def _recovered(*in_flight: Command) -> WeaverState:
    """A restarted weaver's state: the run from its journal, `in_flight` from its commands stream."""
    s = WeaverState()
    started = JobEvent(job=f.JOB, run_id=f.RUN, kind="run_started", attrs={"world_size": str(f.WORLD)})
    recovery.replay_journal(s, [started])
    recovery.replay_commands(s, f.JOB, f.RUN, [(cmd, i) for i, cmd in enumerate(in_flight, 1)])
    return s


def test_stored_acks_decide_a_command_once_and_only_answers_count() -> None:
    cmd = f.command(1, f.set_config(1, lr=0.2).body, issued_at_s=50.0)
    s = _recovered(cmd)
    cid = cmd.command_id
    stored = [
        f.ack(1, 0, command_id=cid, step=7, inc="gone-0"),  # no heartbeat yet: any incarnation counts
        f.ack(1, 1, AckStatus.REJECTED, "forged", command_id=cid, unverified=True),  # a refusal report
        f.ack(1, 1, command_id=cid, detail={naming.ACK_NOTICE: naming.LR_OVERWRITTEN}),  # a notice
        f.ack(1, 1, command_id="another command"),
        f.ack(1, 1, command_id=cid, run="an older run"),
        f.ack(1, 2, command_id=cid),  # outside the world
        f.ack(1, 0, command_id=cid, step=99),  # rank 0 again: its first answer stands
        f.ack(1, 1, command_id=cid, step=7, inc="gone-1"),
    ]
    (decided,) = recovery.replay_acks(s, f.JOB, f.RUN, stored, 60.0)
    assert decided.status is OutcomeStatus.APPLIED and decided.command == cmd
    assert [(r.rank, r.step) for r in decided.results] == [(0, 7), (1, 7)]
    job = s.jobs[f.JOB]
    assert not job.pending and 1 in job.registry.finished_seqs
    # The same acks delivered again (the durable consumer) decide nothing more.
    assert outcomes.record_ack(s, stored[-1], 61.0) is None
    assert recovery.replay_acks(s, f.JOB, f.RUN, stored, 62.0) == []


def test_a_command_only_some_ranks_answered_stays_in_flight_with_their_acks() -> None:
    cmd = f.set_config(1, lr=0.2)
    s = _recovered(cmd)
    assert recovery.replay_acks(s, f.JOB, f.RUN, [f.ack(1, 0, command_id=cmd.command_id)], 60.0) == []
    assert sorted(s.jobs[f.JOB].pending[1].acks) == [0]
    # Rank 1 answers after the restart: decided then, with rank 0's stored answer.
    final = outcomes.record_ack(s, f.ack(1, 1, command_id=cmd.command_id), 61.0)
    assert final is not None and [r.rank for r in final.results] == [0, 1]


def test_commands_whose_acks_the_stream_may_have_dropped_end_as_timeout_saying_so() -> None:
    old = f.command(1, f.set_config(1, lr=0.2).body, issued_at_s=10.0)
    recent = f.command(2, f.set_config(2, lr=0.3).body, issued_at_s=90.0)  # its ranks may answer yet
    later = f.command(3, f.set_config(3, lr=0.4).body, issued_at_s=25.0)  # after what was dropped
    s = _recovered(old, recent, later)
    recovery.replay_acks(s, f.JOB, f.RUN, [f.ack(1, 0, command_id=old.command_id, step=4)], 100.0)
    assert recovery.unanswerable(s, f.JOB, f.RUN, 0.0, 30.0, 100.0) == []  # the stream dropped nothing
    (ended,) = recovery.unanswerable(s, f.JOB, f.RUN, 20.0, 30.0, 100.0)
    assert ended.status is OutcomeStatus.TIMEOUT and ended.command == old
    assert [(r.rank, r.step) for r in ended.results] == [(0, 4)]
    assert "unknown whether rank(s) 1 applied it" in ended.reason
    assert "no longer holds acks stored before 1970-01-01T00:00:20+00:00" in ended.reason
    job = s.jobs[f.JOB]
    assert sorted(job.pending) == [2, 3] and 1 in job.registry.finished_seqs


def test_a_restarted_weaver_journals_no_second_join_or_finish_of_a_rank_the_journal_holds() -> None:
    """The journal's "rank_joined" and "rank_finished" are the ranks' history: a weaver restarted
    under a running job must not journal them again when the same incarnations' heartbeats arrive."""
    s = WeaverState()

    def said(kind: str, rank: int, **attrs: str) -> JobEvent:
        return JobEvent(job=f.JOB, run_id=f.RUN, kind=kind, attrs={"rank": str(rank), **attrs})

    older = JobEvent(
        job=f.JOB, run_id="an older run", kind="rank_joined", attrs={"rank": "2", "incarnation": "x"}
    )
    recovery.replay_journal(
        s,
        [
            JobEvent(job=f.JOB, run_id=f.RUN, kind="run_started", attrs={"world_size": "3"}),
            said("rank_joined", 0, incarnation=f.incarnation(0)),
            said("rank_joined", 1, incarnation=f.incarnation(1)),
            said("rank_finished", 1),
            said("rank_joined", 2, incarnation="before-its-restart"),
            older,  # another run's: says nothing of this one
        ],
    )

    def events(hb: Heartbeat) -> list[tuple[str, str]]:
        return [(e.kind, e.attrs["rank"]) for e in liveness.observe_heartbeat(s, hb, 100.0).events]

    assert events(f.heartbeat(0, world=3, step=5)) == []
    assert events(f.heartbeat(1, world=3, step=9, state=RankState.FINISHED)) == []
    # Rank 0 finishes after the restart: said once. Rank 2 restarted while no weaver ran: it joined.
    assert events(f.heartbeat(0, world=3, step=9, state=RankState.FINISHED)) == [("rank_finished", "0")]
    assert events(f.heartbeat(0, world=3, step=9, state=RankState.FINISHED)) == []
    assert events(f.heartbeat(2, world=3, step=5)) == [("rank_joined", "2")]
    assert sorted(s.jobs[f.JOB].ranks) == [0, 1, 2]
