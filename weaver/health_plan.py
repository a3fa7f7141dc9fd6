"""Health planning: classify every rank, announce its transitions, and turn the policy's decided
actions into typed plans (commands to submit, a restart request for the launcher).

Pure: `decide_health(state, now, policy)` returns a `HealthDecision` (the effects for the service to
carry out and the per-run updates to apply), `restart_event(req)` and `is_stopping(state, job, run_id)`.

Mutators: `apply_health(state, decision)` records each rank's condition and each job's recovery
phase and alerted conditions in `state`; `check_health(state, now, policy)` is decide then apply,
returning the effects; `set_phase(state, job, run_id, phase)` moves a job's recovery along once the
service has carried out (or failed) a plan; `note_stopping(state, event, now)` marks a run its
launcher is stopping, after which nothing is planned for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from torchloom import naming
from torchloom.messages import Action, ActionKind, Issuer, JobEvent, RestartRequest, SubmitRequest
from weaver import health_policy as hp
from weaver.liveness import rank_health
from weaver.model import JobState, WeaverState, job_event

# Who the health policy's own commands are journaled as.
HEALTH_ISSUER = Issuer(kind="rule", identity="health-policy")


# The event announcing a transition into each condition.
_HEALTH_EVENT = {
    hp.HealthKind.DEAD: "rank_dead",
    hp.HealthKind.HUNG: "rank_hung",
    hp.HealthKind.STRAGGLER: "rank_straggler",
    hp.HealthKind.UNHEALTHY: "device_unhealthy",
    hp.HealthKind.HEALTHY: "rank_recovered",
}
# Ranks that start waiting on a stalled peer after the peer's own event (which lists the waiters it
# has then), and ranks that stop waiting with no recovery event of a stalled peer to say so: one
# event per job and health check for all of them, never one per peer.
RANKS_WAITING = "ranks_waiting"
RANKS_RESUMED = "ranks_resumed"
# The weaver's own journal entry for a launcher's `naming.RUN_STOPPING`: from then on it plans nothing.
HEALTH_STANDING_DOWN = "health_standing_down"


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
    """What the service carries out after a health check: events to announce, plans to run in order."""

    events: tuple[JobEvent, ...] = ()
    plans: tuple[HealthPlan, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHealth:
    """What one health check decided for one job's run: each rank's condition (by rank, with the
    incarnation it was decided for) and the recovery phase and alerted conditions after the actions."""

    job: str
    run_id: str
    ranks: tuple[tuple[int, str, hp.RankHealth], ...]
    phase: hp.Phase
    alerted: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthDecision:
    """A health check's result: the effects for the service, and the state updates `apply_health` makes."""

    effects: HealthEffects
    runs: tuple[RunHealth, ...] = ()
    now: float = 0.0


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
    return job_event(job, "health_action", message, now, **attrs)


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


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, sorted(ranks)))


def _transition_events(job: JobState, health: dict[int, hp.RankHealth], now: float) -> list[JobEvent]:
    """The events of one job's health transitions since the last check (`RankEntry.health`).

    A rank entering a condition gets one event naming the peers waiting on it (attr `waiting`);
    ranks that start waiting later share one `ranks_waiting` event per set of stalled peers; ranks
    that stop waiting are named by a stalled peer's recovery event in the same check, else share
    one `ranks_resumed` event. A finished rank announces nothing here (`rank_finished` did).
    """
    events: list[JobEvent] = []
    announced: set[int] = set()
    late: dict[tuple[int, ...], list[int]] = {}
    resumed: list[int] = []
    peer_recovered: int | None = None  # index of the event of a stalled rank that recovered
    for rank, h in sorted(health.items()):
        entry = job.ranks[rank]
        if h.kind is entry.health or h.finished:
            continue
        if h.kind is hp.HealthKind.WAITING:
            late.setdefault(h.waiting_on, []).append(rank)
            continue
        if entry.health is hp.HealthKind.WAITING and h.kind is hp.HealthKind.HEALTHY:
            resumed.append(rank)
            continue
        attrs = {"rank": str(rank), "reason": h.reason, "device": h.device, "incarnation": entry.incarnation}
        if h.waiters:
            attrs["waiting"] = _ranks(list(h.waiters))
            announced.update(h.waiters)
        if h.kind is hp.HealthKind.HEALTHY and entry.health in hp.STALLING and peer_recovered is None:
            peer_recovered = len(events)
        events.append(
            job_event(
                job,
                _HEALTH_EVENT[h.kind],
                f"rank {rank} {h.kind.value}" + (f": {h.reason}" if h.reason else ""),
                now,
                **attrs,
            )
        )
    for on, ranks in sorted(late.items()):
        fresh = [r for r in ranks if r not in announced]
        if fresh:
            kinds = "/".join(sorted({health[c].kind.value for c in on if c in health}))
            events.append(
                job_event(
                    job,
                    RANKS_WAITING,
                    f"ranks {_ranks(fresh)} waiting on rank(s) {_ranks(list(on))} ({kinds})",
                    now,
                    ranks=_ranks(fresh),
                    waiting_on=_ranks(list(on)),
                )
            )
    if resumed and peer_recovered is not None:
        ev = events[peer_recovered]
        events[peer_recovered] = replace(
            ev,
            message=f"{ev.message}; ranks {_ranks(resumed)} no longer waiting",
            attrs={**ev.attrs, "resumed": _ranks(resumed)},
        )
    elif resumed:
        text = f"ranks {_ranks(resumed)} no longer waiting"
        events.append(job_event(job, RANKS_RESUMED, text, now, ranks=_ranks(resumed)))
    return events


def decide_health(state: WeaverState, now: float, policy: hp.HealthPolicy) -> HealthDecision:
    """Classify every rank, announce transitions, and decide what the policy orders. Changes nothing.

    Each transition gives one event (`rank_dead`, `rank_hung`, `rank_straggler`, `device_unhealthy`,
    or `rank_recovered` back to healthy), and peers waiting on a stalled rank are named in its event
    rather than getting their own (see `_transition_events`); each decided action gives a
    `health_action` event; checkpoint, pause and restart come back as plans. The decision carries
    each job's new phase and alerted conditions so that, once applied, the same decision is not
    made twice.
    """
    events: list[JobEvent] = []
    plans: list[HealthPlan] = []
    runs: list[RunHealth] = []
    for _, job in sorted(state.jobs.items()):
        if not job.ranks:
            continue
        health = rank_health(job, now, policy)
        events.extend(_transition_events(job, health, now))
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
        runs.append(
            RunHealth(
                job=job.job,
                run_id=job.run_id,
                ranks=tuple((rank, job.ranks[rank].incarnation, h) for rank, h in sorted(health.items())),
                phase=after.phase,
                alerted=after.alerted,
            )
        )
        events.extend(_action_event(job, a, now) for a in actions)
        plan = _plan(job, actions, health, now)
        if plan is not None:
            plans.append(plan)
    return HealthDecision(
        effects=HealthEffects(events=tuple(events), plans=tuple(plans)), runs=tuple(runs), now=now
    )


def apply_health(state: WeaverState, decision: HealthDecision) -> None:
    """Record a decision in `state`: each rank's condition, each job's phase and alerted conditions.

    A run or rank incarnation that changed since the decision is left alone (the service applies a
    decision at once, on the same loop, so this does not happen there).
    """
    for run in decision.runs:
        job = state.jobs.get(run.job)
        if job is None or job.run_id != run.run_id:
            continue
        for rank, incarnation, h in run.ranks:
            entry = job.ranks.get(rank)
            if entry is not None and entry.incarnation == incarnation:
                entry.health, entry.health_reason = h.kind, h.reason
                if h.stalled:
                    entry.stalled_at_s = decision.now
                if h.kind in (hp.HealthKind.DEAD, hp.HealthKind.WAITING):
                    entry.excused_at_s = decision.now
        job.phase, job.alerted = run.phase, run.alerted


def check_health(state: WeaverState, now: float, policy: hp.HealthPolicy) -> HealthEffects:
    """`decide_health`, then `apply_health`: the health check the service runs on every liveness tick."""
    decision = decide_health(state, now, policy)
    apply_health(state, decision)
    return decision.effects


def set_phase(state: WeaverState, job_name: str, run_id: str, phase: hp.Phase) -> None:
    """Move a job's recovery along once the service has carried out (or failed) a plan. A stopping
    run stays stopping: a plan that was under way when the stop came does not revive it."""
    job = state.jobs.get(job_name)
    if job is not None and job.run_id == run_id and job.phase is not hp.Phase.STOPPING:
        job.phase = phase


def is_stopping(state: WeaverState, job_name: str, run_id: str) -> bool:
    """Whether that run is ending on its launcher's signal (a plan under way must not go on)."""
    job = state.jobs.get(job_name)
    return job is not None and job.run_id == run_id and job.phase is hp.Phase.STOPPING


def note_stopping(state: WeaverState, event: JobEvent, now: float) -> JobEvent | None:
    """Mark the run a launcher's `naming.RUN_STOPPING` event names as stopping (`Phase.STOPPING`):
    the health policy orders no restart, checkpoint, pause or alert for it from then on.

    The event counts for the job's current run, or when it names an attempt of that run the weaver
    has not seen yet (the launcher relaunched it a moment ago); anything else is stale.

    Returns:
        The weaver's own `HEALTH_STANDING_DOWN` event to journal, or None when the event is not a
        stop, names no run the weaver knows, or the run was already marked.
    """
    if event.kind != naming.RUN_STOPPING:
        return None
    job = state.jobs.get(event.job)
    if job is None or not naming.is_attempt_of(event.run_id, job.run_id):
        return None
    if job.phase is hp.Phase.STOPPING:
        return None
    previous = job.phase
    job.phase = hp.Phase.STOPPING
    signal = event.attrs.get("signal", "")
    return job_event(
        job,
        HEALTH_STANDING_DOWN,
        f"run {job.run_id} is stopping ({signal or 'launcher'}): no restart or health command will be "
        "ordered for it",
        now,
        signal=signal,
        previous_phase=previous.value,
    )
