"""MixtureSampler: a global sample order (independent of the world size), state round trip, resharding
to another world size, mix parsing, knobs, add_source."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import threadlet
from threadlet.data import MixtureSampler, parse_mix
from threadlet.optim_knobs import KnobBoard
from torchloom.errors import CommandRejected
from torchloom.messages import KnobSpec, KnobType


def sampler(**kw: Any) -> MixtureSampler:
    args: dict[str, Any] = {
        "sources": {"code": 100, "math": list(range(30)), "web": 1000},
        "weights": {"code": 1, "math": 1, "web": 2},
        "batch_size": 16,
        "seed": 7,
    }
    args.update(kw)
    return MixtureSampler(**args)


def test_same_seed_step_rank_same_batches_and_ranks_differ() -> None:
    a, b = sampler(), sampler()
    first = [a.next_batch() for _ in range(5)]
    assert first == [b.next_batch() for _ in range(5)]
    assert len(first[0]) == 16 and len(set(map(tuple, first))) == 5
    other_rank = sampler(rank=1, world_size=2)
    assert other_rank.next_batch() != sampler(rank=0, world_size=2).next_batch()
    lengths = a.lengths()
    assert all(0 <= i < lengths[name] for batch in first for name, i in batch)


def test_ranks_take_disjoint_slices_of_one_global_order() -> None:
    world = [sampler(rank=r, world_size=3, batch_size=4) for r in range(3)]
    drawn = [[s.next_batch() for s in world] for _ in range(5)]
    flat = [x for step in drawn for batch in step for x in batch]
    assert flat == sampler().samples(0, 60)
    assert {s.position for s in world} == {60}
    # The order does not depend on the world size: one rank drawing 12 at a time sees the same.
    alone = sampler(batch_size=12)
    assert [x for _ in range(5) for x in alone.next_batch()] == flat


def _global_run(
    worlds: list[tuple[int, int]], mix_at: int | None = None, batch_size: int = 4
) -> tuple[list[tuple[str, int]], list[int]]:
    """Run the ranks of each (world size, draws) phase in lockstep; between phases every rank
    restores from a checkpoint: its own per-rank entry when it has one, else rank 0's (as
    threadlet.resume does). Returns the samples in global order and the positions of the phases."""
    seen: list[tuple[str, int]] = []
    saved: list[dict[str, Any]] = []
    positions = []
    draws_done = 0
    for world, draws in worlds:
        ranks = [sampler(rank=r, world_size=world, batch_size=batch_size) for r in range(world)]
        for r, s in enumerate(ranks):
            if saved:
                s.load_state_dict(saved[r] if r < len(saved) else saved[0])
        positions.append(ranks[0].position)
        for _ in range(draws):
            if draws_done == mix_at:
                for s in ranks:
                    s.set_mix("code:1,math:0,web:0")
            draws_done += 1
            for s in ranks:  # rank order is global order within a step
                seen.extend(s.next_batch())
        saved = [s.state_dict() for s in ranks]
    return seen, positions


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (4, 3), (3, 4)])
@pytest.mark.parametrize("mix_at", [None, 3, 9])
def test_reshard_continues_the_global_order_with_nothing_skipped_or_repeated(
    old: int, new: int, mix_at: int | None
) -> None:
    # `old` ranks draw 6 batches each, then the job restarts on `new` ranks, which draw 5 more; a
    # mix change at draw `mix_at` (before or after the restart) applies to every rank.
    faulted, positions = _global_run([(old, 6), (new, 5)], mix_at=mix_at)
    total = old * 6 * 4 + new * 5 * 4
    assert positions == [0, old * 24] and len(faulted) == total
    unfaulted = sampler()  # one rank drawing the whole global order: what any world size sees
    if mix_at is not None:
        at = mix_at * old * 4 if mix_at <= 6 else 6 * old * 4 + (mix_at - 6) * new * 4
        unfaulted.position = at
        unfaulted.set_mix("code:1,math:0,web:0")
    # The same samples in the same order: nothing skipped or repeated across the restart.
    assert faulted == unfaulted.samples(0, total)
    if mix_at is None:
        same_world, _ = _global_run([(old, total // (old * 4))])
        assert faulted[: len(same_world)] == same_world
    elif mix_at == 3:
        assert {name for name, _ in faulted[3 * old * 4 :]} == {"code"}


def test_reshard_of_a_rollback_state_and_history() -> None:
    s = sampler(rank=1, world_size=2)
    s.next_batch()
    s.set_mix("web:1")
    s.set_batch_size(8)
    saved = s.state_dict()
    assert saved["world_size"] == 2 and saved["position"] == 32 and saved["batches"] == 1
    assert [h["why"] for h in saved["history"]] == ["start", "mix", "batch_size"]
    assert saved["segments"] == [
        [0, {"code": 0.25, "math": 0.25, "web": 0.5}],
        [32, {"code": 0.0, "math": 0.0, "web": 1.0}],
    ]
    one = sampler()
    one.load_state_dict(saved)
    assert one.world_size == 1 and one.rank == 0 and one.batch_size == 8
    assert one.next_batch() == s.samples(32, 40)
    assert one.history[-1] | {"weights": None} == {
        "position": 32,
        "why": "reshard",
        "weights": None,
        "batch_size": 8,
        "world_size": 1,
    }
    assert one.samples(0, 32) == sampler().samples(0, 32)
    with pytest.raises(ValueError, match="no global 'position'"):
        one.load_state_dict({k: v for k, v in saved.items() if k != "position"})


def test_fractions_follow_weights() -> None:
    s = sampler(batch_size=4000)
    counts = Counter(name for name, _ in s.next_batch())
    assert counts["web"] / 4000 == pytest.approx(0.5, abs=0.04)
    assert counts["code"] / 4000 == pytest.approx(0.25, abs=0.04)
    s.set_mix("code:0,math:3,web:1")
    counts = Counter(name for name, _ in s.next_batch())
    assert counts["code"] == 0
    assert counts["math"] / 4000 == pytest.approx(0.75, abs=0.04)
    assert s.weights == {"code": 0.0, "math": 0.75, "web": 0.25}
    assert s.get_mix() == "code:0,math:0.75,web:0.25"


def test_state_round_trip_reproduces_batches_after_rollback() -> None:
    s = sampler()
    for _ in range(3):
        s.next_batch()
    saved = s.state_dict()
    expected = [s.next_batch() for _ in range(4)]
    s.set_mix("web:1")
    s.set_batch_size(3)
    s.next_batch()
    s.load_state_dict(saved)
    assert [s.next_batch() for _ in range(4)] == expected
    fresh = sampler()
    fresh.load_state_dict(saved)
    assert fresh.next_batch() == expected[0]
    with pytest.raises(ValueError, match="seed=7 but this sampler has 8"):
        sampler(seed=8).load_state_dict(saved)
    with pytest.raises(ValueError, match="source 'code' has length 5, the state expects 100"):
        sampler(sources={"code": 5, "math": 30, "web": 1000}).load_state_dict(saved)


KNOWN = ("code", "math", "web")
FORM = "expected NAME:WEIGHT,... with weights >= 0, e.g. code:0.5,math:0.5; known sources: code, math, web"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("code:x", f"mix='code:x' rejected: {FORM}"),
        ("code", f"mix='code' rejected: {FORM}"),
        ("", f"mix='' rejected: {FORM}"),
        ("code:-1", f"mix='code:-1' rejected: weight of 'code' must be a finite number >= 0; {FORM}"),
        ("code:nan", "weight of 'code' must be a finite number >= 0"),
        ("art:1", f"mix='art:1' rejected: unknown source 'art'; {FORM}"),
        ("code:1,code:2", "source 'code' appears twice"),
        ("code:0,math:0", f"mix='code:0,math:0' rejected: at least one weight must be > 0; {FORM}"),
    ],
)
def test_mix_parse_errors_name_the_form_and_known_sources(text: str, message: str) -> None:
    with pytest.raises(CommandRejected) as info:
        parse_mix(text, KNOWN)
    assert message == info.value.reason or message in info.value.reason
    assert info.value.key == "mix"


def test_mix_parse_normalizes_and_fills_zeros() -> None:
    assert parse_mix(" code : 1 , web:3", KNOWN) == {"code": 0.25, "math": 0.0, "web": 0.75}


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size=0 rejected: must be in"):
        sampler(batch_size=0)
    with pytest.raises(ValueError, match="unknown source 'art'"):
        sampler(weights={"art": 1})
    with pytest.raises(ValueError, match="length 0 must be >= 1"):
        sampler(sources={"code": 0})
    with pytest.raises(ValueError, match=r"rank=2 rejected: must be in \[0, world_size=2\)"):
        sampler(rank=2, world_size=2)


def test_add_source_from_pt_tensor_list_and_loader(tmp_path: Path) -> None:
    s = sampler()
    torch.save(torch.arange(12).reshape(6, 2), tmp_path / "rows.pt")
    torch.save([torch.zeros(3), torch.ones(2)], tmp_path / "list.pt")
    torch.save({"not": "samples"}, tmp_path / "dict.pt")
    assert s.add_source("rows", tmp_path / "rows.pt") == 6
    assert s.add_source("lst", tmp_path / "list.pt") == 2
    assert s.add_source("custom", "anything", loader=lambda p: list(range(9))) == 9
    assert s.weights["rows"] == 0.0 and "rows" in s.known
    assert all(name not in {"rows", "lst", "custom"} for name, _ in s.next_batch())
    s.set_mix("rows:1")
    batch = s.next_batch()
    assert {name for name, _ in batch} == {"rows"} and all(0 <= i < 6 for _, i in batch)
    assert torch.equal(s.dataset("rows")[batch[0][1]], torch.arange(12).reshape(6, 2)[batch[0][1]])
    with pytest.raises(ValueError, match="already exists"):
        s.add_source("rows", tmp_path / "rows.pt")
    with pytest.raises(ValueError, match=r"expected \[A-Za-z0-9_.-\]\{1,64\}"):
        s.add_source("bad name", tmp_path / "rows.pt")
    with pytest.raises(ValueError, match=r"expected a tensor .* or a list of tensors, got dict"):
        s.add_source("d", tmp_path / "dict.pt")
    with pytest.raises(OSError):
        s.add_source("missing", tmp_path / "missing.pt")
    # A restore into a sampler that never saw the added source loads it from its recorded path.
    saved = s.state_dict()
    expected = s.next_batch()
    other = sampler()
    other.add_source("custom", "anything", loader=lambda p: list(range(9)))
    other.load_state_dict(saved)  # rows and lst come back from their .pt paths
    assert other.known == ("code", "math", "web", "custom", "rows", "lst")
    assert other.next_batch() == expected


def test_knobs_on_a_board_refuse_a_bad_mix_before_anything_changes() -> None:
    s = sampler()
    board = KnobBoard()
    for d in s.knob_definitions():
        d = dict(d)
        name, kind = d.pop("name"), d.pop("type")
        board.register(
            KnobSpec(name=name, type=kind, min=d.get("min"), max=d.get("max")),
            get=d["get"],
            apply=d["apply"],
            validate=d.get("validate"),
        )
    assert board.schema["mix"].type is KnobType.STR
    with pytest.raises(CommandRejected, match="known sources: code, math, web") as info:
        board.validate({"mix": "code:x", "batch_size": 4})
    assert info.value.key == "mix"
    with pytest.raises(CommandRejected, match=r"must be in \[1, 65536\]"):
        board.validate({"batch_size": 0})
    before = s.weights
    with pytest.raises(CommandRejected):
        board.apply({"batch_size": 4, "mix": "code:x"})
    assert s.batch_size == 16 and s.weights == before
    board.apply(board.validate({"mix": "math:1", "batch_size": "4"}))
    assert s.batch_size == 4 and {n for n, _ in s.next_batch()} == {"math"}
    assert {k.name: k.value for k in board.specs()} == {"batch_size": 4, "mix": "code:0,math:1,web:0"}


def test_register_knobs_on_a_threadlet() -> None:
    tl = threadlet.attach(config=threadlet.ThreadletConfig())
    try:
        s = sampler()
        s.register_knobs(tl)
        assert set(tl._board.schema) == {"mix", "batch_size"}
    finally:
        tl.close()
