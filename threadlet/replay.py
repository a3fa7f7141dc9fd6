"""Replay mode: a recorded list of applied commands, each applied when the run reaches the same
(branch, step) it was decided at, instead of commands from the bus (TORCHLOOM_REPLAY).

The file (the CLI writes it from the journal) is
`{"job": str, "commands": [{"seq", "step", "branch", "kind": "set"|<action>, "values", "args"}]}`.
Positions are predetermined and the same on every rank, so no agreement round is needed.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchloom.messages import Action, ActionKind, Command, Issuer, KnobValue, SetConfig

_FORM = (
    '{"job": str, "commands": [{"seq": int, "step": int, "branch": str, '
    '"kind": "set"|<action>, "values": {...}, "args": {...}}]}'
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayEntry:
    """One recorded command: apply `kind` when the run is at (`branch`, `step`)."""

    seq: int
    step: int
    branch: str
    kind: str
    values: Mapping[str, KnobValue] = field(default_factory=dict)
    args: Mapping[str, str] = field(default_factory=dict)

    def command(self, job: str, run_id: str) -> Command:
        """This entry as a Command of run `run_id` (command id `replay-<seq>`)."""
        body: SetConfig | Action
        if self.kind == "set":
            body = SetConfig(values=dict(self.values))
        else:
            body = Action(kind=ActionKind(self.kind), args=dict(self.args))
        return Command(
            command_id=f"replay-{self.seq}",
            job=job,
            run_id=run_id,
            seq=self.seq,
            issuer=Issuer(kind="replay", identity=""),
            issued_at_s=time.time(),
            body=body,
        )


def _bad(where: str, what: str) -> ValueError:
    return ValueError(f"replay file {where}: {what}; expected {_FORM}")


def _value(where: str, raw: Any) -> KnobValue:
    if isinstance(raw, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            raise _bad(where, f"list value {raw!r} must hold numbers only")
        return tuple(float(v) for v in raw)
    if isinstance(raw, bool | int | float | str):
        return raw
    raise _bad(where, f"value {raw!r} must be a number, bool, string or list of numbers")


def parse_entry(raw: Any, index: int) -> ReplayEntry:
    """Validate one item of "commands".

    Raises:
        ValueError: naming the item and the expected form.
    """
    where = f"commands[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be an object")
    seq, step, branch, kind = raw.get("seq"), raw.get("step"), raw.get("branch"), raw.get("kind")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise _bad(where, f"seq={seq!r} must be an integer >= 1")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _bad(where, f"step={step!r} must be an integer >= 0")
    if not isinstance(branch, str) or not branch:
        raise _bad(where, f"branch={branch!r} must be a non-empty string")
    kinds = {"set", *(k.value for k in ActionKind)}
    if kind not in kinds:
        raise _bad(where, f"kind={kind!r} must be one of {', '.join(sorted(kinds))}")
    values, args = raw.get("values") or {}, raw.get("args") or {}
    if not isinstance(values, dict) or not isinstance(args, dict):
        raise _bad(where, "values and args must be objects")
    if kind == "set" and not values:
        raise _bad(where, "a set needs values")
    return ReplayEntry(
        seq=seq,
        step=step,
        branch=branch,
        kind=kind,
        values={str(k): _value(f"{where}.values.{k}", v) for k, v in values.items()},
        args={str(k): str(v) for k, v in args.items()},
    )


def parse(doc: Any) -> tuple[str, list[ReplayEntry]]:
    """Validate a decoded replay document; return its job and entries in seq order.

    Raises:
        ValueError: on a malformed document or a repeated seq.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("commands"), list):
        raise _bad("top level", "must be an object with a 'commands' list")
    job = doc.get("job", "")
    if not isinstance(job, str):
        raise _bad("top level", f"job={job!r} must be a string")
    entries = sorted((parse_entry(raw, i) for i, raw in enumerate(doc["commands"])), key=lambda e: e.seq)
    for a, b in itertools.pairwise(entries):
        if a.seq == b.seq:
            raise _bad("commands", f"seq {a.seq} appears twice")
    return job, entries


def load(path: str | Path) -> tuple[str, list[ReplayEntry]]:
    """Read and validate a replay file.

    Raises:
        ValueError: the file is missing, not JSON or malformed (the message names the file).
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"TORCHLOOM_REPLAY={path!s} cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"TORCHLOOM_REPLAY={path!s} is not JSON: {exc}") from None
    return parse(doc)


class Schedule:
    """The replay's pending entries; hands out those due at a (branch, step) position, in seq order.

    Entries are applied strictly in seq order: an entry whose position is not reached holds back
    the ones after it, as a live run decides commands in seq order.
    """

    def __init__(self, entries: list[ReplayEntry]) -> None:
        self._entries = sorted(entries, key=lambda e: e.seq)
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._entries) - self._next

    def due(self, branch: str, step: int) -> list[ReplayEntry]:
        """Pop the entries decided at (`branch`, `step`): the run is at that position now."""
        out: list[ReplayEntry] = []
        while self._next < len(self._entries):
            entry = self._entries[self._next]
            if entry.branch != branch or entry.step != step:
                break
            out.append(entry)
            self._next += 1
        return out
