"""The autopilot of one job: its policy's rules evaluated over the job's model health signals at every
metrics report, through the guardrails, into firings the weaver submits like any command.

`Pilot` is the per-job state (signal track, knob start values, firing history, pending proposals).
Its mutators take the job's `JobState` snapshot and `now` and return what to do; they never do I/O:
`on_metrics(pilot, job, metrics, now)`, `approve(pilot, id, now)` and `refuse(pilot, id, now)`.
A firing's requests carry issuer kind "rule" and identity "rule:<name>"; its journal event
("rule_fired", "rule_dry_run", "rule_proposed", "rule_refused") carries the rule, the signal window
and the commands, so the journal says why every automated command was sent.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torchloom.messages import Action, ActionKind, Body, Issuer, JobEvent, KnobValue, SetConfig, SubmitRequest
from weaver import guardrails
from weaver import signals as sg
from weaver.model import JobState
from weaver.rules import LAST_GOOD, ActionStep, AlertStep, Policy, Rule, SetStep, Step, factor_of

ISSUER_KIND = "rule"
SIGNAL_EVENT_INTERVAL_S = 10.0  # one "signal" event per signal kind and job at most this often
REFUSAL_EVENT_INTERVAL_S = 60.0  # one "rule_refused" event per rule at most this often
MAX_PROPOSALS = 64
POLICY_SET = "policy_set"  # the journal event of a job's policy (weaver.steering); it drops proposals
# A pending proposal a new weaver (a restart, a standby taking over) does not hold: its journal event.
PROPOSAL_DROPPED = "proposal_dropped"
_PROPOSED = frozenset({"rule_proposed", "agent_proposed"})
_CLOSED = frozenset(
    {
        "rule_approved",
        "agent_approved",
        "rule_refused_by_operator",
        "agent_refused_by_operator",
        PROPOSAL_DROPPED,
    }
)


class Mode(StrEnum):
    SEND = "send"
    DRY_RUN = "dry_run"
    PROPOSED = "proposed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Firing:
    """A rule that fired: the commands to submit (in order) and the journal event that explains them."""

    rule: str  # the rule's name; for an agent's proposal, the agent's identity
    mode: Mode
    requests: tuple[SubmitRequest, ...]
    event: JobEvent
    proposal_id: str = ""
    source: str = ISSUER_KIND  # who fired: "rule", or "agent" (weaver.agents)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    events: tuple[JobEvent, ...] = ()
    firings: tuple[Firing, ...] = ()


@dataclass(slots=True, kw_only=True)
class Pilot:
    """One job's autopilot state."""

    policy: Policy
    track: sg.Track = field(default_factory=sg.Track)
    starts: dict[str, KnobValue] = field(default_factory=dict)
    fired_at: dict[str, collections.deque[float]] = field(default_factory=dict)
    fired_step: dict[str, int] = field(default_factory=dict)
    proposals: dict[str, Firing] = field(default_factory=dict)
    signal_event_at: dict[str, float] = field(default_factory=dict)
    refusal_event_at: dict[str, float] = field(default_factory=dict)
    branch: str | None = None  # the branch the step-based rules count on
    run_id: str = ""
    knobs_given: set[str] = field(default_factory=set)  # the policy's [knobs] settled for this run
    knobs_waiting_noted: bool = False
    start_given: bool = False  # the policy's start commands went to the run held at step 0


def make_event(
    job: JobState, kind: str, message: str, now: float, command_id: str = "", **attrs: str
) -> JobEvent:
    """An event of the job's current run (its `command_id` names the first command it concerns)."""
    return JobEvent(
        job=job.job,
        run_id=job.run_id,
        kind=kind,
        message=message,
        time_s=now,
        command_id=command_id,
        attrs=attrs,
    )


def knob_values(job: JobState) -> dict[str, KnobValue]:
    return {k.name: k.value for k in job.knobs if k.value is not None}


def note_starts(pilot: Pilot, job: JobState) -> None:
    """Remember each knob's first reported value: the bounds are factors of it."""
    for name, value in knob_values(job).items():
        pilot.starts.setdefault(name, value)


def _last_good(job: JobState, step: int) -> str | None:
    """The newest checkpoint on the current branch's lineage taken at or before `step`."""
    reg = job.registry
    limits: dict[str, int] = {}
    branch, limit = reg.branch, step
    while branch and branch not in limits:
        limits[branch] = limit
        info = reg.branches.get(branch)
        if info is None or not info.parent:
            break
        branch, limit = info.parent, min(limit, info.fork_step)
    fit = [c for c in reg.checkpoints.values() if c.step <= limits.get(c.branch or "main", -1)]
    best = max(fit, key=lambda c: (c.step, c.seq), default=None)
    return best.id if best is not None else None


def _bodies(
    steps: tuple[Step, ...], pilot: Pilot, job: JobState, det: sg.Detected | None
) -> tuple[list[Body], list[str]] | str:
    """Steps (a rule's, fired by `det`; the policy's start, with None) resolved against the job now,
    and their alerts; or why they cannot be."""
    current = knob_values(job)
    bodies: list[Body] = []
    alerts: list[str] = []
    for step in steps:
        if isinstance(step, AlertStep):
            alerts.append(step.message)
        elif isinstance(step, ActionStep):
            args = dict(step.args)
            if step.kind is ActionKind.ROLLBACK and args.get("checkpoint") == LAST_GOOD:
                assert det is not None  # rules.parse keeps rollbacks out of start
                found = _last_good(job, det.last_good_step)
                if found is None:
                    return f"no checkpoint taken at or before step {det.last_good_step} to roll back to"
                args["checkpoint"] = found
            bodies.append(Action(kind=step.kind, args=args))
        else:
            assert isinstance(step, SetStep)
            values: dict[str, KnobValue] = {}
            for key, raw in step.values.items():
                if isinstance(raw, str):
                    now_value = current.get(key, current.get(key.split("@", 1)[0]))
                    if isinstance(now_value, bool) or not isinstance(now_value, int | float):
                        return (
                            f"{key} {raw} needs the value of {key} in effect, which the job does not report"
                        )
                    factor, over_value = factor_of(raw)
                    if not over_value:
                        values[key] = float(now_value) * factor
                        continue
                    signal = det.value if det is not None else math.nan
                    if not (math.isfinite(signal) and signal > 0):
                        return f"{key} {raw} needs a finite, positive signal value, not {signal:g}"
                    # A factor derived from a measurement: kept within the bounds, not refused.
                    start = pilot.starts.get(key, pilot.starts.get(key.split("@", 1)[0]))
                    target = float(now_value) * factor / signal
                    values[key] = guardrails.clamp(key, target, start, pilot.policy.guards)
                else:
                    values[key] = raw
            bodies.append(SetConfig(values=values))
    return bodies, alerts


def describe(body: Body) -> dict[str, Any]:
    """A command body as the journal's `commands` attribute shows it."""
    if isinstance(body, SetConfig):
        return {"set": {k: v if not isinstance(v, tuple) else list(v) for k, v in body.values.items()}}
    assert isinstance(body, Action)
    return {"action": body.kind.value, **body.args}


def _window_json(det: sg.Detected) -> str:
    return json.dumps([[s, v if math.isfinite(v) else None] for s, v in det.window], allow_nan=False)


def _fire(pilot: Pilot, rule: Rule, job: JobState, det: sg.Detected, now: float) -> Firing | JobEvent | None:
    """Apply the guardrails to one rule whose condition holds; record the firing when it goes ahead."""
    fired_at = pilot.fired_at.get(rule.name, ())
    last_step = pilot.fired_step.get(rule.name)
    refusal = guardrails.rate_refusal(rule, fired_at, now, fired_step=last_step, step=det.step)
    resolved = _bodies(rule.do, pilot, job, det) if refusal is None else refusal
    if isinstance(resolved, str):
        refusal = resolved
    else:
        bodies, alerts = resolved
        for body in bodies:
            refusal = refusal or guardrails.body_refusal(body, pilot.starts, pilot.policy.guards)
    attrs = {
        "rule": rule.name,
        "signal": det.signal.value,
        "step": str(det.step),
        "branch": det.branch,
        "value": f"{det.value:g}",
        "threshold": f"{det.threshold:g}",
        "last_good_step": str(det.last_good_step),
        "window": _window_json(det),
    }
    if refusal is not None:
        last = pilot.refusal_event_at.get(rule.name)
        if last is not None and now - last < REFUSAL_EVENT_INTERVAL_S:
            return None
        pilot.refusal_event_at[rule.name] = now
        return make_event(
            job, "rule_refused", f"rule {rule.name} not fired: {refusal}", now, reason=refusal, **attrs
        )
    # Counted whatever the mode: a dry run shows what the rule would really have done.
    pilot.fired_at.setdefault(rule.name, collections.deque(maxlen=rule.max_per_hour + 1)).append(now)
    pilot.fired_step[rule.name] = det.step
    why = f"{det.signal.value} at step {det.step}"
    return _emit(pilot, job, rule.name, why, bodies, alerts, attrs, now)


def _emit(
    pilot: Pilot,
    job: JobState,
    name: str,
    why: str,
    bodies: list[Body],
    alerts: list[str],
    attrs: dict[str, str],
    now: float,
    mode: Mode | None = None,
) -> Firing:
    """The firing of `name` (a rule, or the policy for its `[knobs]`) in the policy's mode (or
    `mode`): its requests as issuer `rule:<name>` and its journal event; held when the policy wants
    approval."""
    guards = pilot.policy.guards
    if mode is None:
        mode = Mode.DRY_RUN if guards.dry_run else Mode.PROPOSED if guards.approval else Mode.SEND
    issuer = Issuer(kind=ISSUER_KIND, identity=f"rule:{name}")
    requests = tuple(
        SubmitRequest(body=b, job=job.job, issuer=issuer, command_id=uuid.uuid4().hex) for b in bodies
    )
    commands = json.dumps([describe(b) for b in bodies], sort_keys=True)
    proposal = uuid.uuid4().hex[:12] if mode is Mode.PROPOSED else ""
    verb = {Mode.SEND: "sends", Mode.DRY_RUN: "would have sent (dry run)", Mode.PROPOSED: "proposes"}[mode]
    kind = {Mode.SEND: "rule_fired", Mode.DRY_RUN: "rule_dry_run", Mode.PROPOSED: "rule_proposed"}[mode]
    message = f"rule {name} ({why}) {verb} {commands}"
    if alerts:
        message += f"; alert: {'; '.join(alerts)}"
    extra = {"commands": commands, "mode": mode.value, "alerts": json.dumps(alerts)}
    if proposal:
        extra["proposal"] = proposal
    first_id = requests[0].command_id if requests else ""
    event = make_event(job, kind, message, now, first_id, **attrs, **extra)
    firing = Firing(rule=name, mode=mode, requests=requests, event=event, proposal_id=proposal)
    if proposal:
        hold(pilot, firing)
    return firing


def _policy_knobs(pilot: Pilot, job: JobState, step: int, now: float) -> Decision:
    """The policy's `[knobs]` the run reports and has not been given yet, as one set (issuer
    `rule:<policy name>`); a knob the run does not report (yet) waits for a later report, named
    once per run in a `policy_knobs_waiting` event. A knob already at its value is not sent again
    (a new weaver's pilot starts afresh: it re-sends nothing a takeover did not lose). Bounds do not
    apply: the person who set the policy chose these values, as with `torchloom set`."""
    wanted = {k: v for k, v in pilot.policy.knobs.items() if k not in pilot.knobs_given}
    if not wanted:
        return Decision()
    reported = {k.name for k in job.knobs}
    current = knob_values(job)
    ready = {k: v for k, v in wanted.items() if k.split("@", 1)[0] in reported}
    pilot.knobs_given.update(ready)
    values = {k: v for k, v in ready.items() if "@" in k or current.get(k) != v}
    events: tuple[JobEvent, ...] = ()
    waiting = sorted(wanted.keys() - ready.keys())
    if waiting and not pilot.knobs_waiting_noted:
        pilot.knobs_waiting_noted = True
        message = (
            f"policy {pilot.policy.name}: the run does not report knob(s) {', '.join(waiting)} (yet); "
            "each is set once it does"
        )
        events = (
            make_event(
                job, "policy_knobs_waiting", message, now, policy=pilot.policy.name, knobs=json.dumps(waiting)
            ),
        )
    if not values:
        return Decision(events=events)
    attrs = {"rule": pilot.policy.name, "signal": "knobs", "step": str(step), "branch": job.registry.branch}
    why = f"the policy's [knobs] at step {step}"
    firing = _emit(pilot, job, pilot.policy.name, why, [SetConfig(values=values)], [], attrs, now)
    return Decision(events=events, firings=(firing,))


def _start(pilot: Pilot, job: JobState, step: int, now: float) -> Decision:
    """A run held at step 0 for its policy (`Sample.held_at_start`): the policy's [knobs] (as one
    set), its `start` commands and a resume, as one firing in that order, so they are decided at
    step 0, before the first optimizer step, and the resume last. Once per run; it waits for a
    report whose heartbeats brought the knobs it sets (the ranks report while held). In a dry run
    or with approval the start commands are journaled or proposed and the resume alone is sent."""
    policy = pilot.policy
    reported = {k.name for k in job.knobs}
    if not reported or any(k.split("@", 1)[0] not in reported for k in policy.knobs):
        return Decision()
    pilot.start_given = True
    pilot.knobs_given.update(policy.knobs)
    current = knob_values(job)
    values = {k: v for k, v in policy.knobs.items() if "@" in k or current.get(k) != v}
    bodies: list[Body] = [SetConfig(values=values)] if values else []
    attrs = {"rule": policy.name, "signal": "start", "step": str(step), "branch": job.registry.branch}
    resolved = _bodies(policy.start, pilot, job, None)
    events: list[JobEvent] = []
    alerts: list[str] = []
    if isinstance(resolved, str):
        message = f"policy {policy.name}: start commands not sent: {resolved}"
        events.append(make_event(job, "rule_refused", message, now, reason=resolved, **attrs))
    else:
        bodies += resolved[0]
        alerts = resolved[1]
    resume = Action(kind=ActionKind.RESUME)
    why = f"the policy's start commands at step {step}"
    firings: list[Firing] = []
    if not (policy.guards.dry_run or policy.guards.approval):
        firings.append(_emit(pilot, job, policy.name, why, [*bodies, resume], alerts, attrs, now))
    else:
        if bodies or alerts:
            firings.append(_emit(pilot, job, policy.name, why, bodies, alerts, attrs, now))
        firings.append(
            _emit(pilot, job, policy.name, "the end of the start hold", [resume], [], attrs, now, Mode.SEND)
        )
    return Decision(events=tuple(events), firings=tuple(firings))


def _rolls_back(firing: Firing) -> bool:
    return firing.mode is Mode.SEND and any(
        isinstance(r.body, Action) and r.body.kind is ActionKind.ROLLBACK for r in firing.requests
    )


def hold(pilot: Pilot, firing: Firing) -> None:
    """Keep a proposal until a person answers it (the oldest goes past `MAX_PROPOSALS`)."""
    if len(pilot.proposals) >= MAX_PROPOSALS:
        pilot.proposals.pop(next(iter(pilot.proposals)))
    pilot.proposals[firing.proposal_id] = firing


def on_metrics(pilot: Pilot, job: JobState, sample: sg.Sample, now: float) -> Decision:
    """Fold one metrics report into the job's signals and evaluate every rule (mutates `pilot`)."""
    note_starts(pilot, job)
    lead = sg.observe(pilot.track, sample)
    if lead and pilot.branch != pilot.track.branch:
        # A rollback starts another branch at an earlier step: step-based rules count afresh.
        pilot.branch = pilot.track.branch
        pilot.fired_step.clear()
    if sample.held_at_start:
        # Held at step 0, nothing trains: the start commands (once), and no rule has anything to read.
        return Decision() if pilot.start_given else _start(pilot, job, sample.step, now)
    given = _policy_knobs(pilot, job, sample.step, now)
    events: list[JobEvent] = list(given.events)
    firings: list[Firing] = list(given.firings)
    for rule in pilot.policy.rules:
        if any(_rolls_back(f) for f in firings):
            break  # the run goes back to other weights: the later rules judge the new branch
        cond = rule.condition
        if cond.signal is not sg.Signal.NONFINITE and not lead:
            continue  # the series did not move: nothing new to find
        det = sg.detect(pilot.track, cond, since_step=pilot.fired_step.get(rule.name, 0))
        if det is None:
            continue
        if det.signal is not sg.Signal.EVERY_STEPS:
            last = pilot.signal_event_at.get(det.signal.value)
            if last is None or now - last >= SIGNAL_EVENT_INTERVAL_S:
                pilot.signal_event_at[det.signal.value] = now
                events.append(
                    make_event(
                        job,
                        "signal",
                        f"{det.signal.value} at step {det.step}: {det.value:g} (threshold {det.threshold:g})",
                        now,
                        signal=det.signal.value,
                        step=str(det.step),
                        value=f"{det.value:g}",
                        threshold=f"{det.threshold:g}",
                    )
                )
        result = _fire(pilot, rule, job, det, now)
        if isinstance(result, JobEvent):
            events.append(result)
        elif result is not None:
            firings.append(result)
    return Decision(events=tuple(events), firings=tuple(firings))


def approve(pilot: Pilot, proposal_id: str, job: JobState, now: float) -> Firing:
    """Accept a pending proposal: its commands go out as proposed.

    Raises:
        KeyError: no pending proposal has that id.
    """
    proposed = pilot.proposals.pop(proposal_id)
    who = f"{proposed.source} {proposed.rule}"
    event = make_event(
        job,
        f"{proposed.source}_approved",
        f"proposal {proposal_id} of {who} approved: sends {proposed.event.attrs['commands']}",
        now,
        proposed.event.command_id,
        **{**proposed.event.attrs, "mode": Mode.SEND.value},
    )
    return Firing(
        rule=proposed.rule,
        mode=Mode.SEND,
        requests=proposed.requests,
        event=event,
        proposal_id=proposal_id,
        source=proposed.source,
    )


def refuse(pilot: Pilot, proposal_id: str, job: JobState, now: float) -> JobEvent:
    """Refuse a pending proposal: nothing is sent.

    Raises:
        KeyError: no pending proposal has that id.
    """
    proposed = pilot.proposals.pop(proposal_id)
    return make_event(
        job,
        f"{proposed.source}_refused_by_operator",
        f"proposal {proposal_id} of {proposed.source} {proposed.rule} refused: nothing sent",
        now,
        proposed.event.command_id,
        **proposed.event.attrs,
    )


def dropped_on_restart(entries: Iterable[object], now: float) -> list[JobEvent]:
    """A new weaver's pilots start without its predecessor's pending proposals (they are not
    persisted): one `proposal_dropped` event for each proposal the journal shows proposed and not yet
    answered, dropped, or gone with a later `policy_set` of its job, so the person waiting on it (the
    CLI's `policy show`, the page) learns that it will never be sent. Each names the proposal, who
    proposed it and its commands; the rule (or agent) proposes again while its condition holds."""
    pending: dict[str, JobEvent] = {}
    for entry in entries:
        if not isinstance(entry, JobEvent):
            continue
        pid = entry.attrs.get("proposal", "")
        if entry.kind in _PROPOSED and pid:
            pending[pid] = entry
        elif entry.kind in _CLOSED and pid:
            pending.pop(pid, None)
        elif entry.kind == POLICY_SET:
            pending = {k: ev for k, ev in pending.items() if ev.job != entry.job}
    out = []
    for pid, ev in pending.items():
        source = ISSUER_KIND if ev.kind.startswith(ISSUER_KIND) else "agent"
        who = ev.attrs.get("rule" if source == ISSUER_KIND else "agent", "")
        commands = ev.attrs.get("commands", "")
        message = (
            f"proposal {pid} of {source} {who} dropped: the weaver restarted (or a standby took over) and "
            f"a new weaver does not hold pending proposals; nothing was sent of {commands}"
        )
        attrs = {**ev.attrs, "source": source, "reason": "weaver_restarted"}
        out.append(dataclasses.replace(ev, kind=PROPOSAL_DROPPED, message=message, time_s=now, attrs=attrs))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyView:
    """What `torchloom policy show` prints: a job's policy (its TOML) and its pending proposals."""

    job: str
    name: str = ""
    text: str = ""
    proposals: tuple[JobEvent, ...] = ()


NO_RULES = Policy(name="", rules=())  # the pilot of a job without a policy, kept for its agents


class Pilots:
    """The autopilots of every job (no I/O): the policy each job runs under and its `Pilot`.

    A job without a policy of its own runs under `default` (the weaver's configured policy, None
    for none); `set_policy(job, None)` turns the autopilot off for that job even then (a replay
    follows its file, not rules).
    """

    def __init__(self, default: Policy | None = None) -> None:
        self._default = default
        self._policies: dict[str, Policy | None] = {}
        self._pilots: dict[str, Pilot] = {}

    @property
    def active(self) -> bool:
        """Whether any job may have rules to evaluate (metrics are then read with no watcher)."""
        return self._default is not None or any(p is not None for p in self._policies.values())

    def policy_of(self, job: str) -> Policy | None:
        return self._policies.get(job, self._default)

    def set_policy(self, job: str, policy: Policy | None) -> None:
        """Run `job` under `policy` from its next report on (None: no rules); pending proposals go."""
        self._policies[job] = policy
        self._pilots.pop(job, None)

    def forget(self, job: str) -> None:
        self._policies.pop(job, None)
        self._pilots.pop(job, None)

    def view(self, job: str) -> PolicyView:
        policy = self.policy_of(job)
        pilot = self._pilots.get(job)
        pending = tuple(f.event for f in pilot.proposals.values()) if pilot is not None else ()
        if policy is None:
            return PolicyView(job=job, proposals=pending)
        return PolicyView(job=job, name=policy.name, text=policy.text, proposals=pending)

    def pilot(self, job: JobState) -> Pilot | None:
        """The job's pilot for its current run (a new run starts afresh); None without a policy."""
        policy = self.policy_of(job.job)
        if policy is None:
            return None
        pilot = self._pilots.get(job.job)
        if pilot is None or pilot.policy is not policy or pilot.run_id != job.run_id:
            pilot = self._pilots[job.job] = Pilot(policy=policy, run_id=job.run_id)
        return pilot

    def agent_pilot(self, job: JobState) -> Pilot:
        """The job's pilot for its agents' proposals: the policy's, or one of `NO_RULES` (the agents'
        guardrails then are the defaults) when the job runs without a policy."""
        pilot = self.pilot(job)
        if pilot is not None:
            return pilot
        pilot = self._pilots.get(job.job)
        if pilot is None or pilot.policy is not NO_RULES or pilot.run_id != job.run_id:
            pilot = self._pilots[job.job] = Pilot(policy=NO_RULES, run_id=job.run_id)
        return pilot

    def on_metrics(self, job: JobState, sample: sg.Sample, now: float) -> Decision:
        pilot = self.pilot(job)
        return Decision() if pilot is None else on_metrics(pilot, job, sample, now)

    def decide(self, job: JobState, proposal_id: str, *, approve_it: bool, now: float) -> Firing | JobEvent:
        """Approve (a firing to send) or refuse (its event) a pending proposal of `job`.

        Raises:
            KeyError: `job` has no pending proposal with that id.
        """
        pilot = self._pilots.get(job.job)
        if pilot is None or proposal_id not in pilot.proposals:
            known = ", ".join(pilot.proposals) if pilot is not None and pilot.proposals else "none"
            raise KeyError(f"job {job.job} has no pending proposal {proposal_id!r} (pending: {known})")
        if approve_it:
            return approve(pilot, proposal_id, job, now)
        return refuse(pilot, proposal_id, job, now)
