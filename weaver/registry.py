"""A run's checkpoints, branches and data sources, built from APPLIED outcomes, and the pure checks
of action arguments that depend on them (docs/design.md, "Actions (interactive training)").

No I/O: `weaver.outcomes` folds outcomes in with `apply_outcome`, and `weaver.submits` calls
`validate_action` before a command gets a seq, so a refused action publishes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torchloom.errors import CommandRejected
from torchloom.messages import (
    Action,
    ActionKind,
    BranchInfo,
    CheckpointInfo,
    Command,
    Outcome,
    OutcomeStatus,
)
from torchloom.naming import MAIN_BRANCH, SEARCH_RESULT, branch_id, checkpoint_id

_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SOURCE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The highest XID NVML documents is below this; anything above is a typo.
MAX_XID = 1_000

# Arguments an action cannot do without.
REQUIRED_ACTION_ARGS: Mapping[ActionKind, tuple[str, ...]] = {
    ActionKind.ROLLBACK: ("checkpoint",),
    ActionKind.DATA_ADD: ("name", "path"),
    ActionKind.FAULT_INJECT: ("rank", "xid"),
}


@dataclass(slots=True, kw_only=True)
class Registry:
    """Checkpoints (in the order taken), branches (the root `main` first) and data sources of a run.

    Attributes:
        branch: the branch the ranks train on now.
        sources: data source name -> path, from applied `data_add` commands.
    """

    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)
    branches: dict[str, BranchInfo] = field(default_factory=lambda: {MAIN_BRANCH: BranchInfo(id=MAIN_BRANCH)})
    sources: dict[str, str] = field(default_factory=dict)
    branch: str = MAIN_BRANCH
    finished_seqs: set[int] = field(default_factory=set)

    def resolve(self, ref: str) -> CheckpointInfo | None:
        """The checkpoint with id `ref`, else the one tagged `ref`, else None."""
        if ref in self.checkpoints:
            return self.checkpoints[ref]
        return next((c for c in self.checkpoints.values() if c.tag and c.tag == ref), None)

    def describe_checkpoints(self) -> str:
        if not self.checkpoints:
            return "there are no checkpoints yet: take one with the checkpoint action"
        names = ", ".join(f"{c.id} (tag {c.tag})" if c.tag else c.id for c in self.checkpoints.values())
        return f"known checkpoints are {names}"

    def latest_checkpoint(self, at_or_before_step: int) -> CheckpointInfo | None:
        """The newest checkpoint taken at or before a step (the one a restart would resume from)."""
        fit = [c for c in self.checkpoints.values() if c.step <= at_or_before_step]
        return max(fit, key=lambda c: (c.step, c.seq)) if fit else None


def _int(value: str, default: int = 0) -> int:
    try:
        return int(value)
    except ValueError:
        return default


def apply_outcome(reg: Registry, outcome: Outcome) -> bool:
    """Fold a final outcome into the registry; return whether it changed it.

    Only APPLIED checkpoint/stop, rollback and data_add outcomes count, read from rank 0's detail
    (every rank computes the same ids). A missing detail falls back to the deterministic ids, so an
    old or partial ack still registers the checkpoint the design says was taken.
    """
    cmd = outcome.command
    if cmd is None:
        return False
    reg.finished_seqs.add(cmd.seq)
    if outcome.status is not OutcomeStatus.APPLIED or not isinstance(cmd.body, Action):
        return False
    first = min(outcome.results, key=lambda r: r.rank) if outcome.results else None
    detail: Mapping[str, str] = first.detail if first is not None else {}
    when = outcome.completed_at_s
    kind = cmd.body.kind
    if kind in (ActionKind.CHECKPOINT, ActionKind.STOP):
        ck = CheckpointInfo(
            id=detail.get("checkpoint_id") or checkpoint_id(cmd.seq),
            tag=detail.get("checkpoint_tag", cmd.body.args.get("tag", "")),
            step=_int(detail.get("checkpoint_step", ""), first.step if first else 0),
            branch=detail.get("branch") or reg.branch,
            path=detail.get("checkpoint_path", ""),
            created_at_s=when,
            seq=cmd.seq,
        )
        reg.checkpoints[ck.id] = ck
        return True
    if kind is ActionKind.ROLLBACK:
        br = BranchInfo(
            id=detail.get("branch") or (first.branch if first and first.branch else branch_id(cmd.seq)),
            parent=detail.get("parent_branch") or reg.branch,
            from_checkpoint=detail.get("from_checkpoint")
            or cmd.body.args.get("checkpoint_id", cmd.body.args.get("checkpoint", "")),
            fork_step=_int(detail.get("fork_step", ""), first.step if first else 0),
            created_at_s=when,
            seq=cmd.seq,
        )
        reg.branches[br.id] = br
        reg.branch = br.id
        return True
    if kind is ActionKind.DATA_ADD:
        name = detail.get("source") or cmd.body.args.get("name", "")
        if name:
            reg.sources[name] = cmd.body.args.get("path", "")
            return True
    return False


# ---- validation ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFacts:
    """What action validation needs to know of a job besides its registry."""

    job: str
    world_size: int
    fault_injection_allowed: bool = False


def _reject(kind: ActionKind, reason: str) -> CommandRejected:
    return CommandRejected(reason, key=kind.value)


def _actions(pending: Iterable[Command], kind: ActionKind) -> list[tuple[int, Action]]:
    return [(c.seq, c.body) for c in pending if isinstance(c.body, Action) and c.body.kind is kind]


def validate_action(
    reg: Registry, facts: JobFacts, action: Action, pending: Iterable[Command] = ()
) -> Action:
    """Check an action's arguments against the run; return the action as it is to be published.

    `pending` are the run's commands still in flight: they count as taken (a tag, a source name) so
    two submits cannot race past the check. A rollback gets the resolved `checkpoint_id` added to its
    arguments (and any `checkpoint_path` removed: ranks resolve ids under their own root).

    Raises:
        CommandRejected: naming what was wrong and what would be right.
    """
    kind = action.kind
    args = dict(action.args)
    pending = list(pending)
    for arg in REQUIRED_ACTION_ARGS.get(kind, ()):
        if not args.get(arg, "").strip():
            needed = " and ".join(f"{a}=..." for a in REQUIRED_ACTION_ARGS[kind])
            raise _reject(kind, f"action {kind.value} needs argument {arg!r}: pass {needed}")
    if kind is ActionKind.CHECKPOINT and "tag" in args:
        tag = args["tag"]
        if not _TAG.match(tag):
            raise _reject(
                kind,
                f"checkpoint tag {tag!r} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, "
                "'_', '.' and '-'",
            )
        taken = {c.tag for c in reg.checkpoints.values()} | {
            a.args.get("tag", "") for _, a in _actions(pending, ActionKind.CHECKPOINT)
        }
        if tag in taken:
            raise _reject(kind, f"checkpoint tag {tag!r} is already used in this run: pick another tag")
    elif kind is ActionKind.ROLLBACK:
        in_flight = _actions(pending, ActionKind.ROLLBACK)
        if in_flight:
            raise _reject(kind, f"a rollback (seq {in_flight[0][0]}) is in flight: wait for it")
        ref = args["checkpoint"]
        ck = reg.resolve(ref)
        if ck is None:
            raise _reject(kind, f"checkpoint {ref!r} does not exist: {reg.describe_checkpoints()}")
        args["checkpoint_id"] = ck.id
        if SEARCH_RESULT in args:
            try:
                search_record(args[SEARCH_RESULT])
            except ValueError as exc:
                raise _reject(kind, str(exc)) from None
        # No path: every rank resolves the id under its own checkpoint root (a path in a message is
        # never opened), so the weaver sends none.
        args.pop("checkpoint_path", None)
    elif kind is ActionKind.DATA_ADD:
        name = args["name"]
        if not _SOURCE.match(name):
            raise _reject(
                kind,
                f"data source name {name!r} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, "
                "'_' and '-'",
            )
        taken = set(reg.sources) | {a.args.get("name", "") for _, a in _actions(pending, kind)}
        if name in taken:
            known = ", ".join(sorted(taken))
            raise _reject(kind, f"data source {name!r} already exists (sources: {known}): pick a new name")
    elif kind is ActionKind.FAULT_INJECT:
        if not facts.fault_injection_allowed:
            raise _reject(
                kind,
                f"fault injection is disabled for job {facts.job}: start it with torchloom run "
                "--allow-fault-injection",
            )
        rank = _strict_int(args["rank"])
        if rank is None or not 0 <= rank < facts.world_size:
            raise _reject(
                kind,
                f"fault_inject rank={args['rank']!r} rejected: must be an integer in "
                f"[0, {facts.world_size - 1}] (the job has {facts.world_size} ranks)",
            )
        xid = _strict_int(args["xid"])
        if xid is None or not 0 < xid < MAX_XID:
            raise _reject(
                kind,
                f"fault_inject xid={args['xid']!r} rejected: must be an integer in "
                f"[1, {MAX_XID - 1}] (e.g. 79)",
            )
        args["rank"], args["xid"] = str(rank), str(xid)
    return Action(kind=kind, args=dict(sorted(args.items())))


MAX_SEARCH_RECORD_CHARS = 8192


def search_record(text: str) -> dict[str, object]:
    """The record a search's concluding rollback carries (`naming.SEARCH_RESULT`): a JSON object.

    Raises:
        ValueError: not a JSON object, or longer than MAX_SEARCH_RECORD_CHARS.
    """
    form = f"expected a JSON object of at most {MAX_SEARCH_RECORD_CHARS} characters"
    if len(text) > MAX_SEARCH_RECORD_CHARS:
        raise ValueError(f"{SEARCH_RESULT} of {len(text)} characters rejected: {form}")
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{SEARCH_RESULT} {text[:80]!r} rejected: {form}")
    return record


def _strict_int(raw: str) -> int | None:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        return None
