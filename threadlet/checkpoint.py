"""Consistent checkpoints of one rank's training with torch.distributed.checkpoint: save and in-place
load of model, optimizer, scheduler, sampler, RNG and threadlet state. Ids come from torchloom.naming
and paths from torchloom.layout (docs/design.md, "Actions").

Model and optimizer go through `get_state_dict`/`set_state_dict` (DDP and FSDP aware); everything
that differs per rank (RNG, sampler, scheduler) is one pickled entry per rank (`rank<R>`), since DCP
keeps a single copy of identical keys across ranks.
"""

from __future__ import annotations

import pickle
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU (and CUDA when initialized), python `random`, numpy."""
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back RNG states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _has_state(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")


def _dcp(op: Callable[..., Any], state: dict[str, Any], path: Path, group: Any) -> None:
    """Run DCP's save or load over `group` (or without dist when it is not initialized)."""
    kwargs: dict[str, Any] = {"process_group": group}
    if not (dist.is_available() and dist.is_initialized()):
        kwargs = {"no_dist": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process" without dist
        op(state, checkpoint_id=str(path), **kwargs)


def _per_rank_objects(scheduler: Any, sampler: Any) -> tuple[tuple[str, Any], ...]:
    """The per-rank entry's optional stateful objects, by name, that have state_dict/load_state_dict."""
    return tuple(
        (name, obj) for name, obj in (("scheduler", scheduler), ("sampler", sampler)) if _has_state(obj)
    )


def _train_state(model: Any, optimizer: Any) -> dict[str, Any]:
    if model is not None and optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        return {"model": msd, "optim": osd}
    if model is not None:
        return {"model": get_model_state_dict(model)}
    return {}


def save(
    path: Path,
    *,
    rank: int,
    group: Any = None,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    sampler: Any = None,
    threadlet_state: Mapping[str, Any],
) -> None:
    """Save a checkpoint collectively: every rank of `group` calls this at the same step.

    Args:
        path: the checkpoint directory (created).
        rank: this rank, naming its per-rank entry.
        group: the process group DCP coordinates over (the threadlet's gloo group).
        model, optimizer: saved through DCP's state-dict helpers.
        scheduler, sampler: anything with state_dict/load_state_dict (or None).
        threadlet_state: plain values identical on every rank (step, branch, knobs, ...).
    """
    path.mkdir(parents=True, exist_ok=True)
    per_rank: dict[str, Any] = {"rng": capture_rng()}
    for name, obj in _per_rank_objects(scheduler, sampler):
        per_rank[name] = obj.state_dict()
    if optimizer is not None and model is None:
        per_rank["optim"] = optimizer.state_dict()
    state: dict[str, Any] = _train_state(model, optimizer)
    state[f"rank{rank}"] = pickle.dumps(per_rank)
    state["threadlet"] = dict(threadlet_state)
    _dcp(dcp_save, state, path, group)


def load(
    path: Path,
    *,
    rank: int,
    group: Any = None,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    sampler: Any = None,
    threadlet_keys: Mapping[str, Any],
) -> dict[str, Any]:
    """Load a checkpoint in place, collectively (every rank of `group` at the same step).

    Args:
        path: the checkpoint directory.
        rank: this rank; its own per-rank entry is read.
        group, model, optimizer, scheduler, sampler: as in `save`.
        threadlet_keys: the threadlet-state keys to read, each with a placeholder of its type.

    Returns:
        The saved threadlet state.

    Raises:
        FileNotFoundError: the directory does not exist.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist on rank {rank}")
    state: dict[str, Any] = _train_state(model, optimizer)
    key = f"rank{rank}"
    state[key] = b""
    state["threadlet"] = dict(threadlet_keys)
    _dcp(dcp_load, state, path, group)
    if model is not None and optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif model is not None:
        set_model_state_dict(model, state["model"])
    per_rank: dict[str, Any] = pickle.loads(state[key])  # our own file, written by `save`
    if "optim" in per_rank and optimizer is not None:
        optimizer.load_state_dict(per_rank["optim"])
    for name, obj in _per_rank_objects(scheduler, sampler):
        if name in per_rank:
            obj.load_state_dict(per_rank[name])
    restore_rng(per_rank["rng"])
    return dict(state["threadlet"])
