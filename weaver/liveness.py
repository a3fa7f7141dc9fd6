"""Heartbeats in; liveness, job resolution, run changes (resumed, scale_down/scale_up) and status out.

Mutator: `observe_heartbeat(state, hb, now)` folds a heartbeat into `state` in place (a new run
replaces the job's state, a new incarnation replaces the rank's entry) and returns the effects for
the service to carry out (events to announce, outcomes of commands the new run dropped).

Pure (they read the state, never change it): `known_schema` and `with_known_schema` (a hash-only
heartbeat's schema), `scale_event`, `is_alive`, `resolve_job` (returns the job's live `JobState`,
for the caller to read or hand to a mutator), `rank_health`, `job_status` and `status`.
`rank_health` is the one place a rank's health is computed: status's `alive` and `health`,
`torchloom devices` and the UI's device panel (both read status) and the health events all use it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from torchloom import wire
from torchloom.errors import JobNotFound
from torchloom.messages import (
    Heartbeat,
    JobEvent,
    JobStatus,
    KnobSpec,
    KnobValue,
    Outcome,
    OutcomeStatus,
    RankState,
    RankStatus,
    StatusReply,
)
from torchloom.naming import base_run_id
from weaver import health_policy as hp
from weaver.model import Announced, JobState, PreviousWorld, RankEntry, WeaverState, job_event
from weaver.outcomes import final_outcome


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatEffects:
    """What a heartbeat changed: events to announce, and outcomes of commands a new run dropped."""

    events: tuple[JobEvent, ...] = ()
    dropped: tuple[Outcome, ...] = ()
    new_run: bool = False


_NO_EFFECTS = HeartbeatEffects()


def observe_heartbeat(state: WeaverState, hb: Heartbeat, now: float) -> HeartbeatEffects:
    """Fold one heartbeat into `state`, in place, and return what the service must carry out.

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
            return _NO_EFFECTS
        for pending in job.pending.values():
            dropped.append(
                final_outcome(
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
            job_event(
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
    if not hb.knobs and hb.knobs_hash:  # the weaver's decoder has filled it in already, if it could
        hb = with_known_schema(job, hb)
    if hb.knobs:
        job.knobs = hb.knobs
    # The seq floor comes from the commands stream only (`submits.set_seq_floor`): a heartbeat's
    # last_seq is a claim, and a forged one must not push every later seq out of the ranks' reach.

    entry = job.ranks.get(hb.rank)
    said = job.announced.get(hb.rank)
    if entry is None or entry.incarnation != hb.incarnation:
        entry = RankEntry(heartbeat=hb, last_seen_s=now, last_step_change_at=now)
        job.ranks[hb.rank] = entry
    if said is not None and said.incarnation == hb.incarnation:
        entry.finished_reported = entry.finished_reported or said.finished  # the journal holds it
    else:
        job.announced[hb.rank] = said = Announced(hb.incarnation)
        events.append(
            job_event(
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
    if entry.heartbeat is not hb:
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
        entry.finished_reported = said.finished = True
        events.append(
            job_event(
                job, "rank_finished", f"rank {hb.rank} finished at step {hb.step}", now, rank=str(hb.rank)
            )
        )
    if not (events or dropped or new_run):
        return _NO_EFFECTS  # nearly every heartbeat: nothing to build
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
    return job_event(
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
    return job_event(
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


@dataclass(slots=True)
class ReadClock:
    """How far the weaver has read its heartbeats, so its own lag is never blamed on a rank.

    A heartbeat waiting in the weaver's queue was sent, yet its rank's last-seen time is old until
    it is folded in. So liveness is judged at the time up to which every heartbeat received was
    folded (`judged_at`): the last time the queue was seen empty while it has a backlog, `now`
    without one. While the heartbeat connection is down, heartbeats sent meanwhile are lost rather
    than late: no verdict until it is back, and for `dead_after_s` after that the clock is held back
    by the gap, so a rank has time to be heard again. A tick that itself ran late (the event loop
    was starved: its reads are late too) gives no verdict. Pure: the caller passes every time.
    """

    caught_up_at: float = 0.0  # when the heartbeat queue was last seen empty after a fold
    disconnected_at: float | None = None  # since when the heartbeat connection is down
    gap_s: float = 0.0  # the last disconnection's length
    gap_until: float = 0.0  # the clock is held back by gap_s until then

    def drained(self, now: float) -> None:
        """The heartbeat queue was empty at `now` (every heartbeat received so far is folded)."""
        self.caught_up_at = now

    def disconnected(self, now: float) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = now

    def reconnected(self, now: float, dead_after_s: float) -> None:
        if self.disconnected_at is not None:
            self.gap_s = max(0.0, now - self.disconnected_at)
            self.gap_until = now + dead_after_s
            self.disconnected_at = None

    def judged_at(self, now: float, *, backlog: int, tick_late_s: float, dead_after_s: float) -> float | None:
        """The time to judge liveness at, or None for no verdict now.

        Args:
            backlog: heartbeats received and not folded yet.
            tick_late_s: how late the liveness tick that asks woke up.
        """
        if self.disconnected_at is not None or tick_late_s > dead_after_s / 2:
            return None
        if backlog and not self.caught_up_at:
            return None  # behind since the start: nothing is known to be read up to any time
        at = now if backlog == 0 else min(now, self.caught_up_at)
        if now < self.gap_until:
            at -= self.gap_s
        return at


def is_alive(entry: RankEntry, now: float, dead_after_s: float) -> bool:
    """A rank is alive while its last heartbeat is within `dead_after_s` and it has not finished."""
    return entry.heartbeat.state is not RankState.FINISHED and now - entry.last_seen_s <= dead_after_s


def silent_ranks(state: WeaverState, now: float, dead_after_s: float) -> int:
    """How many unfinished ranks of every job have been silent over `dead_after_s` at `now`: one pass
    with no allocation per rank, for a liveness tick to tell whether anything changed."""
    cutoff = now - dead_after_s
    finished = RankState.FINISHED
    return sum(
        1
        for job in state.jobs.values()
        for e in job.ranks.values()
        if e.last_seen_s < cutoff and e.heartbeat.state is not finished
    )


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


# ---- status ----------------------------------------------------------------------------------------


def known_schema(job: JobState, rank: int, incarnation: str, knobs_hash: int) -> tuple[KnobSpec, ...] | None:
    """The knob schema (with its last values) the rank's process last reported with that hash, in
    full or filled in; None for another process, another hash, or a last heartbeat without one."""
    entry = job.ranks.get(rank)
    if entry is None or entry.incarnation != incarnation:
        return None
    last = entry.heartbeat
    if last.knobs_hash != knobs_hash or not last.knobs:
        return None
    return last.knobs


def with_known_schema(job: JobState, hb: Heartbeat) -> Heartbeat:
    """`hb` with its knob schema: a heartbeat that sent only the schema's hash (and the current
    values) gets the schema its rank's process last sent in full with that hash. An unknown hash
    (a weaver that started since) leaves it without knobs until the rank sends the schema again.
    (The weaver's decoder fills the schema in already, `wire.HeartbeatDecoder`; this serves a
    heartbeat decoded otherwise.)"""
    if hb.knobs or not hb.knobs_hash:
        return hb
    specs = known_schema(job, hb.rank, hb.incarnation, hb.knobs_hash)
    if specs is None:
        return hb
    # Values as before (every heartbeat between two full schemas): the last specs serve again as
    # they are; only a changed value makes a new spec.
    return dataclasses.replace(hb, knobs=wire.with_knob_values(specs, hb.knob_values))


def _knob_values(specs: tuple[KnobSpec, ...]) -> dict[str, KnobValue]:
    return {s.name: s.value for s in specs if s.value is not None}


def rank_health(job: JobState, now: float, policy: hp.HealthPolicy) -> dict[int, hp.RankHealth]:
    """Every rank's health at `now` under `policy`'s thresholds, by rank (`HealthPolicy.classify`)."""
    views = [
        hp.RankView.from_heartbeat(
            e.heartbeat,
            received_at=e.last_seen_s,
            last_step_change_at=e.last_step_change_at,
            stalled_at=e.stalled_at_s,
            excused_at=e.excused_at_s,
        )
        for e in job.ranks.values()
    ]
    return policy.classify(views, now)


def job_status(job: JobState, now: float, policy: hp.HealthPolicy) -> JobStatus:
    """A snapshot of one job: its run, ranks (with liveness and health), knobs and registry.

    Each rank's `alive`, `health` and `health_reason` come from one `rank_health` result, so they
    never disagree with each other nor with `torchloom devices`.
    """
    health = rank_health(job, now, policy)
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
            alive=health[rank].alive,
            local_rank=e.heartbeat.local_rank,
            health=health[rank].kind.value,
            health_reason=health[rank].reason,
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


def status(state: WeaverState, job_name: str, now: float, policy: hp.HealthPolicy) -> StatusReply:
    """A snapshot of one job (by name) or, for an empty name, of every known job, with each rank's
    health under `policy`.

    Raises:
        JobNotFound: a named job the weaver has not heard of.
    """
    if job_name:
        job = resolve_job(state, job_name, now, policy.dead_after_s)
        return StatusReply(jobs=(job_status(job, now, policy),))
    return StatusReply(jobs=tuple(job_status(j, now, policy) for _, j in sorted(state.jobs.items())))
