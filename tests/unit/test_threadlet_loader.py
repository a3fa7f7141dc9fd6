"""threadlet.loader: a torchdata StatefulDataLoader checkpointed with the job (JSON + DCP, no pickle),
restored exactly on the same world size, resharded by global position on another (2->1, 1->2, 4->3,
3->4): every sample of the epoch seen once, none skipped or repeated; a plain DistributedSampler
restarts the epoch and says how many samples are seen again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from threadlet import checkpoint
from threadlet.loader import LoaderState, Reshard, batches_yielded, shard_skip

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = stateful_dataloader.StatefulDataLoader
StatefulDistributedSampler = pytest.importorskip(
    "torchdata.stateful_dataloader.sampler"
).StatefulDistributedSampler

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

N = 48  # divisible by 1, 2, 3 and 4: no DistributedSampler padding in these tests
BATCH = 4


def loader(rank: int, world: int, *, stateful: bool = True, epoch: int = 0) -> Any:
    kind = StatefulDistributedSampler if stateful else DistributedSampler
    sampler = kind(list(range(N)), num_replicas=world, rank=rank, shuffle=True, seed=5)
    sampler.set_epoch(epoch)
    return StatefulDataLoader(list(range(N)), batch_size=BATCH, sampler=sampler)


def _lockstep(states: list[LoaderState], batches: int | None) -> list[int]:
    """Draw `batches` batches (None: to the end of the epoch) on every rank in turn."""
    iters = [iter(s.loader) for s in states]
    seen: list[int] = []
    step = 0
    while batches is None or step < batches:
        drawn = [next(it, None) for it in iters]
        if all(b is None for b in drawn):
            break
        for b in drawn:
            if b is not None:
                seen.extend(b.tolist())
        step += 1
    return seen


def _restart(saved: list[dict[str, Any]], new_world: int, *, stateful: bool = True) -> list[LoaderState]:
    """New ranks restore from the checkpoint: their own entry when it has one, else rank 0's
    (threadlet.resume.per_rank_source); every state goes through JSON, as in a checkpoint."""
    out = []
    for r in range(new_world):
        s = LoaderState(loader(r, new_world, stateful=stateful))
        s.load_state_dict(json.loads(json.dumps(saved[r] if r < len(saved) else saved[0])))
        out.append(s)
    return out


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (4, 3), (3, 4), (2, 2)])
@pytest.mark.parametrize("before", [1, 3])
def test_reshard_sees_every_sample_of_the_epoch_once(old: int, new: int, before: int) -> None:
    ranks = [LoaderState(loader(r, old)) for r in range(old)]
    seen_before = _lockstep(ranks, before)
    saved = [s.state_dict() for s in ranks]
    assert {s["position"] for s in saved} == {old * before * BATCH}
    restarted = _restart(saved, new)
    seen_after = _lockstep(restarted, None)
    # The union of the samples before and after is the whole epoch, none twice.
    assert sorted(seen_before + seen_after) == list(range(N))
    if old != new:
        reshard = restarted[0].last_reshard
        assert reshard is not None and reshard.exact
        assert (reshard.old_world_size, reshard.new_world_size, reshard.position) == (
            old,
            new,
            old * before * 4,
        )
    else:
        assert restarted[0].last_reshard is None


def test_a_resharded_loader_checkpoints_its_global_position_again() -> None:
    ranks = [LoaderState(loader(r, 4)) for r in range(4)]
    first = _lockstep(ranks, 1)  # global position 16
    three = _restart([s.state_dict() for s in ranks], 3)
    second = _lockstep(three, 1)  # 12 more: 28
    saved = [s.state_dict() for s in three]
    assert {s["position"] for s in saved} == {28} and {s["start"] for s in saved} == {16}
    two = _restart(saved, 2)
    rest = _lockstep(two, None)
    assert sorted(first + second + rest) == list(range(N))


def test_global_order_of_an_unfaulted_run_is_kept() -> None:
    # 2 ranks one batch each per step, then 1 rank two batches per step (grad accumulation doubled):
    # the positions each optimizer step consumes are the same as without the fault.
    unfaulted = [LoaderState(loader(r, 2)) for r in range(2)]
    reference = _lockstep(unfaulted, None)
    ranks = [LoaderState(loader(r, 2)) for r in range(2)]
    before = _lockstep(ranks, 2)
    one = _restart([s.state_dict() for s in ranks], 1)
    after = _lockstep(one, None)
    assert sorted(before) == sorted(reference[:16])
    for step in range(len(after) // 8):  # optimizer step = 2 batches of 4 on 1 rank, 1 of 4 on 2 ranks
        assert sorted(after[step * 8 : step * 8 + 8]) == sorted(reference[16 + step * 8 : 24 + step * 8])


def test_same_world_size_restores_each_rank_exactly_through_a_checkpoint(tmp_path: Path) -> None:
    state = LoaderState(loader(1, 2, epoch=3))
    it = iter(state.loader)
    next(it)
    next(it)
    checkpoint.save(tmp_path / "c", rank=1, loader=state, threadlet_state={"step": 2})
    expected = [next(it).tolist() for _ in range(3)]
    fresh = LoaderState(loader(1, 2, epoch=0))
    checkpoint.load(tmp_path / "c", rank=1, loader=fresh, threadlet_keys={"step": 0})
    assert fresh.loader.sampler.epoch == 3
    again = iter(fresh.loader)
    assert [next(again).tolist() for _ in range(3)] == expected
    # Rolled back in place: the loader applies the loaded state at its next iter().
    checkpoint.load(tmp_path / "c", rank=1, loader=state, threadlet_keys={"step": 0})
    again = iter(state.loader)
    assert [next(again).tolist() for _ in range(3)] == expected


def test_a_plain_distributed_sampler_restarts_the_epoch_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    ranks = [LoaderState(loader(r, 2, stateful=False)) for r in range(2)]
    _lockstep(ranks, 2)
    with caplog.at_level(logging.WARNING, logger="threadlet"):
        one = _restart([s.state_dict() for s in ranks], 1, stateful=False)
    assert one[0].last_reshard == Reshard(
        old_world_size=2, new_world_size=1, epoch=0, position=16, skip=0, repeated=16
    )
    assert "not resharded from 2 to 1 ranks: its DistributedSampler cannot start mid-shard" in caplog.text
    assert "its 16 samples already seen are seen again" in caplog.text
    assert sorted(_lockstep(one, None)) == list(range(N))  # the whole epoch again


def test_a_finished_epoch_stays_finished_on_another_world_size() -> None:
    ranks = [LoaderState(loader(r, 2)) for r in range(2)]
    _lockstep(ranks, None)
    saved = [s.state_dict() for s in ranks]
    assert {s["position"] for s in saved} == {N}
    assert _lockstep(_restart(saved, 3), None) == []


def test_shard_skip_and_batches_yielded() -> None:
    # Position 10 on 3 ranks: rank 0 saw 0,3,6,9; rank 1 saw 1,4,7; rank 2 saw 2,5,8.
    assert [shard_skip(10, r, 3) for r in range(3)] == [4, 3, 3]
    assert shard_skip(0, 2, 3) == 0
    assert batches_yielded({"_num_yielded": 5}) == 5
    # The shape torchdata 0.11 gives with workers: a snapshot step plus the steps since.
    assert batches_yielded({"_snapshot": {"_snapshot_step": 4}, "_steps_since_snapshot": 2}) == 6
    with pytest.raises(ValueError, match="expected a torchdata StatefulDataLoader state"):
        batches_yielded({"yielded": 3})


def test_a_loader_without_state_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a stateful loader with state_dict"):
        LoaderState(torch.utils.data.DataLoader(list(range(4))))
