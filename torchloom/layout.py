"""The checkpoint layout on disk, shared by the ranks that write it and the launcher that resumes from
it: `<root>/<job>/<run_id>/ckpt-<seq>/`, DCP's `.metadata`, and the completion marker rank 0 writes
last (docs/design.md, "Actions").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torchloom import discovery, env, naming

# Written by rank 0 once the collective save has returned, i.e. after DCP's coordinator wrote
# `.metadata` for every rank's data: a directory without it is a save that a failure cut short.
COMPLETE_MARKER = "torchloom-complete.json"
DCP_METADATA = ".metadata"


def default_root(checkpoint_dir: str | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The checkpoint root: `checkpoint_dir`, else TORCHLOOM_CHECKPOINT_DIR, else
    `<TORCHLOOM_HOME or ~/.torchloom>/checkpoints` (variables of `environ`, default this process's)."""
    chosen = checkpoint_dir or (
        env.get(env.CHECKPOINT_DIR) if environ is None else environ.get(env.CHECKPOINT_DIR)
    )
    if chosen:
        return Path(chosen).expanduser()
    return discovery.home(environ) / "checkpoints"


def run_dir(root: Path | str, job: str, run_id: str) -> Path:
    """`<root>/<job>/<run_id>`: where one attempt of a run keeps its checkpoints."""
    return Path(root) / job / run_id


def checkpoint_path(root: Path | str, job: str, run_id: str, seq: int) -> Path:
    """`<root>/<job>/<run_id>/ckpt-<seq>`: where command `seq`'s checkpoint lives."""
    return run_dir(root, job, run_id) / naming.checkpoint_id(seq)


def mark_complete(path: Path, *, step: int, branch: str = "", world_size: int = 1) -> None:
    """Record that the checkpoint at `path` is whole; rank 0 calls this after the collective save.

    Written to a temporary name and renamed, so a reader never sees half a marker.
    """
    tmp = path / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "branch": branch, "world_size": world_size}), encoding="utf-8")
    os.replace(tmp, path / COMPLETE_MARKER)


def read_marker(path: Path) -> dict[str, object] | None:
    """The completion marker of the checkpoint at `path`, or None when it is not complete (no DCP
    metadata, no marker, or a marker without an integer step)."""
    if not (path / DCP_METADATA).is_file():
        return None
    try:
        data = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("step"), int) else None


def checkpoint_step(path: Path) -> int | None:
    """The step the checkpoint at `path` holds, from its completion marker; None when not complete."""
    marker = read_marker(path)
    step = marker.get("step") if marker is not None else None
    return step if isinstance(step, int) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """A complete checkpoint on disk.

    Attributes:
        path: its directory, `<root>/<job>/<run_id>/ckpt-<seq>`.
        run_id: the attempt that wrote it.
        seq: the command seq that took it.
        step: the training step it holds (from its completion marker).
    """

    path: Path
    run_id: str
    seq: int
    step: int


def find_latest(root: Path | str, job: str, run_id: str) -> Found | None:
    """The complete checkpoint with the highest step among every attempt of `run_id`'s run.

    Looks at `<root>/<job>/<base>/ckpt-*` and every attempt's `<root>/<job>/<base>-a<N>.../ckpt-*`;
    ties on step go to the later-written marker. Incomplete directories (no marker or no DCP metadata) are
    skipped: they are saves a failure interrupted.
    """
    base = naming.base_run_id(run_id)
    job_dir = Path(root) / job
    if not job_dir.is_dir():
        return None
    best: tuple[int, int, int] | None = None  # (step, marker mtime ns, seq)
    found: Found | None = None
    for attempt_dir in job_dir.iterdir():
        if naming.base_run_id(attempt_dir.name) != base or not attempt_dir.is_dir():
            continue
        for ckpt in attempt_dir.iterdir():
            is_ckpt = naming.is_checkpoint_id(ckpt.name)
            marker = read_marker(ckpt) if is_ckpt else None
            if marker is None:
                continue
            step = marker["step"]
            assert isinstance(step, int)  # read_marker checked it
            key = (step, (ckpt / COMPLETE_MARKER).stat().st_mtime_ns, naming.seq_of(ckpt.name))
            if best is None or key > best:
                best = key
                found = Found(path=ckpt, run_id=attempt_dir.name, seq=key[2], step=step)
    return found
