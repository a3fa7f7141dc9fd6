"""Where a message may point a rank: `data add` paths only under the job's data roots
(`torchloom run --data-root DIR`, TORCHLOOM_DATA_ROOTS; default the working directory), and rollback
targets only as checkpoint ids under the rank's own checkpoint root (docs/security.md, "No code from
data"). Pure path logic; symlinks are resolved before the check, so a link cannot lead outside.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torchloom import layout, naming


def parse_roots(raw: str | None, cwd: Path | None = None) -> tuple[str, ...]:
    """The data roots named by `raw` (os.pathsep-separated), each resolved; none: the working directory."""
    parts = [p for p in (raw or "").split(os.pathsep) if p.strip()]
    base = cwd if cwd is not None else Path.cwd()
    return tuple(str((base / Path(p).expanduser()).resolve()) for p in parts) or (str(base.resolve()),)


def data_path(path: str, roots: Sequence[str], cwd: Path | None = None) -> Path:
    """`path` resolved (symlinks followed, relative to `cwd`), when it lies under one of `roots`.

    Raises:
        ValueError: it lies outside every root; the message names the roots and the flag that adds one.
    """
    base = cwd if cwd is not None else Path.cwd()
    resolved = (base / Path(path).expanduser()).resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    names = ", ".join(roots) or "none"
    raise ValueError(
        f"data path {path!r} is outside the job's data roots ({names}): put the file under one of them, "
        "or start the job with `torchloom run --data-root DIR`"
    )


def rollback_path(checkpoint_dir: str | None, job: str, run_id: str, checkpoint_id: str) -> Path:
    """The directory of checkpoint `checkpoint_id` (`ckpt-<seq>`) of this rank's run, under its own
    checkpoint root; a path carried by the message is never used.

    Raises:
        ValueError: the id is not of the form ckpt-<seq>.
    """
    seq = naming.seq_of(checkpoint_id)
    return layout.checkpoint_path(layout.default_root(checkpoint_dir), job, run_id, seq)
