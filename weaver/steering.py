"""The weaver's autopilot shell: feeds each job's metrics reports to its rules (`weaver.autopilot`),
journals what they decide and submits their commands through the weaver's one submit path (the same
validation, sequencing, signing and journal as any command), in order, stopping at the first that
does not apply.

The `Weaver` front owns one `Steering` and hands it three of its own operations: announce (journal
an event), submit and spawn (run a coroutine in the weaver's TaskGroup).

A policy set on a job is journaled (a `policy_set` event carrying its TOML), so a restarted or
standby weaver, which rebuilds its state from the journal, runs each job under the policy it last
had (`recover`): rules keep firing after a takeover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from torchloom import subjects
from torchloom.errors import JobNotFound
from torchloom.messages import (
    JobEvent,
    Outcome,
    OutcomeStatus,
    PolicyReply,
    PolicyRequest,
    ProposalDecision,
    StepMetrics,
    SubmitRequest,
)
from weaver import autopilot, liveness, rules
from weaver import signals as sg
from weaver.model import WeaverState, job_event

log = logging.getLogger(__name__)

# Events of a rule's commands going out (fired in send mode, or a proposal approved): what the
# metrics count as rule firings.
FIRED_KINDS = frozenset({"rule_fired", "rule_approved"})
POLICY_SET = autopilot.POLICY_SET  # the journal event a job's policy is recovered from (attrs: policy, text)


class Steering:
    """Rules over every job's signals, carried out through the weaver.

    Args:
        state: the weaver's state (read: jobs, knobs, checkpoints).
        default: the policy of jobs without their own (the weaver config's), None for none.
        announce: journal an event and send it to watchers.
        submit: the weaver's submit.
        spawn: run a coroutine in the weaver's TaskGroup under a name.
    """

    def __init__(
        self,
        state: WeaverState,
        default: rules.Policy | None,
        *,
        announce: Callable[[JobEvent], None],
        submit: Callable[[SubmitRequest], Awaitable[Outcome]],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self._state = state
        self.pilots = autopilot.Pilots(default)
        self._announce = announce
        self._submit = submit
        self._spawn = spawn

    @property
    def active(self) -> bool:
        return self.pilots.active

    def on_metrics(self, sm: StepMetrics, now: float) -> None:
        """Evaluate the job's rules on one admitted report; journal and carry out what they decide."""
        job = self._state.jobs.get(sm.job)
        if job is None or job.run_id != sm.run_id:
            return
        try:
            decision = self.pilots.on_metrics(job, sg.sample_of(sm), now)
        except Exception:  # a bug in a rule must not stop metrics
            log.exception("autopilot of %s failed", sm.job)
            return
        for ev in decision.events:
            self._announce(ev)
        for firing in decision.firings:
            self._carry_out(firing)

    def _carry_out(self, firing: autopilot.Firing) -> None:
        self._announce(firing.event)
        if firing.mode is autopilot.Mode.SEND and firing.requests:
            self._spawn(self._send(firing), f"weaver-rule-{firing.rule}")

    async def _send(self, firing: autopilot.Firing) -> None:
        # Sequenced at once, in order (each submit takes the weaver's submit lock before it first
        # waits, and the lock is FIFO), so the ranks decide a firing's commands at one boundary: a
        # rollback's lr cut applies before the new branch's first step, not one step after it.
        async def submit(req: SubmitRequest) -> Outcome:
            return await self._submit(req)

        async with asyncio.TaskGroup() as tg:
            sent = [tg.create_task(submit(req)) for req in firing.requests]
        for req, task in zip(firing.requests, sent, strict=True):
            outcome = task.result()
            if outcome.status is not OutcomeStatus.APPLIED:
                job = self._state.jobs.get(req.job)
                if job is not None:
                    self._announce(
                        job_event(
                            job,
                            "rule_interrupted",
                            f"rule {firing.rule}: command {req.command_id} {outcome.status.value} "
                            f"({outcome.reason}); the firing's later commands were sequenced with it",
                            outcome.completed_at_s or time.time(),
                            rule=firing.rule,
                            command_id=req.command_id,
                        )
                    )
                return

    # ---- the API (the Control service's SetPolicy, GetPolicy and DecideProposal) -------------------

    def _job_name(self, job: str, now: float, dead_after_s: float) -> str:
        if job:
            subjects.check_token("job", job)  # a policy may be set before the job first reports
            return job
        return liveness.resolve_job(self._state, "", now, dead_after_s).job

    def _reply(self, view: autopilot.PolicyView) -> PolicyReply:
        return PolicyReply(job=view.job, name=view.name, text=view.text, proposals=view.proposals)

    def set_policy_request(self, req: PolicyRequest, now: float, dead_after_s: float) -> PolicyReply:
        """SetPolicy (raises `ValueError` naming what is wrong, `JobNotFound` without a job)."""
        return self._reply(self.set_policy(self._job_name(req.job, now, dead_after_s), req.text))

    def get_policy_request(self, req: PolicyRequest, now: float, dead_after_s: float) -> PolicyReply:
        """GetPolicy (raises `ValueError`, `JobNotFound`)."""
        return self._reply(self.view(self._job_name(req.job, now, dead_after_s)))

    def decide_request(
        self, req: ProposalDecision, now: float, dead_after_s: float, *, decided_by: str = ""
    ) -> JobEvent:
        """DecideProposal (raises `ValueError`, `JobNotFound`, `KeyError` for an unknown proposal);
        `decided_by` is the authenticated identity of the person who answered, for the journal."""
        job = self._job_name(req.job, now, dead_after_s)
        return self.decide(job, req.proposal_id, approve_it=req.approve, now=now, decided_by=decided_by)

    def set_policy(self, job: str, text: str) -> autopilot.PolicyView:
        """Run `job` under the policy `text` (TOML; "" turns its rules off).

        Raises:
            rules.PolicyError: the text is not a valid policy (the message names the field).
        """
        policy = rules.parse(text, source=f"policy of job {job}") if text.strip() else None
        self.pilots.set_policy(job, policy)
        name = policy.name if policy is not None else "none"
        log.info("job %s now runs under autopilot policy %s", job, name)
        known = self._state.jobs.get(job)
        self._announce(
            JobEvent(
                job=job,
                run_id=known.run_id if known is not None else "",
                kind=POLICY_SET,
                message=f"job {job} now runs under autopilot policy {name}",
                time_s=time.time(),
                attrs={"policy": name, "text": text if policy is not None else ""},
            )
        )
        return self.pilots.view(job)

    def recover(self, entries: Iterable[object]) -> None:
        """Run each job under the policy its latest journaled `policy_set` event names (after a
        restart, oldest entries first). A policy that no longer parses is skipped, with a warning:
        the job then runs under the weaver's default."""
        entries = list(entries)
        for dropped in autopilot.dropped_on_restart(entries, time.time()):
            self._announce(dropped)  # pilot state is not persisted: say so to whoever waits on one
        latest: dict[str, JobEvent] = {}
        for entry in entries:
            if isinstance(entry, JobEvent) and entry.kind == POLICY_SET and entry.job:
                latest[entry.job] = entry
        for job, ev in latest.items():
            text = ev.attrs.get("text", "")
            try:
                policy = rules.parse(text, source=f"policy of job {job}") if text.strip() else None
            except rules.PolicyError as exc:
                log.warning("the journaled policy of job %s is not loaded: %s", job, exc)
                continue
            self.pilots.set_policy(job, policy)
            log.info("job %s runs under its journaled autopilot policy %s", job, ev.attrs.get("policy", ""))

    def view(self, job: str) -> autopilot.PolicyView:
        return self.pilots.view(job)

    def decide(
        self, job_name: str, proposal_id: str, *, approve_it: bool, now: float, decided_by: str = ""
    ) -> JobEvent:
        """A person's answer to a proposal: approved, its commands go out now; refused, nothing. The
        decision's event names `decided_by` (attribute `decided_by`) when given.

        Raises:
            JobNotFound: the weaver does not know `job_name`.
            KeyError: the job has no pending proposal with that id.
        """
        job = self._state.jobs.get(job_name)
        if job is None:
            raise JobNotFound(f"no job {job_name!r} is known to the weaver")
        result = self.pilots.decide(job, proposal_id, approve_it=approve_it, now=now)
        if decided_by:
            result = _decided_by(result, decided_by)
        if isinstance(result, JobEvent):
            self._announce(result)
            return result
        self._carry_out(result)
        return result.event


def _decided_by(result: autopilot.Firing | JobEvent, who: str) -> autopilot.Firing | JobEvent:
    """A decision whose journal event names the person who made it."""
    event = result if isinstance(result, JobEvent) else result.event
    event = dataclasses.replace(
        event, message=f"{event.message} (decided by {who})", attrs={**event.attrs, "decided_by": who}
    )
    return event if isinstance(result, JobEvent) else dataclasses.replace(result, event=event)
