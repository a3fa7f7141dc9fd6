"""How a command ends: acks folded in, final outcomes computed and settled, deadlines that pass first.

An outcome carries every rank's answer, bounded (`RESULT_TEXT_MAX`, `RESULT_DETAIL_MAX`,
`REASONS_LISTED`), so no rank's answer can make it too large to journal or to send a client.

Pure: `final_outcome`, `rejection_reason`, `compute_outcome(pending, now)`, `timeout_outcome` (the
command stays pending), `outcome_event` and `search_event`.

Mutators: `record_ack(state, ack, now)` stores the ack in the command's `Pending` and, when it was
the last one missing, removes the pending command and settles its outcome (which it returns);
`settle(job, outcome)` folds a final outcome into the job's registry and recovery phase.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    JobEvent,
    Outcome,
    OutcomeStatus,
    RankResult,
    SetConfig,
)
from torchloom.naming import SEARCH_RESULT
from weaver import health_policy as hp
from weaver import registry as rg
from weaver.model import JobState, Pending, WeaverState

# What one rank's answer may put in an outcome, which every journal read and submit reply carries:
# a rank's refusal may quote the value it refused, and an outcome has an answer from every rank.
RESULT_TEXT_MAX = 1000  # characters of a rank's reason, and of each detail value
RESULT_DETAIL_MAX = 16 * 1024  # characters of one rank's detail, keys and values together
REASONS_LISTED = 8  # ranks whose reasons an outcome's own reason quotes


def _cut(text: str, limit: int = RESULT_TEXT_MAX) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... (cut: {len(text)} characters)"


def _detail(detail: Mapping[str, str]) -> dict[str, str]:
    """A rank's detail as an outcome keeps it: each value cut to `RESULT_TEXT_MAX` characters, and
    entries past `RESULT_DETAIL_MAX` characters in all left out (`detail_cut` says how many)."""
    out: dict[str, str] = {}
    used = 0
    for key, value in detail.items():
        key, value = _cut(key, 128), _cut(value)
        used += len(key) + len(value)
        if used > RESULT_DETAIL_MAX:
            out["detail_cut"] = f"{len(detail) - len(out)} of {len(detail)} entries left out"
            break
        out[key] = value
    return out


def _results(pending: Pending) -> tuple[RankResult, ...]:
    return tuple(
        RankResult(
            rank=a.rank,
            status=a.status,
            step=a.step,
            reason=_cut(a.reason),
            received_at_s=a.received_at_s,
            decided_at_s=a.decided_at_s,
            detail=_detail(a.detail),
            branch=a.branch,
        )
        for _, a in sorted(pending.acks.items())
    )


def final_outcome(pending: Pending, status: OutcomeStatus, reason: str, now: float) -> Outcome:
    """The final `status` of a pending command, with every ack it has so far."""
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
        issuer=pending.command.issuer,
        run_id=pending.command.run_id,
    )


def rejection_reason(acks: Mapping[int, Ack]) -> str:
    """`"rank 1: ...; rank 0: ..."`: ranks that refused on their own first, then those that only
    followed a peer's refusal (`Ack.refused_by_peer`)."""
    rejected = [a for a in acks.values() if a.status is AckStatus.REJECTED]
    rejected.sort(key=lambda a: (a.refused_by_peer, a.rank))
    text = "; ".join(f"rank {a.rank}: {_cut(a.reason or 'rejected')}" for a in rejected[:REASONS_LISTED])
    more = len(rejected) - REASONS_LISTED
    return text + (f"; and {more} more rank(s) (see each rank's result)" if more > 0 else "")


def compute_outcome(pending: Pending, now: float) -> Outcome | None:
    """The final outcome once every rank answered, else None."""
    if len(pending.acks) < pending.world_size:
        return None
    if all(a.status is AckStatus.APPLIED for a in pending.acks.values()):
        return final_outcome(pending, OutcomeStatus.APPLIED, "", now)
    return final_outcome(pending, OutcomeStatus.REJECTED, rejection_reason(pending.acks), now)


def record_ack(state: WeaverState, ack: Ack, now: float) -> Outcome | None:
    """Fold one rank's ack into `state`, in place; return the final outcome when it was the last one missing.

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
    """Fold a final outcome of the job's run into its registry and recovery phase, in place."""
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
    outcome = final_outcome(pending, OutcomeStatus.TIMEOUT, reason, now)
    return outcome


def outcome_event(outcome: Outcome, now: float) -> JobEvent:
    """The `command` job event announcing a final outcome."""
    cmd = outcome.command
    body = cmd.body if cmd is not None else outcome.attempted
    what = "command"
    if isinstance(body, SetConfig):
        what = "set " + " ".join(f"{k}={v}" for k, v in sorted(body.values.items()))
    elif body is not None:
        what = body.kind.value
    run_id = outcome.run_id
    if cmd is not None:
        run_id = cmd.run_id
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


def search_event(outcome: Outcome, now: float) -> JobEvent | None:
    """The `search_result` event of a search's concluding rollback (its args carry the record,
    `naming.SEARCH_RESULT`; checked at submit), or None for any other outcome.

    The attrs are the record's fields (strings as they are, anything else as JSON) and
    `rollback_status`, the final status of the rollback that carried it.
    """
    cmd = outcome.command
    if cmd is None or not isinstance(cmd.body, Action) or SEARCH_RESULT not in cmd.body.args:
        return None
    try:
        record = rg.search_record(cmd.body.args[SEARCH_RESULT])
    except ValueError:
        return None  # refused at submit: not published
    attrs = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in record.items()}
    attrs["rollback_status"] = outcome.status.value
    summary = record.get("summary")
    return JobEvent(
        job=outcome.job,
        run_id=cmd.run_id,
        kind=SEARCH_RESULT,
        message=f"search {record.get('search', '')}: {summary if isinstance(summary, str) else ''}"[:500],
        time_s=now,
        command_id=outcome.command_id,
        attrs=attrs,
    )
