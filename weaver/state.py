"""The weaver's state and every decision it makes, as pure functions of (state, input, now).

No I/O here: `weaver.service` feeds heartbeats, acks and submits in, and carries out what comes back
(commands to publish, outcomes to journal, events to announce). Times are unix seconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from torchloom import knobs
from torchloom.errors import CommandRejected, JobNotFound
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Body,
    Command,
    Heartbeat,
    JobEvent,
    JobStatus,
    KnobSpec,
    KnobValue,
    Outcome,
    OutcomeStatus,
    RankResult,
    RankState,
    RankStatus,
    SetConfig,
    StatusReply,
    SubmitRequest,
)

# The reason a threadlet gives on ranks that rejected a command only because another rank refused it;
# the outcome lists the ranks that refused on their own first.
SECONDARY_REFUSAL = "refused by another rank"

# Arguments an action cannot do without.
REQUIRED_ACTION_ARGS: Mapping[ActionKind, tuple[str, ...]] = {
    ActionKind.ROLLBACK: ("checkpoint",),
    ActionKind.DATA_ADD: ("name", "path"),
}


@dataclass(slots=True, kw_only=True)
class RankEntry:
    """What the weaver knows of one rank of the current run: its last heartbeat and when it came."""

    heartbeat: Heartbeat
    last_seen_s: float
    dead_reported: bool = False
    finished_reported: bool = False

    @property
    def incarnation(self) -> str:
        return self.heartbeat.incarnation


@dataclass(slots=True, kw_only=True)
class Pending:
    """A published command waiting for one ack per rank."""

    command: Command
    world_size: int
    submitted_at_s: float
    published_at_s: float = 0.0
    acks: dict[int, Ack] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class JobState:
    """One job and its current run.

    Attributes:
        last_seq: the highest seq assigned (or seen) in this run.
        seq_known: last_seq has been checked against the commands stream, so a new seq is safe.
        retired_runs: earlier run ids of this job; their late heartbeats and acks are ignored.
    """

    job: str
    run_id: str
    world_size: int
    started_at_s: float
    ranks: dict[int, RankEntry] = field(default_factory=dict)
    knobs: tuple[KnobSpec, ...] = ()
    last_seq: int = 0
    seq_known: bool = False
    pending: dict[int, Pending] = field(default_factory=dict)
    retired_runs: set[str] = field(default_factory=set)


@dataclass(slots=True)
class WeaverState:
    """Every job the weaver has heard of, by name."""

    jobs: dict[str, JobState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatEffects:
    """What a heartbeat changed: events to announce, and outcomes of commands a new run dropped."""

    events: tuple[JobEvent, ...] = ()
    dropped: tuple[Outcome, ...] = ()
    new_run: bool = False


# ---- heartbeats and liveness --------------------------------------------------------------------


def _event(job: JobState, kind: str, message: str, now: float, **attrs: str) -> JobEvent:
    return JobEvent(job=job.job, run_id=job.run_id, kind=kind, message=message, time_s=now, attrs=attrs)


def observe_heartbeat(state: WeaverState, hb: Heartbeat, now: float) -> HeartbeatEffects:
    """Fold one heartbeat into the state.

    A heartbeat with a run id the job has not had before starts a new run: ranks and in-flight
    commands of the old run are dropped (their outcomes come back as TIMEOUT) and seq restarts at 1.
    Heartbeats of a retired run are ignored.
    """
    events: list[JobEvent] = []
    dropped: list[Outcome] = []
    job = state.jobs.get(hb.job)
    new_run = False
    if job is not None and hb.run_id != job.run_id:
        if hb.run_id in job.retired_runs:
            return HeartbeatEffects()
        for pending in job.pending.values():
            dropped.append(
                _final_outcome(
                    pending,
                    OutcomeStatus.TIMEOUT,
                    f"run {job.run_id} was replaced by run {hb.run_id} before every rank answered",
                    now,
                )
            )
        retired = job.retired_runs | {job.run_id}
        job = None
    else:
        retired = set()
    if job is None:
        new_run = True
        job = JobState(
            job=hb.job, run_id=hb.run_id, world_size=hb.world_size, started_at_s=now, retired_runs=retired
        )
        state.jobs[hb.job] = job
        events.append(
            _event(
                job,
                "run_started",
                f"run {hb.run_id} of job {hb.job} started",
                now,
                world_size=str(hb.world_size),
            )
        )
    job.world_size = hb.world_size
    if hb.knobs:
        job.knobs = hb.knobs
    # A rank reports the last seq it decided; never hand out a seq at or below it.
    job.last_seq = max(job.last_seq, hb.last_seq)

    entry = job.ranks.get(hb.rank)
    if entry is None or entry.incarnation != hb.incarnation:
        entry = RankEntry(heartbeat=hb, last_seen_s=now)
        job.ranks[hb.rank] = entry
        events.append(
            _event(
                job,
                "rank_joined",
                f"rank {hb.rank} joined (incarnation {hb.incarnation}, {hb.host or '?'} pid {hb.pid})",
                now,
                rank=str(hb.rank),
                incarnation=hb.incarnation,
                host=hb.host,
                pid=str(hb.pid),
            )
        )
    else:
        if entry.dead_reported:
            entry.dead_reported = False
            events.append(
                _event(job, "rank_alive", f"rank {hb.rank} is heartbeating again", now, rank=str(hb.rank))
            )
        entry.heartbeat = hb
        entry.last_seen_s = now
    if hb.state is RankState.FINISHED and not entry.finished_reported:
        entry.finished_reported = True
        events.append(
            _event(job, "rank_finished", f"rank {hb.rank} finished at step {hb.step}", now, rank=str(hb.rank))
        )
    return HeartbeatEffects(events=tuple(events), dropped=tuple(dropped), new_run=new_run)


def is_alive(entry: RankEntry, now: float, dead_after_s: float) -> bool:
    """A rank is alive while its last heartbeat is within `dead_after_s` and it has not finished."""
    return entry.heartbeat.state is not RankState.FINISHED and now - entry.last_seen_s <= dead_after_s


def check_liveness(state: WeaverState, now: float, dead_after_s: float) -> list[JobEvent]:
    """Return one `rank_dead` event for each rank that went silent since the last check."""
    events: list[JobEvent] = []
    for job in state.jobs.values():
        for rank, entry in sorted(job.ranks.items()):
            if entry.dead_reported or entry.heartbeat.state is RankState.FINISHED:
                continue
            silent_s = now - entry.last_seen_s
            if silent_s > dead_after_s:
                entry.dead_reported = True
                events.append(
                    _event(
                        job,
                        "rank_dead",
                        f"rank {rank} sent no heartbeat for {silent_s:.1f}s (limit {dead_after_s:g}s)",
                        now,
                        rank=str(rank),
                        incarnation=entry.incarnation,
                    )
                )
    return events


def _has_live_ranks(job: JobState, now: float, dead_after_s: float) -> bool:
    return any(is_alive(e, now, dead_after_s) for e in job.ranks.values())


def resolve_job(state: WeaverState, name: str, now: float, dead_after_s: float) -> JobState:
    """Find a job by name; an empty name means the only job with live ranks.

    Raises:
        JobNotFound: no such job, or (for an empty name) none or several jobs run. The message lists
            the known jobs and says to pass --job.
    """
    known = ", ".join(sorted(state.jobs)) or "none"
    if name:
        job = state.jobs.get(name)
        if job is None:
            raise JobNotFound(f"no job named {name!r}: known jobs are {known}; pass --job with one of them")
        return job
    live = [j for j in state.jobs.values() if _has_live_ranks(j, now, dead_after_s)]
    if len(live) == 1:
        return live[0]
    if not live:
        raise JobNotFound(
            f"no job has live ranks (known jobs: {known}); start one with `torchloom run`, "
            "or pass --job NAME to address a known job"
        )
    names = ", ".join(sorted(j.job for j in live))
    raise JobNotFound(f"several jobs are running ({names}): pass --job NAME to pick one")


# ---- submits ------------------------------------------------------------------------------------


def validate_body(job: JobState, body: Body) -> Body:
    """Check a command body against the job; return it with typed values.

    Raises:
        CommandRejected: an invalid knob assignment or a missing action argument.
    """
    if isinstance(body, SetConfig):
        typed = knobs.validate_set(knobs.schema_of(job.knobs), body.values)
        return SetConfig(values=typed)
    assert isinstance(body, Action)
    for arg in REQUIRED_ACTION_ARGS.get(body.kind, ()):
        if not body.args.get(arg, "").strip():
            needed = " and ".join(f"{a}=..." for a in REQUIRED_ACTION_ARGS[body.kind])
            raise CommandRejected(
                f"action {body.kind.value} needs argument {arg!r}: pass {needed}", key=body.kind.value
            )
    return body


def plan_submit(
    state: WeaverState,
    req: SubmitRequest,
    now: float,
    dead_after_s: float,
    *,
    command_id: str | None = None,
) -> Command:
    """Validate a submit and turn it into the next command of the job's run.

    The seq is consumed only when validation passes. The command is tracked as pending from here on.
    The caller must have made `seq_known` true (see `set_seq_floor`).

    Raises:
        JobNotFound: see `resolve_job`.
        CommandRejected: see `validate_body`.
    """
    job = resolve_job(state, req.job, now, dead_after_s)
    assert job.seq_known, "the seq floor must be loaded before planning"
    body = validate_body(job, req.body)
    job.last_seq += 1
    cmd = Command(
        command_id=command_id or uuid.uuid4().hex,
        job=job.job,
        run_id=job.run_id,
        seq=job.last_seq,
        issuer=req.issuer,
        issued_at_s=now,
        body=body,
    )
    job.pending[cmd.seq] = Pending(command=cmd, world_size=job.world_size, submitted_at_s=now)
    return cmd


def set_seq_floor(state: WeaverState, job_name: str, run_id: str, last_seq: int) -> None:
    """Record the last seq the commands stream holds for a run, so a restarted weaver never reuses one."""
    job = state.jobs.get(job_name)
    if job is None or job.run_id != run_id:
        return
    job.last_seq = max(job.last_seq, last_seq)
    job.seq_known = True


def mark_published(state: WeaverState, cmd: Command, now: float) -> None:
    job = state.jobs.get(cmd.job)
    if job is not None and job.run_id == cmd.run_id and cmd.seq in job.pending:
        job.pending[cmd.seq].published_at_s = now


def abandon(state: WeaverState, cmd: Command) -> None:
    """Forget a command whose publish failed.

    The publish may still have reached the stream, so the seq floor must be read again before the
    next command gets a seq.
    """
    job = state.jobs.get(cmd.job)
    if job is None or job.run_id != cmd.run_id:
        return
    job.pending.pop(cmd.seq, None)
    if job.last_seq == cmd.seq:
        job.last_seq -= 1
    job.seq_known = False


def rejected_outcome(req: SubmitRequest, reason: str, now: float) -> Outcome:
    """The answer to a submit that failed validation: nothing was published."""
    return Outcome(
        command_id=uuid.uuid4().hex,
        job=req.job,
        status=OutcomeStatus.REJECTED,
        reason=reason,
        submitted_at_s=now,
        completed_at_s=now,
    )


# ---- acks and outcomes --------------------------------------------------------------------------


def _results(pending: Pending) -> tuple[RankResult, ...]:
    return tuple(
        RankResult(
            rank=a.rank,
            status=a.status,
            step=a.step,
            reason=a.reason,
            received_at_s=a.received_at_s,
            decided_at_s=a.decided_at_s,
        )
        for _, a in sorted(pending.acks.items())
    )


def _final_outcome(pending: Pending, status: OutcomeStatus, reason: str, now: float) -> Outcome:
    return Outcome(
        command_id=pending.command.command_id,
        job=pending.command.job,
        status=status,
        reason=reason,
        results=_results(pending),
        command=pending.command,
        submitted_at_s=pending.submitted_at_s,
        published_at_s=pending.published_at_s,
        completed_at_s=now,
    )


def rejection_reason(acks: Mapping[int, Ack]) -> str:
    """`"rank 1: ...; rank 0: ..."`: ranks that refused on their own first, then the others."""
    rejected = [a for a in acks.values() if a.status is AckStatus.REJECTED]
    rejected.sort(key=lambda a: (SECONDARY_REFUSAL in a.reason, a.rank))
    return "; ".join(f"rank {a.rank}: {a.reason or 'rejected'}" for a in rejected)


def compute_outcome(pending: Pending, now: float) -> Outcome | None:
    """The final outcome once every rank answered, else None."""
    if len(pending.acks) < pending.world_size:
        return None
    if all(a.status is AckStatus.APPLIED for a in pending.acks.values()):
        return _final_outcome(pending, OutcomeStatus.APPLIED, "", now)
    return _final_outcome(pending, OutcomeStatus.REJECTED, rejection_reason(pending.acks), now)


def record_ack(state: WeaverState, ack: Ack, now: float) -> Outcome | None:
    """Fold one rank's ack in; return the final outcome when it was the last one missing.

    Acks of other runs, of unknown or finished commands, from ranks outside the world and
    duplicates of an (seq, rank) already counted are ignored.
    """
    job = state.jobs.get(ack.job)
    if job is None or job.run_id != ack.run_id:
        return None
    pending = job.pending.get(ack.seq)
    if pending is None or (ack.command_id and ack.command_id != pending.command.command_id):
        return None
    if not 0 <= ack.rank < pending.world_size or ack.rank in pending.acks:
        return None
    pending.acks[ack.rank] = ack
    outcome = compute_outcome(pending, now)
    if outcome is not None:
        del job.pending[ack.seq]
    return outcome


def timeout_outcome(state: WeaverState, cmd: Command, timeout_s: float, now: float) -> Outcome:
    """What a submitter gets when its deadline passes first; the command stays in flight."""
    job = state.jobs.get(cmd.job)
    pending = job.pending.get(cmd.seq) if job is not None and job.run_id == cmd.run_id else None
    if pending is None:
        return Outcome(
            command_id=cmd.command_id,
            job=cmd.job,
            status=OutcomeStatus.TIMEOUT,
            reason=f"no final answer within {timeout_s:g}s",
            command=cmd,
            completed_at_s=now,
        )
    answered = sorted(pending.acks)
    missing = [r for r in range(pending.world_size) if r not in pending.acks]
    reason = (
        f"rank(s) {', '.join(map(str, missing))} did not answer within {timeout_s:g}s "
        f"(answered: {', '.join(map(str, answered)) or 'none'}); the command stays in flight"
    )
    outcome = _final_outcome(pending, OutcomeStatus.TIMEOUT, reason, now)
    return outcome


def outcome_event(outcome: Outcome, now: float) -> JobEvent:
    """The `command` job event announcing a final outcome."""
    cmd = outcome.command
    what = "command"
    run_id = ""
    if cmd is not None:
        run_id = cmd.run_id
        if isinstance(cmd.body, SetConfig):
            what = "set " + " ".join(f"{k}={v}" for k, v in sorted(cmd.body.values.items()))
        else:
            what = cmd.body.kind.value
        what = f"#{cmd.seq} {what}"
    message = f"{what}: {outcome.status.value}" + (f" ({outcome.reason})" if outcome.reason else "")
    attrs = {"status": outcome.status.value}
    if cmd is not None:
        attrs["seq"] = str(cmd.seq)
    return JobEvent(
        job=outcome.job,
        run_id=run_id,
        kind="command",
        message=message,
        time_s=now,
        command_id=outcome.command_id,
        attrs=attrs,
    )


# ---- status -------------------------------------------------------------------------------------


def _knob_values(specs: tuple[KnobSpec, ...]) -> dict[str, KnobValue]:
    return {s.name: s.value for s in specs if s.value is not None}


def job_status(job: JobState, now: float, dead_after_s: float) -> JobStatus:
    ranks = tuple(
        RankStatus(
            rank=rank,
            step=e.heartbeat.step,
            state=e.heartbeat.state,
            last_heartbeat_s=max(0.0, now - e.last_seen_s),
            host=e.heartbeat.host,
            pid=e.heartbeat.pid,
            incarnation=e.incarnation,
            knobs=_knob_values(e.heartbeat.knobs),
            device=e.heartbeat.device,
            step_time_s=e.heartbeat.step_time_s,
            alive=is_alive(e, now, dead_after_s),
            local_rank=e.heartbeat.local_rank,
        )
        for rank, e in sorted(job.ranks.items())
    )
    return JobStatus(
        job=job.job,
        run_id=job.run_id,
        world_size=job.world_size,
        ranks=ranks,
        knobs=job.knobs,
        last_seq=job.last_seq,
    )


def status(state: WeaverState, job_name: str, now: float, dead_after_s: float) -> StatusReply:
    """A snapshot of one job (by name) or, for an empty name, of every known job.

    Raises:
        JobNotFound: a named job the weaver has not heard of.
    """
    if job_name:
        return StatusReply(
            jobs=(job_status(resolve_job(state, job_name, now, dead_after_s), now, dead_after_s),)
        )
    return StatusReply(jobs=tuple(job_status(j, now, dead_after_s) for _, j in sorted(state.jobs.items())))
