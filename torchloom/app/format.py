"""Pure builders of the CLI's `--json` shapes and human tables for knobs, checkpoints, branches, devices,
the journal, and the journal-to-replay conversion.

Nothing here does I/O: every function maps messages (or parsed JSON) to plain data or text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torchloom import replay_file
from torchloom.messages import (
    AckStatus,
    Action,
    JobEvent,
    JobStatus,
    KnobValue,
    Outcome,
    OutcomeStatus,
    RankResult,
    SetConfig,
    StatusReply,
    WatchEvent,
)
from torchloom.naming import MAIN_BRANCH
from torchloom.replay_file import ReplayEntry

UNHEALTHY_MARK = "!"


def json_value(value: KnobValue | None) -> Any:
    """Return a knob value in a JSON-safe form (tuples become lists; NaN/inf become strings)."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _bound(value: float | None) -> Any:
    return None if value is None else json_value(value)


def _time(stamp_s: float) -> float | None:
    return stamp_s if stamp_s > 0 else None


# ---- knobs, checkpoints, branches ------------------------------------------------------------------


def knobs_json(job: JobStatus) -> dict[str, Any]:
    """Return the `--json` shape of `torchloom knobs`: the job's knob schema with current values."""
    return {
        "job": job.job,
        "knobs": [
            {
                "name": k.name,
                "type": str(k.type),
                "min": _bound(k.min),
                "max": _bound(k.max),
                "min_exclusive": k.min_exclusive,
                "max_exclusive": k.max_exclusive,
                "value": json_value(k.value),
                "description": k.description,
                "groups": list(k.groups),
                "choices": list(k.choices),
            }
            for k in sorted(job.knobs, key=lambda k: k.name)
        ],
    }


def _range_text(item: Mapping[str, Any]) -> str:
    lo, hi = item["min"], item["max"]
    if lo is None and hi is None:
        return "-"
    left = "(" if item["min_exclusive"] or lo is None else "["
    right = ")" if item["max_exclusive"] or hi is None else "]"
    return f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"


def format_knobs(data: Mapping[str, Any]) -> str:
    """Return the human form of `knobs_json`: one row per knob."""
    rows = data["knobs"]
    if not rows:
        return f"job {data['job']}: no knobs reported yet"
    out = [f"{'knob':<16} {'type':<10} {'value':<14} {'range':<18} {'groups':<14} description"]
    for k in rows:
        value = k["value"]
        shown = (
            ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            if isinstance(value, list)
            else (f"{value:.6g}" if isinstance(value, float) else str(value))
        )
        groups = ",".join(k["groups"]) or "-"
        out.append(
            f"{k['name']:<16} {k['type']:<10} {shown:<14} {_range_text(k):<18} {groups:<14} "
            f"{k['description']}"
        )
    return "\n".join(out)


def checkpoints_json(job: JobStatus) -> dict[str, Any]:
    """Return the `--json` shape of `torchloom checkpoints`, oldest first."""
    return {
        "job": job.job,
        "checkpoints": [
            {
                "id": c.id,
                "tag": c.tag or None,
                "step": c.step,
                "branch": c.branch,
                "path": c.path,
                "time": _time(c.created_at_s),
                "seq": c.seq,
            }
            for c in sorted(job.checkpoints, key=lambda c: (c.seq, c.id))
        ],
    }


def format_checkpoints(data: Mapping[str, Any]) -> str:
    """Return the human form of `checkpoints_json`."""
    rows = data["checkpoints"]
    if not rows:
        return f"job {data['job']}: no checkpoints yet (take one with `torchloom checkpoint`)"
    out = [f"{'id':<10} {'tag':<16} {'step':>8} {'branch':<10} path"]
    out += [f"{c['id']:<10} {c['tag'] or '-':<16} {c['step']:>8} {c['branch']:<10} {c['path']}" for c in rows]
    return "\n".join(out)


def branches_json(job: JobStatus) -> dict[str, Any]:
    """Return the `--json` shape of `torchloom branches`: every branch and the current one."""
    return {
        "job": job.job,
        "branches": [
            {
                "id": b.id,
                "parent": b.parent or None,
                "from_checkpoint": b.from_checkpoint or None,
                "fork_step": b.fork_step,
                "time": _time(b.created_at_s),
                "seq": b.seq,
            }
            for b in sorted(job.branches, key=lambda b: (b.seq, b.id))
        ],
        "current": job.branch or MAIN_BRANCH,
    }


def format_branches(data: Mapping[str, Any]) -> str:
    """Return the branch tree: children indented under their parent, the current branch marked `*`."""
    rows = list(data["branches"])
    current = data["current"]
    ids = {b["id"] for b in rows}
    if current not in ids:
        rows.insert(0, {"id": current, "parent": None, "from_checkpoint": None, "fork_step": 0, "seq": 0})
        ids.add(current)
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    for b in rows:
        parent = b["parent"] if b["parent"] in ids else None
        children.setdefault(parent, []).append(b)
    out: list[str] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        for b in children.get(parent, []):
            if b["id"] in seen:  # a malformed registry must not loop forever
                continue
            seen.add(b["id"])
            mark = "*" if b["id"] == current else " "
            line = f"{mark} {'  ' * depth}{b['id']}"
            if b["from_checkpoint"]:
                line += f"  (from {b['from_checkpoint']} at step {b['fork_step']})"
            out.append(line)
            walk(b["id"], depth + 1)

    walk(None, 0)
    return "\n".join(out)


# ---- devices --------------------------------------------------------------------------------------


def devices_json(reply: StatusReply) -> dict[str, Any]:
    """Return the `--json` shape of `torchloom devices`: one row per rank with its health state."""
    rows: list[dict[str, Any]] = []
    for job in reply.jobs:
        for r in sorted(job.ranks, key=lambda r: r.rank):
            health = dataclasses.asdict(r.device) if r.device is not None else {}
            if "xids" in health:
                health["xids"] = list(health["xids"])
            rows.append(
                {
                    "job": job.job,
                    "rank": r.rank,
                    "local_rank": r.local_rank,
                    "host": r.host,
                    "device": r.device.device if r.device is not None else "",
                    "pid": r.pid,
                    "state": r.health or "healthy",
                    "reason": r.health_reason or None,
                    "health": health,
                }
            )
    return {"devices": rows}


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f}G" if n else "-"


def format_devices(data: Mapping[str, Any]) -> str:
    """Return the devices table; rows not healthy are marked with `!` and their reason."""
    rows = data["devices"]
    if not rows:
        return "no devices reported yet"
    out = [
        f"  {'job':<12} {'rank':>4} {'host':<16} {'device':<10} {'pid':>7} {'state':<10} "
        f"{'util':>5} {'mem':>11}"
    ]
    for d in rows:
        h = d["health"]
        mark = " " if d["state"] == "healthy" else UNHEALTHY_MARK
        util = f"{h.get('utilization_pct') or h.get('cpu_load_pct') or 0:.0f}%" if h else "-"
        mem = (
            f"{_bytes(h.get('memory_used_bytes', 0))}/{_bytes(h.get('memory_total_bytes', 0))}" if h else "-"
        )
        line = (
            f"{mark} {d['job']:<12} {d['rank']:>4} {d['host']:<16} {d['device'] or '-':<10} {d['pid']:>7} "
            f"{d['state']:<10} {util:>5} {mem:>11}"
        )
        out.append(f"{line}  {d['reason']}" if d["reason"] else line)
    return "\n".join(out)


# ---- action outcomes --------------------------------------------------------------------------------


def rank_detail_lines(outcome: Outcome) -> list[str]:
    """Return `rank R: key=value ...` lines for every rank whose ack carried a detail (eval metrics, ids)."""
    return [
        f"  rank {r.rank}: " + " ".join(f"{k}={v}" for k, v in sorted(r.detail.items()))
        for r in sorted(outcome.results, key=lambda r: r.rank)
        if r.detail
    ]


# ---- journal ------------------------------------------------------------------------------------------


def _result_json(r: RankResult) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "status": str(r.status),
        "step": r.step,
        "branch": r.branch,
        "reason": r.reason or None,
        "detail": dict(r.detail),
    }


def journal_entry_json(entry: WatchEvent) -> dict[str, Any] | None:
    """Return the `--json` form of one journal entry (an outcome or an event); None for anything else."""
    if isinstance(entry, JobEvent):
        return {
            "type": "event",
            "job": entry.job,
            "run_id": entry.run_id,
            "kind": entry.kind,
            "message": entry.message,
            "time_s": entry.time_s,
            "command_id": entry.command_id or None,
            "attrs": dict(entry.attrs),
        }
    if not isinstance(entry, Outcome):
        return None
    cmd = entry.command
    issuer = cmd.issuer if cmd is not None else entry.issuer
    body = cmd.body if cmd is not None else entry.attempted  # a refused attempt: what was asked
    kind = "set" if isinstance(body, SetConfig) else body.kind.value if isinstance(body, Action) else None
    return {
        "type": "outcome",
        "seq": cmd.seq if cmd is not None else 0,
        "command_id": entry.command_id,
        "job": entry.job,
        "run_id": cmd.run_id if cmd is not None else entry.run_id,
        # A refused attempt has no command; its outcome still names who asked.
        "issuer": {"kind": issuer.kind, "identity": issuer.identity} if issuer is not None else None,
        "issued_at_s": cmd.issued_at_s if cmd is not None else None,
        "kind": kind,
        "values": {k: json_value(v) for k, v in sorted(body.values.items())}
        if isinstance(body, SetConfig)
        else {},
        "args": dict(body.args) if isinstance(body, Action) else {},
        "status": str(entry.status),
        "reason": entry.reason or None,
        "results": [_result_json(r) for r in sorted(entry.results, key=lambda r: r.rank)],
    }


# C0 and C1 control characters (not the space): a terminal would act on them (colors, cursor moves,
# titles), so text from the bus (a reason, a message, a metric name) is shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character (newlines too) shown as its escape, e.g. `\\x1b`."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def format_journal_entry(item: Mapping[str, Any]) -> str:
    """Return one terminal line for a journal entry built by `journal_entry_json` (control
    characters escaped: `printable`)."""
    return printable(_journal_line(item))


def _journal_line(item: Mapping[str, Any]) -> str:
    if item["type"] == "event":
        text = f"event   {item['job']} {item['kind']}: {item['message']}".rstrip(": ")
        return f"{text} [{item['command_id']}]" if item.get("command_id") else text
    what = " ".join(f"{k}={v}" for k, v in {**item["values"], **item["args"]}.items())
    steps = sorted({r["step"] for r in item["results"]})
    at = f" at step {steps[0]}" if len(steps) == 1 else f" at steps {steps}" if steps else ""
    issuer = item["issuer"] or {}
    who = f" by {issuer.get('kind')}:{issuer.get('identity')}" if issuer else ""
    seq = f"#{item['seq']}" if item["seq"] else "refused"  # a refused attempt never had a seq
    kind = item["kind"] or "command"
    line = f"{seq:<5} {item['job']} {kind} {what}".rstrip() + f": {item['status']}{at}{who}"
    return f"{line} ({item['reason']})" if item["reason"] else line


# ---- journal -> replay file ---------------------------------------------------------------------------


def parse_journal_text(text: str) -> list[dict[str, Any]]:
    """Parse what `torchloom journal --json` printed: one `{"entries": [...]}` object, or (from --follow)
    one entry object per line.

    Raises:
        ValueError: naming the expected forms when the text is neither.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("journal is empty: expected the output of `torchloom journal --json`")
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("entries"), list):
        entries: list[Any] = whole["entries"]
    elif isinstance(whole, dict) and "type" in whole:
        entries = [whole]
    else:
        entries = []
        for n, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"journal line {n} is not JSON ({exc.msg}): expected the output of "
                    "`torchloom journal --json` ({'entries': [...]}) or of `--json --follow` "
                    "(one entry per line)"
                ) from None
    if not all(isinstance(e, dict) and "type" in e for e in entries):
        raise ValueError('journal entries must be objects with a "type" ("outcome" or "event")')
    return entries


def _rank0(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    applied = [r for r in results if r.get("status") == str(AckStatus.APPLIED)]
    return min(applied, key=lambda r: int(r["rank"])) if applied else None


def replay_from_journal(entries: Iterable[Mapping[str, Any]], job: str | None = None) -> dict[str, Any]:
    """Convert journal entries to the replay file's document (torchloom.replay_file).

    Keeps only APPLIED outcomes of `job` (default: the only job in the journal) from its latest run
    (the run of the last such outcome), in seq order, each at the step and branch of rank 0's result.

    Returns:
        `{"job": str, "commands": [{"seq", "step", "branch", "kind", "values", "args"}]}`.

    Raises:
        ValueError: when the journal holds no outcome of the job, or several jobs and none was chosen.
    """
    # Refused attempts (seq 0: nothing was published) never ran, so a replay leaves them out.
    outcomes = [e for e in entries if e.get("type") == "outcome" and e.get("seq")]
    jobs = sorted({str(e.get("job", "")) for e in outcomes})
    if job is None:
        if len(jobs) != 1:
            found = ", ".join(jobs) if jobs else "none"
            raise ValueError(
                f"journal holds outcomes of jobs: {found}; expected exactly one (pick one with --job)"
            )
        job = jobs[0]
    mine = [e for e in outcomes if e.get("job") == job]
    if not mine:
        raise ValueError(f"journal holds no command of job {job!r} (jobs in it: {', '.join(jobs) or 'none'})")
    run_id = mine[-1].get("run_id", "")
    commands: list[ReplayEntry] = []
    for e in mine:
        if e.get("run_id", "") != run_id or e.get("status") != str(OutcomeStatus.APPLIED):
            continue
        first = _rank0(e.get("results") or [])
        if first is None:
            continue
        raw = {
            "seq": int(e["seq"]),
            "step": int(first.get("step", 0)),
            "branch": str(first.get("branch") or MAIN_BRANCH),  # acks before branches existed
            "kind": str(e["kind"]),
            "values": dict(e.get("values") or {}),
            "args": dict(e.get("args") or {}),
        }
        commands.append(replay_file.parse_entry(raw, len(commands)))
    return replay_file.document(job, commands)
