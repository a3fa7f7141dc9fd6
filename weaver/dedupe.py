"""Idempotent submission: a command id is decided once, and the journal holds one entry per decision.

A submitter names its command (`SubmitRequest.command_id`) and may send it again after any failure;
the weaver answers a repeat with what it already knows of that id instead of sequencing it twice.

Pure: `lookup(state, command_id)` (a final outcome, a command in flight, or nothing),
`refused_outcome(req, reason, now, ...)`, `journal_msg_id(outcome)` and `journal_match(entry, ...)`.

Mutators: `remember(state, outcome)` files a final outcome (or a refusal) under its command id in
`state.decided`, forgetting the oldest ids past `DECIDED_IDS`.
"""

from __future__ import annotations

import uuid

from torchloom import wire
from torchloom.messages import Command, JobEvent, Outcome, OutcomeStatus, SubmitRequest
from weaver.model import WeaverState

# Final outcomes kept in memory to answer repeats (each is ~1 KiB). A repeat of an id older than
# this is still answered from the journal by `torchloom journal --command ID`; a submit of it would
# be sequenced again, which is why clients retry within a deadline, not forever.
DECIDED_IDS = 10_000


def lookup(state: WeaverState, command_id: str) -> Outcome | Command | None:
    """What the weaver knows of `command_id`: its final outcome, the command still in flight, or
    None when the id is new (or empty: an unnamed submit is never a repeat)."""
    if not command_id:
        return None
    done = state.decided.get(command_id)
    if done is not None:
        return done
    for job in state.jobs.values():
        for pending in job.pending.values():
            if pending.command.command_id == command_id:
                return pending.command
    return None


def remember(state: WeaverState, outcome: Outcome, *, limit: int = DECIDED_IDS) -> None:
    """File a decided outcome under its command id; a TIMEOUT a submitter got is not a decision,
    but a TIMEOUT that ended a command (its run was replaced) is, so callers pass only final ones."""
    if not outcome.command_id:
        return
    state.decided.pop(outcome.command_id, None)
    state.decided[outcome.command_id] = outcome
    while len(state.decided) > limit:
        del state.decided[next(iter(state.decided))]


def refused_outcome(
    req: SubmitRequest, reason: str, now: float, *, job: str = "", run_id: str = ""
) -> Outcome:
    """The decision on a submit the weaver refused before sequencing it: REJECTED, no command, no
    seq, with who asked, what they asked (the body, up to `wire.BODY_MAX_BYTES`: a larger one is
    refused for its size, which the reason says, so refusals cannot fill the journal) and why
    (journaled as such)."""
    attempted = req.body if wire.body_size(req.body) <= wire.BODY_MAX_BYTES else None
    return Outcome(
        command_id=req.command_id or uuid.uuid4().hex,
        job=job or req.job,
        status=OutcomeStatus.REJECTED,
        reason=reason,
        submitted_at_s=now,
        completed_at_s=now,
        issuer=req.issuer,
        run_id=run_id,
        attempted=attempted,
    )


def journal_msg_id(outcome: Outcome) -> str:
    """The `Nats-Msg-Id` of an outcome's journal entry, so a re-published decision (a retried
    publish, or a restarted weaver completing the same command) is stored once:
    `outcome:<job>:<run>:<seq>` for a sequenced command, `refused:<command id>` for a refusal."""
    cmd = outcome.command
    if cmd is not None:
        return f"outcome:{cmd.job}:{cmd.run_id}:{cmd.seq}"
    return f"refused:{outcome.command_id}"


def journal_match(entry: Outcome | JobEvent, *, run_id: str = "", command_id: str = "") -> bool:
    """Whether a journal entry passes the filters of a JournalRequest (an empty filter passes all).

    With `command_id` only that command's outcome matches (its `command` event too is left out).
    """
    if isinstance(entry, JobEvent):
        return not command_id and (not run_id or entry.run_id == run_id)
    if command_id and entry.command_id != command_id:
        return False
    entry_run = entry.command.run_id if entry.command is not None else entry.run_id
    return not run_id or entry_run == run_id
