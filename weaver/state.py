"""The weaver's state and every decision it makes, as pure functions of (state, input, now).

No I/O here: `weaver.service` feeds heartbeats, acks and submits in, and carries out what comes back
(commands to publish, outcomes to journal, events to announce). Times are unix seconds.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torchloom import knobs
from torchloom.errors import JobNotFound
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Body,
    Command,
    Heartbeat,
    Issuer,
    JobEvent,
    JobStatus,
    KnobSpec,
    KnobValue,
    Outcome,
    OutcomeStatus,
    RankResult,
    RankState,
    RankStatus,
    RestartRequest,
    SetConfig,
    StatusReply,
    SubmitRequest,
)
from torchloom.naming import base_run_id
from weaver import health_policy as hp
from weaver import registry as rg

REQUIRED_ACTION_ARGS = rg.REQUIRED_ACTION_ARGS
# Who the health policy's own commands are journaled as.
HEALTH_ISSUER = Issuer(kind="rule", identity="health-policy")


@dataclass(slots=True, kw_only=True)
class RankEntry:
    """What the weaver knows of one rank of the current run: its last heartbeat and when it came."""

    heartbeat: Heartbeat
    last_seen_s: float
    last_step_change_at: float = 0.0
    finished_reported: bool = False
    health: hp.HealthKind = hp.HealthKind.HEALTHY
    health_reason: str = ""

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
        last_stream_seq: stream sequence of the run's last message in the commands stream; a
            publish expects it (Nats-Expected-Last-Subject-Sequence) so two weavers never share a seq.
        retired_runs: earlier run ids of this job; their late heartbeats and acks are ignored.
        registry: checkpoints, branches and data sources of the run.
        phase, alerted: the health policy's recovery state (see `health_policy.JobSnapshot`).
        scaled_from: the previous attempt's world, while this attempt of the same run started with
            another world size and not all its ranks have reported yet (see `scale_event`).
    """

    job: str
    run_id: str
    world_size: int
    started_at_s: float
    ranks: dict[int, RankEntry] = field(default_factory=dict)
    knobs: tuple[KnobSpec, ...] = ()
    last_seq: int = 0
    seq_known: bool = False
    last_stream_seq: int = 0
    pending: dict[int, Pending] = field(default_factory=dict)
    retired_runs: set[str] = field(default_factory=set)
    registry: rg.Registry = field(default_factory=rg.Registry)
    phase: hp.Phase = hp.Phase.IDLE
    alerted: frozenset[str] = frozenset()
    scaled_from: PreviousWorld | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PreviousWorld:
    """The world of the attempt a new attempt replaced: its run id, size and each rank's host."""

    run_id: str
    world_size: int
    hosts: tuple[str, ...]  # by rank; "" where a rank never reported


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
        previous = job
        job = None
    else:
        retired = set()
        previous = None
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
        if previous is not None and base_run_id(previous.run_id) == base_run_id(hb.run_id):
            events.append(_resumed_event(job, previous, hb, now))
            if previous.world_size != hb.world_size:
                job.scaled_from = PreviousWorld(
                    run_id=previous.run_id,
                    world_size=previous.world_size,
                    hosts=tuple(
                        e.heartbeat.host if (e := previous.ranks.get(r)) is not None else ""
                        for r in range(previous.world_size)
                    ),
                )
    job.world_size = hb.world_size
    if hb.knobs:
        job.knobs = hb.knobs
    # A rank reports the last seq it decided; never hand out a seq at or below it.
    job.last_seq = max(job.last_seq, hb.last_seq)

    entry = job.ranks.get(hb.rank)
    if entry is None or entry.incarnation != hb.incarnation:
        entry = RankEntry(heartbeat=hb, last_seen_s=now, last_step_change_at=now)
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
        # Progress is a step change or, across a rollback that rewinds the step, a tick change.
        old = entry.heartbeat
        if (hb.step, hb.tick) != (old.step, old.tick) or hb.state is not old.state:
            entry.last_step_change_at = now
        entry.heartbeat = hb
        entry.last_seen_s = now
    if job.scaled_from is not None and len(job.ranks) >= job.world_size:
        events.append(scale_event(job, job.scaled_from, now))
        job.scaled_from = None
    if hb.state is RankState.FINISHED and not entry.finished_reported:
        entry.finished_reported = True
        events.append(
            _event(job, "rank_finished", f"rank {hb.rank} finished at step {hb.step}", now, rank=str(hb.rank))
        )
    return HeartbeatEffects(events=tuple(events), dropped=tuple(dropped), new_run=new_run)


def _resumed_event(job: JobState, previous: JobState, hb: Heartbeat, now: float) -> JobEvent:
    """A restarted attempt of the same run: the steps redone are the old run's furthest step minus
    the step the new attempt starts from.

    That start is the newest checkpoint the old run's registry knows at or before the new attempt's
    first reported step (both restart paths resume from the latest complete checkpoint); the first
    heartbeat alone can come several steps after the load, which would undercount the loss. Without
    a known checkpoint the first reported step is the best bound.
    """
    died_at = max((e.heartbeat.step for e in previous.ranks.values()), default=hb.step)
    ckpt = previous.registry.latest_checkpoint(hb.step)
    start = ckpt.step if ckpt is not None and ckpt.step >= 0 else hb.step
    lost = max(0, died_at - start)
    return _event(
        job,
        "resumed",
        f"run {hb.run_id} resumed run {previous.run_id} at step {start}: {lost} step(s) lost",
        now,
        previous_run=previous.run_id,
        step_at_death=str(died_at),
        resume_step=str(start),
        resume_checkpoint=ckpt.id if ckpt is not None else "",
        first_step=str(hb.step),
        steps_lost=str(lost),
        old_world_size=str(previous.world_size),
        new_world_size=str(hb.world_size),
    )


def scale_event(job: JobState, previous: PreviousWorld, now: float) -> JobEvent:
    """A "scale_down" (or "scale_up") event: this attempt of a run has fewer (more) ranks than the
    attempt it replaced, e.g. torchrun re-rendezvoused without a lost node (or with a new one).

    Ranks are renumbered 0..n-1 on every rendezvous, so `lost_ranks` (`added_ranks`) names the rank
    numbers that no longer (newly) exist; `lost_hosts` (`added_hosts`) compares the hosts of the two
    worlds rank by rank as multisets, so a host that ran two ranks and now runs one is listed once.
    """
    old, new = previous.world_size, job.world_size
    hosts = tuple(job.ranks[r].heartbeat.host if r in job.ranks else "" for r in range(new))
    down = new < old
    ranks = range(new, old) if down else range(old, new)
    gone = Counter(previous.hosts) - Counter(hosts) if down else Counter(hosts) - Counter(previous.hosts)
    which = "lost" if down else "added"
    return _event(
        job,
        "scale_down" if down else "scale_up",
        f"run {job.run_id} runs on {new} rank(s), run {previous.run_id} ran on {old}",
        now,
        previous_run=previous.run_id,
        old_world_size=str(old),
        new_world_size=str(new),
        **{f"{which}_ranks": ",".join(map(str, ranks)), f"{which}_hosts": ",".join(sorted(gone.elements()))},
        old_hosts=",".join(previous.hosts),
        new_hosts=",".join(hosts),
    )


def is_alive(entry: RankEntry, now: float, dead_after_s: float) -> bool:
    """A rank is alive while its last heartbeat is within `dead_after_s` and it has not finished."""
    return entry.heartbeat.state is not RankState.FINISHED and now - entry.last_seen_s <= dead_after_s


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


def job_facts(job: JobState) -> rg.JobFacts:
    """The facts action validation reads from the job's heartbeats."""
    beats = [e.heartbeat for e in job.ranks.values()]
    return rg.JobFacts(
        job=job.job,
        world_size=job.world_size,
        # Every rank must allow it: one rank launched without the flag refuses anyway.
        fault_injection_allowed=bool(beats) and all(b.fault_injection_allowed for b in beats),
    )


def validate_body(job: JobState, body: Body) -> Body:
    """Check a command body against the job; return it as it is to be published.

    Knob values come back typed; a rollback comes back with the resolved checkpoint id and path.

    Raises:
        CommandRejected: an invalid knob assignment or action argument (see `registry.validate_action`).
    """
    if isinstance(body, SetConfig):
        typed = knobs.validate_set(knobs.schema_of(job.knobs), body.values)
        return SetConfig(values=typed)
    assert isinstance(body, Action)
    in_flight = (p.command for p in job.pending.values())
    return rg.validate_action(job.registry, job_facts(job), body, in_flight)


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


def set_seq_floor(state: WeaverState, job_name: str, run_id: str, last_seq: int, stream_seq: int = 0) -> None:
    """Record the last seq the commands stream holds for a run, so a restarted weaver never reuses one.

    `stream_seq` is that message's stream sequence (0: the run has no command yet); the next publish
    expects it, so a command another weaver slipped in meanwhile is detected.
    """
    job = state.jobs.get(job_name)
    if job is None or job.run_id != run_id:
        return
    job.last_seq = max(job.last_seq, last_seq)
    job.last_stream_seq = stream_seq
    job.seq_known = True


def mark_stored(state: WeaverState, cmd: Command, stream_seq: int) -> None:
    """Remember the stream sequence JetStream gave a published command."""
    job = state.jobs.get(cmd.job)
    if job is not None and job.run_id == cmd.run_id:
        job.last_stream_seq = max(job.last_stream_seq, stream_seq)


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
            detail=dict(a.detail),
            branch=a.branch,
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
    """`"rank 1: ...; rank 0: ..."`: ranks that refused on their own first, then those that only
    followed a peer's refusal (`Ack.refused_by_peer`)."""
    rejected = [a for a in acks.values() if a.status is AckStatus.REJECTED]
    rejected.sort(key=lambda a: (a.refused_by_peer, a.rank))
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
    if pending.world_size < 1:  # recovered before any heartbeat told the world size
        pending.world_size = job.world_size
    if not 0 <= ack.rank < pending.world_size or ack.rank in pending.acks:
        return None
    pending.acks[ack.rank] = ack
    outcome = compute_outcome(pending, now)
    if outcome is not None:
        del job.pending[ack.seq]
        settle(job, outcome)
    return outcome


def settle(job: JobState, outcome: Outcome) -> None:
    """Fold a final outcome of the job's run into its registry and recovery phase."""
    rg.apply_outcome(job.registry, outcome)
    cmd = outcome.command
    if (
        cmd is not None
        and job.phase is hp.Phase.PAUSED
        and outcome.status is OutcomeStatus.APPLIED
        and isinstance(cmd.body, Action)
        and cmd.body.kind is ActionKind.RESUME
    ):
        job.phase = hp.Phase.IDLE


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
            health=e.health.value,
            health_reason=e.health_reason,
            branch=e.heartbeat.branch,
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
        checkpoints=tuple(job.registry.checkpoints.values()),
        branches=tuple(job.registry.branches.values()),
        branch=job.registry.branch,
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


# ---- health -------------------------------------------------------------------------------------

# The event announcing a transition into each condition.
_HEALTH_EVENT = {
    hp.HealthKind.DEAD: "rank_dead",
    hp.HealthKind.HUNG: "rank_hung",
    hp.HealthKind.STRAGGLER: "rank_straggler",
    hp.HealthKind.UNHEALTHY: "device_unhealthy",
    hp.HealthKind.HEALTHY: "rank_recovered",
}
GRAD_ACCUM_KNOB = "grad_accum_steps"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPlan:
    """What the health policy ordered for one job, for the service to carry out in order.

    Attributes:
        submits: commands (checkpoint, pause) issued as `HEALTH_ISSUER` through the normal submit path.
        restart: the request for the launcher; an empty `checkpoint_id` is filled with the checkpoint
            an earlier submit of this plan took.
    """

    job: str
    run_id: str
    submits: tuple[SubmitRequest, ...] = ()
    restart: RestartRequest | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthEffects:
    events: tuple[JobEvent, ...] = ()
    plans: tuple[HealthPlan, ...] = ()


def _grad_accum(job: JobState) -> int:
    for spec in job.knobs:
        if spec.name == GRAD_ACCUM_KNOB and isinstance(spec.value, int) and not isinstance(spec.value, bool):
            return max(1, spec.value)
    return 1


def _action_event(job: JobState, action: hp.Action, now: float) -> JobEvent:
    attrs: dict[str, str] = {"action": type(action).__name__}
    if isinstance(action, hp.Alert):
        attrs |= {"key": action.key, "severity": action.severity, "ranks": ",".join(map(str, action.ranks))}
        message = action.message
    elif isinstance(action, hp.Restart):
        attrs |= {
            "world_size": str(action.world_size),
            "from_step": "" if action.from_step is None else str(action.from_step),
            "exclude_devices": ",".join(action.exclude_devices),
            "spares": ",".join(action.spares),
            "steps_lost": str(action.steps_lost),
        }
        message = action.reason
    elif isinstance(action, hp.SetGradAccum):
        attrs |= {"old": str(action.old), "new": str(action.new)}
        message = action.reason
    elif isinstance(action, hp.CheckpointAt):
        attrs["step"] = str(action.step)
        message = action.reason
    else:
        message = action.reason
    return _event(job, "health_action", message, now, **attrs)


def _plan(
    job: JobState, actions: list[hp.Action], health: Mapping[int, hp.RankHealth], now: float
) -> HealthPlan | None:
    submits: list[SubmitRequest] = []
    restart: RestartRequest | None = None
    checkpointing = False
    grad_accum = _grad_accum(job)
    for a in actions:
        if isinstance(a, hp.SetGradAccum):
            grad_accum = a.new
    for a in actions:
        if isinstance(a, hp.CheckpointAt):
            checkpointing = True
            submits.append(
                SubmitRequest(job=job.job, issuer=HEALTH_ISSUER, body=Action(kind=ActionKind.CHECKPOINT))
            )
        elif isinstance(a, hp.PauseJob):
            submits.append(
                SubmitRequest(job=job.job, issuer=HEALTH_ISSUER, body=Action(kind=ActionKind.PAUSE))
            )
        elif isinstance(a, hp.Restart):
            excluded = sorted(
                r
                for r, h in health.items()
                if h.kind is not hp.HealthKind.HEALTHY and h.device in a.exclude_devices
            )
            ck = None if a.from_step is None or checkpointing else job.registry.latest_checkpoint(a.from_step)
            restart = RestartRequest(
                job=job.job,
                run_id=job.run_id,
                world_size=a.world_size,
                exclude_ranks=tuple(excluded),
                grad_accum_steps=grad_accum,
                checkpoint_id=ck.id if ck is not None else "",
                checkpoint_path=ck.path if ck is not None else "",
                steps_lost=a.steps_lost,
                reason=a.reason,
                time_s=now,
            )
    if not submits and restart is None:
        return None
    return HealthPlan(job=job.job, run_id=job.run_id, submits=tuple(submits), restart=restart)


def restart_event(req: RestartRequest) -> JobEvent:
    """The "restart" JobEvent the weaver announces (and journals) when it sends `req` to the launcher."""
    return JobEvent(
        job=req.job,
        run_id=req.run_id,
        kind="restart",
        message=req.reason,
        time_s=req.time_s,
        attrs={
            "world_size": str(req.world_size),
            "exclude_ranks": ",".join(map(str, req.exclude_ranks)),
            "grad_accum_steps": str(req.grad_accum_steps),
            "checkpoint_id": req.checkpoint_id,
            "checkpoint_path": req.checkpoint_path,
            "steps_lost": str(req.steps_lost),
        },
    )


def check_health(state: WeaverState, now: float, policy: hp.HealthPolicy) -> HealthEffects:
    """Classify every rank, announce transitions, and decide what the policy orders.

    Each transition gives one event (`rank_dead`, `rank_hung`, `rank_straggler`, `device_unhealthy`,
    or `rank_recovered` back to healthy); each decided action gives a `health_action` event; checkpoint,
    pause and restart come back as plans. The job's phase and alerted conditions are updated so the
    same decision is not made twice.
    """
    events: list[JobEvent] = []
    plans: list[HealthPlan] = []
    for _, job in sorted(state.jobs.items()):
        if not job.ranks:
            continue
        views = [
            hp.RankView.from_heartbeat(
                e.heartbeat, received_at=e.last_seen_s, last_step_change_at=e.last_step_change_at
            )
            for e in job.ranks.values()
        ]
        health = policy.classify(views, now)
        for rank, h in sorted(health.items()):
            entry = job.ranks[rank]
            if h.kind is not entry.health and not (
                h.kind is hp.HealthKind.HEALTHY and h.reason == "finished"
            ):
                events.append(
                    _event(
                        job,
                        _HEALTH_EVENT[h.kind],
                        f"rank {rank} {h.kind.value}" + (f": {h.reason}" if h.reason else ""),
                        now,
                        rank=str(rank),
                        reason=h.reason,
                        device=h.device,
                        incarnation=entry.incarnation,
                    )
                )
            entry.health, entry.health_reason = h.kind, h.reason
        step = max(e.heartbeat.step for e in job.ranks.values())
        latest = job.registry.latest_checkpoint(step) if step >= 0 else None
        snap = hp.JobSnapshot(
            job=job.job,
            world_size=max(1, job.world_size),
            step=max(0, step),
            latest_checkpoint_step=latest.step if latest is not None and latest.step >= 0 else None,
            grad_accum_steps=_grad_accum(job),
            phase=job.phase,
            alerted=job.alerted,
        )
        actions = hp.decide(snap, health, policy)
        after = snap.after(actions, health)
        job.phase, job.alerted = after.phase, after.alerted
        events.extend(_action_event(job, a, now) for a in actions)
        plan = _plan(job, actions, health, now)
        if plan is not None:
            plans.append(plan)
    return HealthEffects(events=tuple(events), plans=tuple(plans))


def set_phase(state: WeaverState, job_name: str, run_id: str, phase: hp.Phase) -> None:
    """Move a job's recovery along once the service has carried out (or failed) a plan."""
    job = state.jobs.get(job_name)
    if job is not None and job.run_id == run_id:
        job.phase = phase


# ---- restart recovery ---------------------------------------------------------------------------


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

    Ranks are not restored: they come back with their next heartbeat, under the same run.
    """
    for entry in entries:
        if isinstance(entry, JobEvent):
            if entry.kind == "run_started" and entry.run_id:
                world = int(entry.attrs.get("world_size", "0") or 0)
                _recovered_job(state, entry.job, entry.run_id, world, entry.time_s)
            continue
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
        if cmd.seq not in job.registry.finished_seqs and cmd.seq not in job.pending:
            job.pending[cmd.seq] = Pending(
                command=cmd,
                world_size=job.world_size,
                submitted_at_s=cmd.issued_at_s,
                published_at_s=cmd.issued_at_s,
            )
    job.seq_known = True
