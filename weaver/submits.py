"""Submits: validating a command against its job, giving it the run's next seq, and the seq bookkeeping
that keeps seqs unique across weaver restarts and rival weavers.

Pure: `job_facts(job)`, `not_ready(job, body, warming_up=...)`, `validate_body(job, body)` and
`rejected_outcome(req, reason, now)` (which only draws a fresh command id).

Mutators, each updating the `WeaverState` passed in and returning nothing else of it:
`plan_submit` (consumes a seq and tracks the command as pending; returns the command),
`set_seq_floor`, `mark_published`, `mark_stored` and `abandon` (forgets a command whose publish failed).
"""

from __future__ import annotations

import uuid

from torchloom import knobs, wire
from torchloom.errors import CommandRejected
from torchloom.messages import Action, Body, Command, Outcome, OutcomeStatus, SetConfig, SubmitRequest
from weaver import registry as rg
from weaver.liveness import resolve_job
from weaver.model import JobState, Pending, WeaverState


def job_facts(job: JobState) -> rg.JobFacts:
    """The facts action validation reads from the job's heartbeats."""
    beats = [e.heartbeat for e in job.ranks.values()]
    return rg.JobFacts(
        job=job.job,
        world_size=job.world_size,
        # Every rank must allow it: one rank launched without the flag refuses anyway.
        fault_injection_allowed=bool(beats) and all(b.fault_injection_allowed for b in beats),
    )


def not_ready(job: JobState, body: Body, *, warming_up: bool) -> str | None:
    """Why the weaver cannot judge `body` for `job` yet, or None when it can.

    Right after a weaver (re)starts it knows jobs from its journal before their ranks report, and a
    rank sends its knob schema in full only now and then; judging a command then would refuse it for
    want of facts a heartbeat brings a moment later (`set lr=...` as an "unknown knob"). So while
    `warming_up`, a job with no rank reported yet, or a config change to a job whose knob schema no
    rank has reported yet, is not ready: the caller answers "try again" (gRPC UNAVAILABLE), never a
    rejection, and the client retries with the same command id. Once warmed up the facts stand as
    they are (a job that has no such knob is told so), except one: a config change to a job whose
    ranks report a knob schema's hash the weaver has not got yet is never judged (at any age).
    """
    if isinstance(body, SetConfig) and not job.knobs:
        hashes = sorted({e.heartbeat.knobs_hash for e in job.ranks.values() if e.heartbeat.knobs_hash})
        if hashes:
            # Its ranks have a schema (they report its hash), this weaver does not know it yet: they
            # send it in full only after a change and now and then, and the schema bucket did not
            # answer yet. Not a job without knobs: try again, whatever the weaver's age.
            return (
                f"the knob schema of job {job.job} (hash {hashes[0]:016x}) is not known to this weaver "
                f"yet, so {', '.join(sorted(body.values))} cannot be checked; try again"
            )
    if not warming_up:
        return None
    if not job.ranks:
        return f"the weaver is starting up: job {job.job} has not reported yet; try again"
    if isinstance(body, SetConfig) and not job.knobs:
        return (
            f"the weaver is starting up: job {job.job} has not reported its knobs yet, so "
            f"{', '.join(sorted(body.values))} cannot be checked; try again"
        )
    return None


def validate_body(job: JobState, body: Body) -> Body:
    """Check a command body against the job; return it as it is to be published.

    Knob values come back typed; a rollback comes back with the resolved checkpoint id and path.

    Raises:
        CommandRejected: a body over `wire.BODY_MAX_BYTES`, an invalid knob assignment or action
            argument (see `registry.validate_action`).
    """
    size = wire.body_size(body)
    if size > wire.BODY_MAX_BYTES:
        raise CommandRejected(
            f"command of {size} bytes rejected: a config change or action is at most "
            f"{wire.BODY_MAX_BYTES} bytes (its values and arguments together)"
        )
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
    """Note when a pending command went out to JetStream (its outcome reports it)."""
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
    held = job.pending.get(cmd.seq)
    if held is not None and held.command.command_id == cmd.command_id:
        del job.pending[cmd.seq]
    # A read of the stream's tail meanwhile may have put another writer's command at this seq
    # (`recovery.replay_commands`): then the seq is taken, and the floor stays above it.
    if job.last_seq == cmd.seq and cmd.seq not in job.pending:
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
