"""The agent API's gate: an agent's proposal (a Submit from a token of role "agent") passes the
guardrails of the job's policy (its `[agent]` table: per-agent cool-down and hourly limit, bounds
from each knob's start value, forbidden actions, dry run, approval) before the weaver's own submit,
which validates, sequences and journals it like any command, issued by the agent's identity with
issuer kind "agent".

`propose(pilot, job, req, now)` is pure but for `pilot` (the job's autopilot state: start values,
the agent's accepted proposals, pending proposals); `AgentGate` carries out what it returns. A
refusal, a dry run and a proposal held for approval are each journaled as an event ("agent_refused",
"agent_dry_run", "agent_proposed") naming the agent and why; a person answers a held proposal as a
rule's (`torchloom policy approve|refuse ID`), and its commands then go out as proposed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable

from torchloom.errors import JobNotFound
from torchloom.messages import AgentRefusal, JobEvent, Outcome, OutcomeStatus, SubmitRequest
from weaver import autopilot, dedupe, guardrails, liveness
from weaver.autopilot import Firing, Mode, Pilot
from weaver.model import JobState, WeaverState

ISSUER_KIND = "agent"
MAX_REPLY_CHARS = 2000  # of a refused model reply kept in the journal
MAX_REASON_CHARS = 500
# Refused replies an agent may have journaled per minute: its token must not flood the journal.
MAX_REPORTS_PER_MINUTE = 30


def printable(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Untrusted free text as the journal keeps it: control characters (newlines, escapes) as spaces,
    at most `limit` characters."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def _reason_attrs(req: SubmitRequest) -> dict[str, str]:
    """The agent's own reason for a proposal (`SubmitRequest.reason`), as journaled: `agent_reason`
    (an event's `reason` says why the weaver did what the event records)."""
    return {"agent_reason": printable(req.reason)} if req.reason.strip() else {}


def _refused(job: JobState, req: SubmitRequest, why: str, now: float, *, stage: str) -> JobEvent:
    who = req.issuer.identity
    return autopilot.make_event(
        job,
        "agent_refused",
        f"agent {who} refused: {why}",
        now,
        req.command_id,
        agent=who,
        reason=why,
        stage=stage,
        commands=json.dumps([autopilot.describe(req.body)], sort_keys=True),
        **_reason_attrs(req),
    )


def propose(pilot: Pilot, job: JobState, req: SubmitRequest, now: float) -> Firing | JobEvent:
    """Judge one agent proposal by the guardrails of `pilot`'s policy (mutates `pilot` when it goes
    ahead: the agent's proposal times, the held proposal).

    Returns:
        Its refusal event ("agent_refused", with `reason`), or the firing: `Mode.SEND` (submit
        `req`), `Mode.DRY_RUN` (journal only) or `Mode.PROPOSED` (held until a person answers).
    """
    autopilot.note_starts(pilot, job)
    agent = pilot.policy.agent
    who = req.issuer.identity
    refusal = guardrails.agent_rate_refusal(who, agent, pilot.fired_at.get(who, ()), now)
    refusal = refusal or guardrails.body_refusal(req.body, pilot.starts, agent.guards)
    if refusal is not None:
        return _refused(job, req, refusal, now, stage="guardrails")
    pilot.fired_at.setdefault(who, collections.deque(maxlen=agent.max_per_hour + 1)).append(now)
    guards = agent.guards
    mode = Mode.DRY_RUN if guards.dry_run else Mode.PROPOSED if guards.approval else Mode.SEND
    commands = json.dumps([autopilot.describe(req.body)], sort_keys=True)
    proposal = uuid.uuid4().hex[:12] if mode is Mode.PROPOSED else ""
    verb = {Mode.SEND: "sends", Mode.DRY_RUN: "would have sent (dry run)", Mode.PROPOSED: "proposes"}[mode]
    kind = {Mode.SEND: "agent_sent", Mode.DRY_RUN: "agent_dry_run", Mode.PROPOSED: "agent_proposed"}[mode]
    attrs = {"agent": who, "commands": commands, "mode": mode.value, "policy": pilot.policy.name}
    if proposal:
        attrs["proposal"] = proposal
    attrs.update(_reason_attrs(req))
    message = f"agent {who} {verb} {commands}"
    if "agent_reason" in attrs:
        message += f"; the agent says: {attrs['agent_reason']}"
    ev = autopilot.make_event(job, kind, message, now, req.command_id, **attrs)
    firing = Firing(rule=who, mode=mode, requests=(req,), event=ev, proposal_id=proposal, source=ISSUER_KIND)
    if proposal:
        autopilot.hold(pilot, firing)
    return firing


def held(pilot: Pilot, command_id: str) -> Firing | None:
    """The pending proposal holding the command `command_id` (an agent's retry of it), if any."""
    for firing in pilot.proposals.values():
        if any(r.command_id == command_id for r in firing.requests):
            return firing
    return None


def _answer(req: SubmitRequest, job: JobState, status: OutcomeStatus, reason: str, now: float) -> Outcome:
    return Outcome(
        command_id=req.command_id,
        job=job.job,
        status=status,
        reason=reason,
        submitted_at_s=now,
        completed_at_s=now,
        issuer=req.issuer,
        run_id=job.run_id,
    )


def _pending_reason(firing: Firing, job: str) -> str:
    pid = firing.proposal_id
    return (
        f"proposal {pid} waits for a person: torchloom policy approve {pid} --job {job} "
        f"(or refuse {pid}); nothing was sent yet"
    )


class AgentGate:
    """Agents' submits and refusal reports, carried out through the weaver.

    Args:
        state: the weaver's state (read: jobs, knobs, decided commands).
        pilots: the jobs' autopilots (policies, start values, proposals), shared with the rules.
        announce: journal an event and send it to watchers.
        submit: the weaver's submit (validation, sequencing, journal).
        refuse: journal a refused submit as an outcome (who, why) and return it.
        dead_after_s: when a rank counts as gone (which job an empty name means).
    """

    def __init__(
        self,
        state: WeaverState,
        pilots: autopilot.Pilots,
        *,
        announce: Callable[[JobEvent], None],
        submit: Callable[[SubmitRequest], Awaitable[Outcome]],
        refuse: Callable[[SubmitRequest, str, float, JobState], Outcome],
        dead_after_s: float,
    ) -> None:
        self._state = state
        self._pilots = pilots
        self._announce = announce
        self._submit = submit
        self._refuse = refuse
        self._dead_after_s = dead_after_s
        self._reports: dict[str, collections.deque[float]] = {}

    async def submit(self, req: SubmitRequest, now: float) -> Outcome:
        """An agent's Submit (`req.issuer` is the authenticated agent): the guardrails, then the
        weaver's submit when they let it through.

        Returns:
            The weaver's outcome when sent; REJECTED with the guardrail's reason when refused (also
            journaled as an outcome and an "agent_refused" event) or in a dry run; PENDING with the
            proposal id when held for a person.

        Raises:
            NatsUnavailable: as the weaver's submit.
        """
        if req.command_id and dedupe.lookup(self._state, req.command_id) is not None:
            return await self._submit(req)  # a retry of a command already decided or in flight
        try:
            job = liveness.resolve_job(self._state, req.job, now, self._dead_after_s)
        except JobNotFound:  # the weaver's submit refuses and journals it
            return await self._submit(req)
        if not req.command_id:
            req = dataclasses.replace(req, command_id=uuid.uuid4().hex)
        pilot = self._pilots.agent_pilot(job)
        waiting = held(pilot, req.command_id)
        if waiting is not None:
            return _answer(req, job, OutcomeStatus.PENDING, _pending_reason(waiting, job.job), now)
        result = propose(pilot, job, req, now)
        if isinstance(result, JobEvent):
            self._announce(result)
            return self._refuse(req, result.attrs["reason"], now, job)
        if result.mode is Mode.SEND:
            self._announce(result.event)
            return await self._submit(req)
        self._announce(result.event)
        if result.mode is Mode.DRY_RUN:
            reason = f"dry run: {result.event.message}; nothing was sent"
            return _answer(req, job, OutcomeStatus.REJECTED, reason, now)
        return _answer(req, job, OutcomeStatus.PENDING, _pending_reason(result, job.job), now)

    def report_refusal(self, identity: str, report: AgentRefusal, now: float) -> JobEvent:
        """Journal a model reply agent `identity` refused: an "agent_refused" event (stage "reply").

        Raises:
            JobNotFound: no such job (or, for "", not exactly one running).
            ValueError: an empty reason, or more than `MAX_REPORTS_PER_MINUTE` from this agent.
        """
        if not report.reason.strip():
            raise ValueError("agent refusal rejected: reason is empty; say why the reply was refused")
        recent = self._reports.setdefault(identity, collections.deque(maxlen=MAX_REPORTS_PER_MINUTE))
        if len(recent) == MAX_REPORTS_PER_MINUTE and now - recent[0] < 60.0:
            raise ValueError(
                f"agent refusal from {identity} rejected: more than {MAX_REPORTS_PER_MINUTE} in a minute"
            )
        job = liveness.resolve_job(self._state, report.job, now, self._dead_after_s)
        reason = printable(report.reason)
        ev = autopilot.make_event(
            job,
            "agent_refused",
            f"agent {identity} refused its model's reply: {reason}",
            now,
            agent=identity,
            reason=reason,
            stage="reply",
            reply=report.reply[:MAX_REPLY_CHARS],
        )
        recent.append(now)
        self._announce(ev)
        return ev
