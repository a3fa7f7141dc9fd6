"""Replay files and schedule, checkpoint ids and paths: the pure parts of threadlet actions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threadlet import checkpoint, replay
from threadlet.replay import ReplayEntry, Schedule
from torchloom.messages import Action, ActionKind, SetConfig


def entry(seq: int, step: int, branch: str = "main", kind: str = "set") -> ReplayEntry:
    return ReplayEntry(
        seq=seq, step=step, branch=branch, kind=kind, values={"lr": 0.1} if kind == "set" else {}
    )


def test_schedule_hands_out_entries_at_their_position_in_seq_order() -> None:
    s = Schedule(
        [entry(3, 9, kind="rollback"), entry(1, 4), entry(2, 4, kind="checkpoint"), entry(4, 6, "b3")]
    )
    assert s.due("main", 3) == []
    assert [e.seq for e in s.due("main", 4)] == [1, 2]
    assert s.due("main", 4) == []  # popped once
    assert [e.seq for e in s.due("main", 9)] == [3]
    assert s.due("main", 6) == []  # same step on another branch is not the position
    assert [e.seq for e in s.due("b3", 6)] == [4]
    assert s.remaining == 0


def test_an_unreached_entry_holds_back_later_ones() -> None:
    s = Schedule([entry(1, 10), entry(2, 5)])
    assert s.due("main", 5) == []
    assert [e.seq for e in s.due("main", 10)] == [1]
    assert s.remaining == 1


def test_parse_types_values_and_builds_commands(tmp_path: Path) -> None:
    doc = {
        "job": "j",
        "commands": [
            {"seq": 2, "step": 7, "branch": "main", "kind": "rollback", "args": {"checkpoint": "ckpt-1"}},
            {
                "seq": 1,
                "step": 3,
                "branch": "main",
                "kind": "set",
                "values": {"lr": 0.5, "betas": [0.9, 0.95]},
            },
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    job, entries = replay.load(path)
    assert job == "j" and [e.seq for e in entries] == [1, 2]
    assert entries[0].values == {"lr": 0.5, "betas": (0.9, 0.95)}
    cmd = entries[0].command("j", "run9")
    assert (
        cmd.seq == 1
        and cmd.run_id == "run9"
        and cmd.body == SetConfig(values={"lr": 0.5, "betas": (0.9, 0.95)})
    )
    assert entries[1].command("j", "r").body == Action(
        kind=ActionKind.ROLLBACK, args={"checkpoint": "ckpt-1"}
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be an object with a 'commands' list"),
        (
            {"commands": [{"seq": 0, "step": 1, "branch": "main", "kind": "set"}]},
            "seq=0 must be an integer >= 1",
        ),
        (
            {"commands": [{"seq": 1, "step": -1, "branch": "main", "kind": "set"}]},
            "step=-1 must be an integer >= 0",
        ),
        ({"commands": [{"seq": 1, "step": 1, "branch": "", "kind": "set"}]}, "branch='' must be a non-empty"),
        (
            {"commands": [{"seq": 1, "step": 1, "branch": "main", "kind": "jump"}]},
            "kind='jump' must be one of",
        ),
        ({"commands": [{"seq": 1, "step": 1, "branch": "main", "kind": "set"}]}, "a set needs values"),
        (
            {"commands": [{"seq": 1, "step": 1, "branch": "main", "kind": "eval"}] * 2},
            "seq 1 appears twice",
        ),
    ],
)
def test_malformed_documents_name_the_problem(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        replay.parse(doc)
    assert message in str(info.value)


def test_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TORCHLOOM_REPLAY=.*cannot be read"):
        replay.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        replay.load(bad)


def test_checkpoint_ids_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert checkpoint.checkpoint_id(12) == "ckpt-12" and checkpoint.branch_id(5) == "b5"
    assert checkpoint.seq_of("ckpt-12") == 12
    for bad in ("ckpt-0", "ckpt-x", "b5", "before-spike"):
        with pytest.raises(ValueError, match="expected ckpt-<seq>"):
            checkpoint.seq_of(bad)
    with pytest.raises(ValueError, match="must be >= 1"):
        checkpoint.checkpoint_id(0)
    assert checkpoint.checkpoint_path(tmp_path, "job", "run", 3) == tmp_path / "job" / "run" / "ckpt-3"
    monkeypatch.delenv("TORCHLOOM_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("TORCHLOOM_HOME", str(tmp_path / "home"))
    assert checkpoint.default_root() == tmp_path / "home" / "checkpoints"
    monkeypatch.setenv("TORCHLOOM_CHECKPOINT_DIR", str(tmp_path / "ck"))
    assert checkpoint.default_root() == tmp_path / "ck"
    assert checkpoint.default_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
