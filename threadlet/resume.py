"""Resume at start: which checkpoint a (re)started rank loads, under which run id, and with which knob
overrides; pure file-system and environment logic, so the agent only carries out the plan.

A restart comes two ways: the launcher's supervisor relaunches torchrun with TORCHLOOM_RESUME_FROM and
TORCHLOOM_KNOB_OVERRIDES (a reconfiguration), or torchrun's elastic agent restarts the group itself
(TORCHELASTIC_RESTART_COUNT > 0) and the ranks pick the latest complete checkpoint of the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torchloom import env, naming
from torchloom.errors import CommandRejected
from torchloom.knobs import validate_set
from torchloom.layout import COMPLETE_MARKER, DCP_METADATA, find_latest, read_marker
from torchloom.messages import KnobSpec, KnobValue

RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun's elastic agent on every worker


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """torchrun's restart count for this worker (0 on the first attempt or outside torchrun).

    Raises:
        ValueError: the variable is set but not a non-negative integer.
    """
    raw = (os.environ if environ is None else environ).get(RESTART_COUNT, "") or "0"
    if not raw.isdigit():
        raise ValueError(f"{RESTART_COUNT}={raw!r} rejected: expected a non-negative integer")
    return int(raw)


def effective_run_id(run_id: str, environ: Mapping[str, str] | None = None) -> str:
    """The run id this process reports: after elastic restart N > 0 of run R, `R-aN`."""
    return naming.attempt_run_id(run_id, restart_count(environ))


def parse_overrides(text: str | None) -> dict[str, KnobValue]:
    """Parse TORCHLOOM_KNOB_OVERRIDES: a JSON object of knob (or `knob@group`) to value.

    Raises:
        ValueError: not a JSON object, or a value that is not a finite number, bool, string or list
            of numbers.
    """
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(
            f"{env.KNOB_OVERRIDES}={text!r} rejected: expected a JSON object such as "
            '{"grad_accum_steps": 2}'
        )
    out: dict[str, KnobValue] = {}
    for key, value in data.items():
        if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            value = tuple(float(v) for v in value)
        ok = isinstance(value, bool | int | str | tuple) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if not ok:
            raise ValueError(
                f"{env.KNOB_OVERRIDES}: {key!r}={value!r} rejected: expected a finite number, bool, "
                "string or list of numbers"
            )
        out[str(key)] = value
    return out


def validate_overrides(
    schema: Mapping[str, KnobSpec], overrides: Mapping[str, KnobValue]
) -> dict[str, KnobValue]:
    """Check overrides like a `set` command against this rank's knob schema; {} stays {}.

    Raises:
        CommandRejected: an unknown knob or a value out of bounds (the message names it).
    """
    if not overrides:
        return {}
    try:
        return validate_set(schema, overrides)
    except CommandRejected as exc:
        raise CommandRejected(f"{env.KNOB_OVERRIDES}: {exc}", key=exc.key) from None


def per_rank_source(path: Path, rank: int) -> int:
    """Whose per-rank entry (RNG, sampler) `rank` loads: its own when the checkpoint has one, else
    rank 0's (a world that grew past the one that saved)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return rank if f"rank{rank}" in keys else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePlan:
    """What a rank does at attach.

    Attributes:
        run_id: the run id to report (attempt-suffixed after an elastic restart).
        checkpoint: the checkpoint to load first, or None (a fresh start).
        source: "supervisor" (TORCHLOOM_RESUME_FROM), "elastic" (latest of the run) or "" (fresh).
        restart_count: torchrun's restart count.
        overrides: knob values to apply after the load (not yet checked against the schema).
    """

    run_id: str
    checkpoint: Path | None = None
    source: str = ""
    restart_count: int = 0
    overrides: dict[str, KnobValue] = field(default_factory=dict)


def plan(*, root: Path | str, job: str, run_id: str, environ: Mapping[str, str] | None = None) -> ResumePlan:
    """Decide the resume of this process from its environment and the checkpoints on disk.

    TORCHLOOM_RESUME_FROM wins on the first attempt; after an elastic restart the latest complete
    checkpoint of the run (any attempt) is newer, so it wins when there is one.

    Raises:
        FileNotFoundError: TORCHLOOM_RESUME_FROM names a directory that is not a complete checkpoint.
        ValueError: a malformed TORCHLOOM_KNOB_OVERRIDES or TORCHELASTIC_RESTART_COUNT.
    """
    environ = os.environ if environ is None else environ
    count = restart_count(environ)
    overrides = parse_overrides(environ.get(env.KNOB_OVERRIDES))
    effective = effective_run_id(run_id, environ)
    if count > 0:
        latest = find_latest(root, job, run_id)
        if latest is not None:
            return ResumePlan(
                run_id=effective,
                checkpoint=latest.path,
                source="elastic",
                restart_count=count,
                overrides=overrides,
            )
    given = environ.get(env.RESUME_FROM) or ""
    if given:
        path = Path(given)
        if read_marker(path) is None:
            raise FileNotFoundError(
                f"{env.RESUME_FROM}={given!r} rejected: expected a complete checkpoint directory "
                f"(with {DCP_METADATA} and {COMPLETE_MARKER})"
            )
        return ResumePlan(
            run_id=effective, checkpoint=path, source="supervisor", restart_count=count, overrides=overrides
        )
    return ResumePlan(run_id=effective, restart_count=count, overrides=overrides)
