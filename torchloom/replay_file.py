"""The replay file (TORCHLOOM_REPLAY): a recorded list of applied commands, each to be applied when a
run reaches the same (branch, step) it was decided at. The CLI writes it from the journal and the
threadlet reads it; both go through this module, so the format has one definition.

The file is `{"job": str, "commands": [{"seq", "step", "branch", "kind": "set"|<action>, "values",
"args"}]}`.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchloom import env
from torchloom.messages import Action, ActionKind, Command, Issuer, KnobValue, SetConfig

FILE_NAME = "replay.json"
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

    def to_json(self) -> dict[str, Any]:
        """This entry in the file's form (float lists as JSON lists)."""
        return {
            "seq": self.seq,
            "step": self.step,
            "branch": self.branch,
            "kind": self.kind,
            "values": {k: list(v) if isinstance(v, tuple) else v for k, v in self.values.items()},
            "args": dict(self.args),
        }


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
        raise ValueError(f"{env.REPLAY}={path!s} cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{env.REPLAY}={path!s} is not JSON: {exc}") from None
    return parse(doc)


def document(job: str, entries: Iterable[ReplayEntry]) -> dict[str, Any]:
    """The replay file's JSON document for `job`'s entries, in seq order."""
    return {"job": job, "commands": [e.to_json() for e in sorted(entries, key=lambda e: e.seq)]}


def write(run_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Check `doc` as a reader would, write it as `<run_dir>/replay.json` and return its absolute path.

    Raises:
        ValueError: `doc` is not a valid replay document (the message names the expected form).
    """
    parse(doc)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FILE_NAME
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path.resolve()
