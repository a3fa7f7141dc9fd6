"""Consistent checkpoints of one rank's training with torch.distributed.checkpoint: save and in-place
load of model, optimizer, scheduler, sampler, data loader, RNG and threadlet state. Ids come from
torchloom.naming and paths from torchloom.layout (docs/design.md, "Actions").

Model and optimizer go through `get_state_dict`/`set_state_dict` (DDP and FSDP aware); everything
that differs per rank (RNG, sampler, loader, scheduler) is one entry per rank, since DCP keeps a single copy
of identical keys across ranks: a JSON document under `rank<R>` whose tensors (and numpy arrays) are
separate DCP tensors `rank<R>_t<i>`. Nothing here pickles; DCP's own non-tensor items are read with
`torch.load(weights_only=True)` (`_SafeLoadPlanner`). Checkpoints are only ever read from under the
rank's own checkpoint root (docs/security.md, "No code from data").
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchloom.errors import TorchloomError


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


# ---- per-rank entries: JSON plus tensors, never pickle ----------------------------------------

_TAG = "__torchloom__"  # marks an encoded non-JSON value: {"__torchloom__": kind, ...}


class _Encoder:
    """Turns a per-rank state (tensors, numpy arrays, numbers, strings, None, lists, tuples, dicts)
    into a JSON document and a list of tensors it refers to by index."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def _tensor(self, kind: str, t: torch.Tensor) -> dict[str, Any]:
        self.tensors.append(t.detach().cpu().contiguous())
        return {_TAG: kind, "i": len(self.tensors) - 1}

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        if isinstance(obj, torch.Tensor):
            return self._tensor("tensor", obj)
        if isinstance(obj, np.ndarray):
            return self._tensor("ndarray", torch.from_numpy(np.ascontiguousarray(obj)))
        if isinstance(obj, np.generic):
            return self.encode(obj.item())
        if isinstance(obj, tuple):
            return {_TAG: "tuple", "v": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj) and _TAG not in obj:
                return {k: self.encode(v) for k, v in obj.items()}
            return {_TAG: "items", "v": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        raise TypeError(
            f"cannot checkpoint a {type(obj).__name__} in per-rank state: expected tensors, numpy arrays, "
            "numbers, strings, None, lists, tuples or dicts of them"
        )


def _decode(obj: Any, tensors: Mapping[int, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(_TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if kind == "tensor":
        return tensors[obj["i"]]
    if kind == "ndarray":
        return tensors[obj["i"]].numpy()
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in obj["v"])
    if kind == "items":
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["v"]}
    raise ValueError(f"per-rank checkpoint entry has an unknown encoded kind {kind!r}")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def _entry_key(rank: int) -> str:
    return f"rank{rank}"


def _tensor_key(rank: int, i: int) -> str:
    return f"rank{rank}_t{i}"


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor items are read with weights_only=True
    (the default planner unpickles them with weights_only=False)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _tensor_placeholders(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """Empty tensors of the right shape and dtype for `rank`'s per-rank tensors, from DCP metadata."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"rank{rank}_t"
    out: dict[str, torch.Tensor] = {}
    for key, item in meta.items():
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            props = getattr(item, "properties", None)
            size = getattr(item, "size", None)
            if props is None or size is None:
                raise ValueError(f"checkpoint {path}: per-rank item {key} is not a tensor")
            out[key] = torch.empty(size, dtype=props.dtype)
    return out


class CheckpointError(TorchloomError, RuntimeError):
    """A DCP save or load failed (unreadable, incomplete or refused content)."""


def _has_state(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")


def _dcp(op: Callable[..., Any], state: dict[str, Any], path: Path, group: Any) -> None:
    """Run DCP's save or load over `group` (or without dist when it is not initialized)."""
    kwargs: dict[str, Any] = {"process_group": group}
    if not (dist.is_available() and dist.is_initialized()):
        kwargs = {"no_dist": True}
    if op is dcp_load:
        kwargs["planner"] = _SafeLoadPlanner()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process" without dist
            op(state, checkpoint_id=str(path), **kwargs)
    except CheckpointException as exc:
        # DCP's error is a BaseException; as such it would end the training thread instead of being
        # reported as a failed command.
        what = "save" if op is dcp_save else "load"
        raise CheckpointError(f"checkpoint {what} of {path} failed: {_first_line(exc)}") from None


def _first_line(exc: CheckpointException) -> str:
    """The innermost error of each failed rank, e.g. "rank 0: UnpicklingError: Weights only load failed"."""
    parts = []
    for rank, failure in sorted(exc.failures.items()):
        inner = failure[0]
        text = str(inner).strip().splitlines()
        parts.append(f"rank {rank}: {type(inner).__name__}: {text[0] if text else ''}")
    return "; ".join(parts) or str(exc)


def _per_rank_objects(scheduler: Any, sampler: Any, loader: Any) -> tuple[tuple[str, Any], ...]:
    """The per-rank entry's optional stateful objects, by name, that have state_dict/load_state_dict."""
    named = (("scheduler", scheduler), ("sampler", sampler), ("loader", loader))
    return tuple((name, obj) for name, obj in named if _has_state(obj))


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
    loader: Any = None,
    threadlet_state: Mapping[str, Any],
) -> None:
    """Save a checkpoint collectively: every rank of `group` calls this at the same step.

    Args:
        path: the checkpoint directory (created).
        rank: this rank, naming its per-rank entry.
        group: the process group DCP coordinates over (the threadlet's gloo group).
        model, optimizer: saved through DCP's state-dict helpers.
        scheduler, sampler, loader: anything with state_dict/load_state_dict (or None); the loader
            is a threadlet.loader.LoaderState.
        threadlet_state: plain values identical on every rank (step, branch, knobs, ...).
    """
    path.mkdir(parents=True, exist_ok=True)
    per_rank: dict[str, Any] = {"rng": capture_rng()}
    for name, obj in _per_rank_objects(scheduler, sampler, loader):
        per_rank[name] = obj.state_dict()
    # An optimizer that has not stepped yet (a checkpoint at step 0) goes into the per-rank entry as
    # it is: DCP's helpers would first take a zero-gradient step to create its state, which moves
    # Adam's step count (its first real update then is 0.74 x lr) and AdamW's weights, so the run
    # would not be the one it is without the checkpoint.
    unstepped = optimizer is not None and not getattr(optimizer, "state", True)
    if optimizer is not None and (model is None or unstepped):
        per_rank["optim"] = optimizer.state_dict()
    state: dict[str, Any] = _train_state(model, None if unstepped else optimizer)
    encoder = _Encoder()
    state[_entry_key(rank)] = json.dumps(encoder.encode(per_rank))
    for i, tensor in enumerate(encoder.tensors):
        state[_tensor_key(rank, i)] = tensor
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
    loader: Any = None,
    threadlet_keys: Mapping[str, Any],
) -> dict[str, Any]:
    """Load a checkpoint in place, collectively (every rank of `group` at the same step).

    Args:
        path: the checkpoint directory.
        rank: this rank; its own per-rank entry is read.
        group, model, optimizer, scheduler, sampler, loader: as in `save`.
        threadlet_keys: the threadlet-state keys to read, each with a placeholder of its type.

    Returns:
        The saved threadlet state.

    Raises:
        FileNotFoundError: the directory does not exist.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist on rank {rank}")
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # An optimizer saved before its first step is in the per-rank entry (see `save`).
    optimizer_by_dcp = optimizer if any(k.startswith("optim.") for k in meta) else None
    state: dict[str, Any] = _train_state(model, optimizer_by_dcp)
    key = _entry_key(rank)
    state[key] = ""
    tensors = _tensor_placeholders(path, rank)
    state.update(tensors)
    state["threadlet"] = dict(threadlet_keys)
    _dcp(dcp_load, state, path, group)
    if model is not None and optimizer_by_dcp is not None:
        set_state_dict(
            model, optimizer_by_dcp, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    elif model is not None:
        set_model_state_dict(model, state["model"])
    by_index = {int(k.rsplit("_t", 1)[1]): state[k] for k in tensors}
    per_rank: dict[str, Any] = _decode(json.loads(state[key]), by_index)
    if "optim" in per_rank and optimizer is not None:
        optimizer.load_state_dict(per_rank["optim"])
    for name, obj in _per_rank_objects(scheduler, sampler, loader):
        if name in per_rank:
            obj.load_state_dict(per_rank[name])
    restore_rng(per_rank["rng"])
    return dict(state["threadlet"])
