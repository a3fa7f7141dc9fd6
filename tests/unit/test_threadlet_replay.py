"""Replay files and the threadlet's replay schedule: the pure parts of replay mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threadlet.replay import Schedule
from torchloom import replay_file
from torchloom.messages import Action, ActionKind, SetConfig
from torchloom.replay_file import ReplayEntry


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
    job, entries = replay_file.load(path)
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
        replay_file.parse(doc)
    assert message in str(info.value)


def test_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TORCHLOOM_REPLAY=.*cannot be read"):
        replay_file.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        replay_file.load(bad)
