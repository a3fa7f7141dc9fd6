"""The records a threadlet's components share: who this rank is (`RankContext`), where its training
stands (`TrainingState`, the one mutable record, owned by the `Threadlet` front), a command filed on
receipt (`Filed`) and a command decided at a step boundary (`Decided`, the entries of `tl.applied`)."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Self

import torch.distributed as dist

from torchloom import naming
from torchloom.messages import AckStatus, Command, KnobValue


@dataclass(frozen=True, slots=True, kw_only=True)
class RankContext:
    """This process's identity; fixed for its lifetime.

    Attributes:
        rank, world_size, local_rank: as torch.distributed (or torchrun's environment) says.
        incarnation: a fresh uuid4 hex per process start, so a restarted rank is never confused
            with its dead predecessor.
        host, pid: where the process runs.
    """

    rank: int
    world_size: int
    local_rank: int
    incarnation: str
    host: str
    pid: int

    @classmethod
    def detect(cls) -> Self:
        """Rank, world size and local rank from torch.distributed, else RANK/WORLD_SIZE/LOCAL_RANK;
        a new incarnation."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank = int(os.environ.get("RANK", "0") or 0)
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            incarnation=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
        )


@dataclass(slots=True)
class TrainingState:
    """Where this rank's training stands. Written on the training thread only; the bus thread reads
    `last_decided` alone (an int swap, safe without a lock).

    Attributes:
        step_count: completed training steps on the current branch (a rollback moves it back).
        tick: `step()` calls since start; never rewinds (agreement rounds are scheduled in ticks).
        branch: "main", then "b<seq>" after each rollback.
        last_decided: the highest seq decided on this rank (the same on every rank).
        paused: a `pause` action holds the loop at its step boundary.
        stop: a `stop` action was decided: the loop should end.
        loop_handles_stop: the script ends its loop on a stop itself (it iterates `tl.range`, reads
            `tl.should_stop` or said so); otherwise the next `step()` after a stop ends the process.
        exit_at_next_step: a stop was decided while the loop did not handle it: the next `step()`
            closes the threadlet and ends the process with status 0.
        step_time_s: moving mean of the time between two `step()` calls.
    """

    step_count: int = 0
    tick: int = 0
    branch: str = naming.MAIN_BRANCH
    last_decided: int = 0
    paused: bool = False
    stop: bool = False
    loop_handles_stop: bool = False
    exit_at_next_step: bool = False
    step_time_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Filed:
    """A received command with this rank's local verdict (refusal None: acceptable here) and, for a
    `set`, its typed values."""

    command: Command
    received_at_s: float
    refusal: str | None
    values: Mapping[str, KnobValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decided:
    """One command as this rank decided it at a step boundary.

    Attributes:
        seq: the command's position in the job's command stream.
        command_id: the id the submitter gave it.
        kind: "set", or the action's name ("checkpoint", "rollback", ...).
        status: applied or rejected.
        step, branch: the run's position where it was decided (before a rollback in the same batch
            moved it), so a replay finds it at the same place.
        reason: why it was rejected ("" when applied).
        values: the typed values of a `set` (empty for actions).
        args: the arguments of an action (empty for a `set`).
        detail: the ack detail (checkpoint path, new branch, eval results, ...).
    """

    seq: int
    command_id: str
    kind: str
    status: AckStatus
    step: int
    branch: str
    reason: str = ""
    values: Mapping[str, KnobValue] = field(default_factory=dict)
    args: Mapping[str, str] = field(default_factory=dict)
    detail: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views of private copies: the record cannot change after the decision.
        for name in ("values", "args", "detail"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def applied(self) -> bool:
        return self.status is AckStatus.APPLIED

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `rank<R>.applied.json` entries scripts write and replays read):
        every field, status as its string, float-list values as lists."""
        return {
            "seq": self.seq,
            "command_id": self.command_id,
            "kind": self.kind,
            "status": self.status.value,
            "step": self.step,
            "branch": self.branch,
            "reason": self.reason,
            "values": {k: list(v) if isinstance(v, tuple) else v for k, v in self.values.items()},
            "args": dict(self.args),
            "detail": dict(self.detail),
        }


# Ack detail of a `set` whose values another `set` decided at the same boundary replaced: no step
# ran with them ("lr by #6, weight_decay by #7").
SUPERSEDED_BY = "superseded_by"


def mark_superseded(batch: Sequence[Decided]) -> list[Decided]:
    """The decisions of one boundary, in seq order, with `SUPERSEDED_BY` added to every applied
    `set` whose values a later applied `set` of the same boundary replaced (the same key, or the
    same knob for all groups): the value was in effect for no step, and its ack says so."""
    out = list(batch)
    for i, d in enumerate(out):
        if not (d.applied and d.kind == "set"):
            continue
        by: dict[str, int] = {}
        for later in out[i + 1 :]:
            if later.applied and later.kind == "set":
                for key in d.values:
                    if key not in by and (key in later.values or key.split("@", 1)[0] in later.values):
                        by[key] = later.seq
        if by:
            note = ", ".join(f"{key} by #{seq}" for key, seq in sorted(by.items()))
            out[i] = dataclasses.replace(d, detail={**d.detail, SUPERSEDED_BY: note})
    return out
