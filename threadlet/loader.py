"""A data loader checkpointed with the job: `attach(loader=...)` wraps a torchdata `StatefulDataLoader`
(or anything with state_dict/load_state_dict) in `LoaderState`, whose per-rank state rides along
checkpoints, rollbacks and resumes, and is resharded by global position when the world size changes
(docs/design.md, "Data order and resharding").

A loader's state is per rank. With the same world size every rank gets its own state back, exactly.
With a `DistributedSampler` the epoch is one permutation that rank r of W reads at positions r, r+W,
r+2W, ...; ranks that drew in lockstep have consumed the global prefix [0, P) of it. On another world
size the old states mean nothing to the new shards, so the new ranks skip exactly the positions below
P of their own shards (torchdata's `StatefulDistributedSampler` can start a shard anywhere): nothing
is skipped or repeated. A plain `DistributedSampler` cannot start mid-shard: the epoch restarts and
the P samples already seen are seen again (a warning says how many). A loader whose sampler is not
sharded by rank gets the saved state of the rank it loads (its own, else rank 0's).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger("threadlet")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reshard:
    """What a restore on another world size did to the data order of one rank.

    Attributes:
        old_world_size, new_world_size: the world sizes of the save and of this restore.
        epoch: the epoch being continued.
        position: global samples of the epoch consumed before the save (P).
        skip: samples of this rank's new shard skipped as already seen.
        repeated: samples of the epoch that will be seen a second time (0 when resharded exactly).
    """

    old_world_size: int
    new_world_size: int
    epoch: int | None
    position: int
    skip: int
    repeated: int

    @property
    def exact(self) -> bool:
        return self.repeated == 0


def batches_yielded(state: Mapping[str, Any]) -> int:
    """Batches a StatefulDataLoader has yielded in its current epoch, from its `state_dict()`
    (torchdata keeps `_num_yielded` without workers, a snapshot step plus the steps since with them).

    Raises:
        ValueError: a state of neither form.
    """
    if "_num_yielded" in state:
        return int(state["_num_yielded"])
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping) and "_snapshot_step" in snapshot:
        return int(snapshot["_snapshot_step"]) + int(state.get("_steps_since_snapshot", 0))
    raise ValueError(
        "loader state rejected: expected a torchdata StatefulDataLoader state (with _num_yielded, "
        f"or _snapshot._snapshot_step), got keys {sorted(state)}"
    )


def shard_skip(position: int, rank: int, world_size: int) -> int:
    """How many samples of rank `rank`'s shard lie in the global prefix [0, position): rank r of W
    reads positions r, r+W, ..., so those are the ones below `position`."""
    return max(0, math.ceil((position - rank) / world_size))


def _dataset_len(sampler: DistributedSampler[Any]) -> int:
    return len(sampler.dataset)  # type: ignore[arg-type]  # a DistributedSampler's dataset is Sized


def _world(loader: Any) -> tuple[int, int]:
    """(rank, world size) of a loader: its DistributedSampler's, else torch.distributed's."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler.rank, sampler.num_replicas
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LoaderState:
    """The checkpointed state of one rank's data loader (training thread only).

    The entry holds the loader's own `state_dict()` (JSON and tensors; never pickled, see
    threadlet/checkpoint.py), the sampler's epoch, the world size and the global position at which
    this rank's current epoch started. The loader applies a loaded state at its next `iter()`: a
    loop keeping an iterator across steps must take a new one after a rollback (`tl.branch` changed).
    With a DistributedSampler, call `sampler.set_epoch(e)` for each new epoch, as PyTorch asks.

    Args:
        loader: a `torchdata.stateful_dataloader.StatefulDataLoader` (or anything with
            state_dict/load_state_dict).
    """

    def __init__(self, loader: Any) -> None:
        if not (
            callable(getattr(loader, "state_dict", None))
            and callable(getattr(loader, "load_state_dict", None))
        ):
            raise ValueError(
                f"loader={type(loader).__name__} rejected: expected a stateful loader with state_dict() "
                "and load_state_dict(), e.g. torchdata.stateful_dataloader.StatefulDataLoader"
            )
        self.loader = loader
        self.rank, self.world_size = _world(loader)
        # The global position at which the current epoch's iteration began on every rank (not 0
        # only after a reshard), and the epoch it belongs to.
        self._start = 0
        self._start_epoch: int | None = None
        self.last_reshard: Reshard | None = None

    @property
    def _sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    def _epoch(self) -> int | None:
        epoch = getattr(self._sampler, "epoch", None)
        return int(epoch) if isinstance(epoch, int) else None

    def state_dict(self) -> dict[str, Any]:
        epoch = self._epoch()
        state = self.loader.state_dict()
        sampler = self._sampler
        out: dict[str, Any] = {
            "loader": state,
            "epoch": epoch,
            "world_size": self.world_size,
            "start": self._start if epoch == self._start_epoch else 0,
            "position": None,
        }
        batch_size = getattr(self.loader, "batch_size", None)
        if isinstance(sampler, DistributedSampler) and isinstance(batch_size, int):
            if state.get("_iterator_finished"):
                out["position"] = sampler.total_size
            else:
                consumed = out["start"] + self.world_size * batches_yielded(state) * batch_size
                out["position"] = min(consumed, sampler.total_size)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`: exactly when it was saved on this world size, else resharded
        by global position (see the module docstring)."""
        old_world = int(state["world_size"])
        epoch = state["epoch"]
        sampler = self._sampler
        if epoch is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(int(epoch))
        if old_world == self.world_size or not isinstance(sampler, DistributedSampler):
            self.loader.load_state_dict(dict(state["loader"]))
            self._start, self._start_epoch = int(state["start"]), epoch
            self.last_reshard = None
            return
        position = int(state["position"]) if state["position"] is not None else 0
        start_at = getattr(sampler, "load_state_dict", None)  # torchdata's StatefulDistributedSampler
        if callable(start_at):
            # Past the dataset's real samples the old epoch was done: so are the new shards.
            done = position >= _dataset_len(sampler)
            skip = sampler.num_samples if done else shard_skip(position, self.rank, self.world_size)
            skip = min(skip, sampler.num_samples)
            start_at({"yielded": skip})
            self._start, self._start_epoch = position, epoch
            repeated = 0
        else:
            skip, repeated = 0, min(position, _dataset_len(sampler))
            self._start, self._start_epoch = 0, epoch
        self.last_reshard = Reshard(
            old_world_size=old_world,
            new_world_size=self.world_size,
            epoch=epoch,
            position=position,
            skip=skip,
            repeated=repeated,
        )
        if callable(start_at):
            log.info(
                "threadlet: data loader resharded from %d to %d ranks in epoch %s at global sample %d: "
                "rank %d skips the %d samples of its shard already seen; nothing skipped or repeated",
                old_world, self.world_size, epoch, position, self.rank, skip,
            )  # fmt: skip
        else:
            log.warning(
                "threadlet: data loader not resharded from %d to %d ranks: its %s cannot start mid-shard "
                "(use torchdata's StatefulDistributedSampler); epoch %s restarts and its %d samples "
                "already seen are seen again",
                old_world, self.world_size, type(sampler).__name__, epoch, repeated,
            )  # fmt: skip
