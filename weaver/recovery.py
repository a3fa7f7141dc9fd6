"""Rebuilding the state after a weaver restart, from the journal and the commands stream.

Mutators only: `replay_journal(state, entries)` recreates jobs, runs, registries, what was said of
each rank and the decided command ids from stored outcomes and events;
`replay_commands(state, job, run_id, commands)` makes commands without a final outcome pending
again and marks the run's seq floor known (the service also feeds it the tail of a run's commands
it had not seen, e.g. its own publish whose answer was lost);
`replay_acks(state, job, run_id, acks, now)` completes those the stored acks answer and
`unanswerable(state, job, run_id, dropped_until_s, answered_within_s, now)` ends those whose acks
the acks stream may have dropped, both returning the final outcomes for the service to journal.
All update `state` in place; the service reads the streams and feeds them in oldest first.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from torchloom.messages import Ack, Command, JobEvent, Outcome, OutcomeStatus
from weaver import dedupe, notices
from weaver.model import Announced, JobState, Pending, WeaverState
from weaver.outcomes import final_outcome, record_ack, settle


def _recovered_job(
    state: WeaverState, job_name: str, run_id: str, world_size: int, now: float
) -> JobState | None:
    """The job's state for `run_id` as the journal tells it: a later run retires the current one."""
    job = state.jobs.get(job_name)
    if job is not None and (job.run_id == run_id or run_id in job.retired_runs):
        return job if job.run_id == run_id else None
    retired = (job.retired_runs | {job.run_id}) if job is not None else set()
    job = JobState(job=job_name, run_id=run_id, world_size=world_size, started_at_s=now, retired_runs=retired)
    state.jobs[job_name] = job
    return job


def replay_journal(state: WeaverState, entries: Iterable[Outcome | JobEvent]) -> None:
    """Rebuild jobs, runs and registries from the journal (oldest first) after a weaver restart.

    Ranks are not restored: they come back with their next heartbeat, under the same run. What the
    journal says of them is (`JobState.announced`), so that heartbeat journals no second join.
    """
    for entry in entries:
        if isinstance(entry, JobEvent):
            _replay_event(state, entry)
            continue
        # Repeats of a decided command id (a refusal too) are answered with the stored decision.
        dedupe.remember(state, entry)
        cmd = entry.command
        if cmd is None or not cmd.run_id:
            continue
        job = _recovered_job(state, cmd.job, cmd.run_id, len(entry.results), entry.completed_at_s)
        if job is None:
            continue
        job.world_size = max(job.world_size, len(entry.results))
        job.last_seq = max(job.last_seq, cmd.seq)
        job.pending.pop(cmd.seq, None)
        settle(job, entry)


def _replay_event(state: WeaverState, event: JobEvent) -> None:
    if event.kind == "run_started" and event.run_id:
        world = int(event.attrs.get("world_size", "0") or 0)
        _recovered_job(state, event.job, event.run_id, world, event.time_s)
        return
    job = state.jobs.get(event.job)
    rank = event.attrs.get("rank", "")
    if job is None or job.run_id != event.run_id or not rank.isdigit():
        return
    if event.kind == "rank_joined":
        job.announced[int(rank)] = Announced(event.attrs.get("incarnation", ""))
    elif event.kind == "rank_finished" and (said := job.announced.get(int(rank))) is not None:
        said.finished = True


def replay_commands(
    state: WeaverState, job_name: str, run_id: str, commands: Iterable[tuple[Command, int]]
) -> None:
    """Fold the run's commands stream in: `(command, stream sequence)` pairs, oldest first.

    A command with no final outcome in the journal becomes pending again, so acks that arrive after
    the restart complete it and its outcome is journaled instead of dropped. Afterwards the seq floor
    is known.
    """
    job = state.jobs.get(job_name)
    if job is None or job.run_id != run_id:
        return
    for cmd, stream_seq in commands:
        job.last_seq = max(job.last_seq, cmd.seq)
        job.last_stream_seq = max(job.last_stream_seq, stream_seq)
        held = job.pending.get(cmd.seq)
        if held is not None and held.command.command_id != cmd.command_id:
            # The stream is the truth: another writer stored this seq while our own command with it
            # was in flight (its publish fails the subject-sequence check and is abandoned).
            del job.pending[cmd.seq]
        if cmd.seq not in job.registry.finished_seqs and cmd.seq not in job.pending:
            job.pending[cmd.seq] = Pending(
                command=cmd,
                world_size=job.world_size,
                submitted_at_s=cmd.issued_at_s,
                published_at_s=cmd.issued_at_s,
            )
    job.seq_known = True


def replay_acks(
    state: WeaverState, job_name: str, run_id: str, acks: Iterable[Ack], now: float
) -> list[Outcome]:
    """Fold the acks the acks stream holds for the run into its pending commands (oldest first);
    return the final outcomes of those every rank has now answered (removed from pending and settled).

    What a predecessor decided, or would have, but did not journal (it died first) is decided again
    from the ranks' own answers, whatever its durable consumer still delivers. Counted as
    `outcomes.record_ack` counts: the run, a pending seq with its command id, a rank inside the
    world, once per rank. Not the rank's incarnation: none is known before heartbeats, and the stream
    stores only what the job's ranks published. Refusal reports and notices are not answers.
    """
    job = state.jobs.get(job_name)
    if job is None or job.run_id != run_id:
        return []
    decided: list[Outcome] = []
    for ack in acks:
        if ack.job != job_name or ack.unverified or notices.is_notice(ack):
            continue
        outcome = record_ack(state, ack, now)
        if outcome is not None:
            decided.append(outcome)
    return decided


def unanswerable(
    state: WeaverState,
    job_name: str,
    run_id: str,
    dropped_until_s: float,
    answered_within_s: float,
    now: float,
) -> list[Outcome]:
    """End the run's pending commands that no stored ack can decide: published before `dropped_until_s`
    (up to when the acks stream may have dropped acks, `weaver.streams.StoredAcks`) and waiting
    longer than `answered_within_s` (ranks answer within the command timeout: one published just
    before a restart is left to its ranks). The ranks with no stored answer may have answered, so
    each gets a final TIMEOUT outcome that says so (removed from pending and settled); returned for
    the service to journal."""
    job = state.jobs.get(job_name)
    if job is None or job.run_id != run_id or dropped_until_s <= 0:
        return []
    when = datetime.datetime.fromtimestamp(dropped_until_s, datetime.UTC).isoformat(timespec="seconds")
    ended: list[Outcome] = []
    for seq, pending in sorted(job.pending.items()):
        if pending.published_at_s >= dropped_until_s or now - pending.published_at_s < answered_within_s:
            continue
        missing = [r for r in range(pending.world_size) if r not in pending.acks]
        who = f"rank(s) {', '.join(map(str, missing))}" if missing else "its ranks"
        reason = (
            f"unknown whether {who} applied it: no answer is stored, and the acks stream no longer "
            f"holds acks stored before {when} (expired or purged)"
        )
        outcome = final_outcome(pending, OutcomeStatus.TIMEOUT, reason, now)
        del job.pending[seq]
        settle(job, outcome)
        ended.append(outcome)
    return ended
