"""Unit tests of the interactive-training CLI shapes: knobs, checkpoints, branches, devices, journal
entries, action outcomes with details, and the journal -> replay conversion."""

from __future__ import annotations

import json
from typing import Any

import pytest

from torchloom.app import format as cli_format
from torchloom.app import submit_cmd
from torchloom.messages import (
    AckStatus,
    Action,
    ActionKind,
    BranchInfo,
    CheckpointInfo,
    Command,
    DeviceHealth,
    Issuer,
    JobEvent,
    JobStatus,
    KnobSpec,
    KnobType,
    Outcome,
    OutcomeStatus,
    RankResult,
    RankStatus,
    SetConfig,
    StatusReply,
    StepMetrics,
)


def _job(**kw: Any) -> JobStatus:
    return JobStatus(job="demo", run_id="r1", world_size=2, **kw)


def test_knobs_json_shape_with_bounds_and_groups() -> None:
    job = _job(
        knobs=(
            KnobSpec(name="wd", type=KnobType.FLOAT, min=0.0, max=1.0, value=0.01, groups=("body", "head")),
            KnobSpec(
                name="lr",
                type=KnobType.FLOAT,
                min=0.0,
                max=10.0,
                min_exclusive=True,
                value=1e-3,
                description="learning rate",
            ),
        )
    )
    got = cli_format.knobs_json(job)
    assert [k["name"] for k in got["knobs"]] == ["lr", "wd"]
    assert got["knobs"][0] == {
        "name": "lr",
        "type": "float",
        "min": 0.0,
        "max": 10.0,
        "min_exclusive": True,
        "max_exclusive": False,
        "value": 1e-3,
        "description": "learning rate",
        "groups": [],
        "choices": [],
    }
    assert got["knobs"][1]["groups"] == ["body", "head"]
    json.dumps(got)
    text = cli_format.format_knobs(got)
    assert "(0, 10]" in text and "[0, 1]" in text and "body,head" in text


def test_checkpoints_json_sorted_by_seq_with_empty_tag_as_null() -> None:
    job = _job(
        checkpoints=(
            CheckpointInfo(id="ckpt-7", tag="", step=90, branch="b5", path="/c/7", created_at_s=2.0, seq=7),
            CheckpointInfo(
                id="ckpt-2", tag="warm", step=40, branch="main", path="/c/2", created_at_s=1.0, seq=2
            ),
        )
    )
    got = cli_format.checkpoints_json(job)
    assert got["checkpoints"] == [
        {"id": "ckpt-2", "tag": "warm", "step": 40, "branch": "main", "path": "/c/2", "time": 1.0, "seq": 2},
        {"id": "ckpt-7", "tag": None, "step": 90, "branch": "b5", "path": "/c/7", "time": 2.0, "seq": 7},
    ]
    assert "warm" in cli_format.format_checkpoints(got)
    assert "no checkpoints" in cli_format.format_checkpoints(cli_format.checkpoints_json(_job()))


def test_branches_tree_marks_current_and_nests_children() -> None:
    job = _job(
        branch="b9",
        branches=(
            BranchInfo(id="main"),
            BranchInfo(id="b5", parent="main", from_checkpoint="ckpt-2", fork_step=40, seq=5),
            BranchInfo(id="b9", parent="b5", from_checkpoint="ckpt-7", fork_step=90, seq=9),
        ),
    )
    got = cli_format.branches_json(job)
    assert got["current"] == "b9"
    assert got["branches"][1] == {
        "id": "b5",
        "parent": "main",
        "from_checkpoint": "ckpt-2",
        "fork_step": 40,
        "time": None,
        "seq": 5,
    }
    lines = cli_format.format_branches(got).splitlines()
    assert lines == [
        "  main",
        "    b5  (from ckpt-2 at step 40)",
        "*     b9  (from ckpt-7 at step 90)",
    ]


def test_branches_without_registry_still_show_current_main() -> None:
    got = cli_format.branches_json(_job())
    assert got == {"job": "demo", "branches": [], "current": "main"}
    assert cli_format.format_branches(got) == "* main"


def test_devices_json_has_state_reason_and_every_health_field() -> None:
    dev = DeviceHealth(
        kind="cuda", device="cuda:1", index=1, xids=(79,), healthy=False, unhealthy_reason="xid 79"
    )
    reply = StatusReply(
        jobs=(
            _job(
                ranks=(
                    RankStatus(
                        rank=1,
                        host="h",
                        pid=11,
                        local_rank=1,
                        device=dev,
                        health="unhealthy",
                        health_reason="xid 79",
                    ),
                    RankStatus(rank=0, host="h", pid=10, device=DeviceHealth(device="cpu")),
                )
            ),
        )
    )
    got = cli_format.devices_json(reply)
    rows = got["devices"]
    assert [(r["rank"], r["state"], r["device"]) for r in rows] == [
        (0, "healthy", "cpu"),
        (1, "unhealthy", "cuda:1"),
    ]
    assert rows[1]["reason"] == "xid 79" and rows[1]["local_rank"] == 1 and rows[1]["pid"] == 11
    assert set(rows[1]["health"]) == set(DeviceHealth.__dataclass_fields__)
    assert rows[1]["health"]["xids"] == [79]
    json.dumps(got)
    table = cli_format.format_devices(got).splitlines()
    assert table[1].startswith(" ") and table[2].startswith(cli_format.UNHEALTHY_MARK)
    assert table[2].endswith("xid 79")


def _applied(
    seq: int,
    run: str,
    body: Any,
    steps: dict[int, int],
    status: OutcomeStatus = OutcomeStatus.APPLIED,
    job: str = "demo",
    branch: str = "main",
) -> Outcome:
    cmd = Command(
        command_id=f"c{seq}",
        job=job,
        run_id=run,
        seq=seq,
        issuer=Issuer(kind="cli", identity="u@h"),
        issued_at_s=100.0 + seq,
        body=body,
    )
    ack = AckStatus.APPLIED if status is OutcomeStatus.APPLIED else AckStatus.REJECTED
    results = tuple(RankResult(rank=r, status=ack, step=s, branch=branch) for r, s in steps.items())
    return Outcome(command_id=f"c{seq}", job=job, status=status, results=results, command=cmd)


def test_journal_outcome_entry_shape() -> None:
    outcome = _applied(3, "r1", SetConfig(values={"lr": 0.5, "betas": (0.9, 0.99)}), {1: 40, 0: 40})
    got = cli_format.journal_entry_json(outcome)
    assert got == {
        "type": "outcome",
        "seq": 3,
        "command_id": "c3",
        "job": "demo",
        "run_id": "r1",
        "issuer": {"kind": "cli", "identity": "u@h"},
        "issued_at_s": 103.0,
        "kind": "set",
        "values": {"betas": [0.9, 0.99], "lr": 0.5},
        "args": {},
        "status": "applied",
        "reason": None,
        "results": [
            {"rank": 0, "status": "applied", "step": 40, "branch": "main", "reason": None, "detail": {}},
            {"rank": 1, "status": "applied", "step": 40, "branch": "main", "reason": None, "detail": {}},
        ],
    }
    assert "#3" in cli_format.format_journal_entry(got) and "at step 40" in cli_format.format_journal_entry(
        got
    )


def test_a_refused_attempt_shows_what_was_asked_and_no_seq() -> None:
    refused = Outcome(
        command_id="c9",
        job="demo",
        status=OutcomeStatus.REJECTED,
        reason="lr=-1 rejected: must be in (0, 10]",
        issuer=Issuer(kind="cli", identity="ann@host"),
        run_id="r1",
        attempted=SetConfig(values={"lr": -1.0}),
    )
    got = cli_format.journal_entry_json(refused)
    assert got is not None
    assert (got["seq"], got["kind"], got["values"], got["run_id"]) == (0, "set", {"lr": -1.0}, "r1")
    assert cli_format.format_journal_entry(got) == (
        "refused demo set lr=-1.0: rejected by cli:ann@host (lr=-1 rejected: must be in (0, 10])"
    )
    # An attempt whose body was too large to journal still reads as a refused command.
    bare = cli_format.journal_entry_json(Outcome(command_id="c8", job="demo", status=OutcomeStatus.REJECTED))
    assert bare is not None and cli_format.format_journal_entry(bare) == "refused demo command: rejected"


def test_journal_event_entry_and_metrics_skipped() -> None:
    ev = JobEvent(job="demo", kind="rank_dead", message="rank 1 dead", time_s=5.0, attrs={"rank": "1"})
    got = cli_format.journal_entry_json(ev)
    assert got is not None
    assert {k: got[k] for k in ("type", "kind", "message", "time_s", "attrs")} == {
        "type": "event",
        "kind": "rank_dead",
        "message": "rank 1 dead",
        "time_s": 5.0,
        "attrs": {"rank": "1"},
    }
    assert cli_format.journal_entry_json(StepMetrics(job="demo", run_id="r", rank=0, step=1)) is None


def test_action_outcome_json_carries_detail_per_rank() -> None:
    outcome = Outcome(
        command_id="c9",
        job="demo",
        status=OutcomeStatus.APPLIED,
        results=(
            RankResult(rank=0, status=AckStatus.APPLIED, step=12, detail={"eval.loss": "0.25"}),
            RankResult(rank=1, status=AckStatus.APPLIED, step=12),
        ),
    )
    got = submit_cmd.outcome_json(outcome)
    assert got["applied"] == [
        {"rank": 0, "step": 12, "detail": {"eval.loss": "0.25"}},
        {"rank": 1, "step": 12},
    ]
    assert "rank 0: eval.loss=0.25" in submit_cmd.format_outcome(outcome)


def _entries(*outcomes: Outcome) -> list[dict[str, Any]]:
    out = [cli_format.journal_entry_json(o) for o in outcomes]
    return [e for e in out if e is not None]


def test_replay_keeps_applied_commands_of_latest_run_in_seq_order() -> None:
    entries = _entries(
        _applied(1, "old", SetConfig(values={"lr": 0.1}), {0: 5, 1: 5}),
        _applied(2, "new", Action(kind=ActionKind.CHECKPOINT, args={"tag": "a"}), {0: 20, 1: 20}),
        _applied(4, "new", SetConfig(values={"lr": 0.2}), {1: 31, 0: 30}, branch="b3"),
        _applied(3, "new", SetConfig(values={"lr": -1.0}), {0: 25}, status=OutcomeStatus.REJECTED),
        _applied(5, "new", Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "a"}), {0: 40, 1: 40}),
    )
    entries.insert(1, {"type": "event", "kind": "x", "message": "", "time_s": 0.0, "attrs": {}})
    got = cli_format.replay_from_journal(entries)
    assert got == {
        "job": "demo",
        "commands": [
            {
                "seq": 2,
                "step": 20,
                "branch": "main",
                "kind": "checkpoint",
                "values": {},
                "args": {"tag": "a"},
            },
            {"seq": 4, "step": 30, "branch": "b3", "kind": "set", "values": {"lr": 0.2}, "args": {}},
            {
                "seq": 5,
                "step": 40,
                "branch": "main",
                "kind": "rollback",
                "values": {},
                "args": {"checkpoint": "a"},
            },
        ],
    }


def test_replay_round_trips_through_journal_json_text() -> None:
    entries = _entries(_applied(1, "r", SetConfig(values={"lr": 0.3}), {0: 7, 1: 7}))
    whole = json.dumps({"entries": entries})
    lines = "\n".join(json.dumps(e) for e in entries) + "\n"
    assert cli_format.parse_journal_text(whole) == cli_format.parse_journal_text(lines) == entries
    assert cli_format.replay_from_journal(cli_format.parse_journal_text(whole))["commands"][0]["step"] == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("not json\n", "line 1 is not JSON"), ('{"entries": [1]}', '"type"')],
)
def test_parse_journal_text_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cli_format.parse_journal_text(text)


def test_replay_needs_one_job_or_a_choice() -> None:
    entries = _entries(
        _applied(1, "r", SetConfig(values={"lr": 0.3}), {0: 7}, job="a"),
        _applied(1, "s", SetConfig(values={"lr": 0.4}), {0: 9}, job="b"),
    )
    with pytest.raises(ValueError, match="jobs: a, b"):
        cli_format.replay_from_journal(entries)
    assert cli_format.replay_from_journal(entries, "b")["commands"][0]["step"] == 9
    with pytest.raises(ValueError, match="no command of job 'c'"):
        cli_format.replay_from_journal(entries, "c")


def test_control_characters_from_the_bus_are_shown_escaped_not_sent_to_the_terminal() -> None:
    from torchloom.app import cli

    ev = JobEvent(job="demo", kind="refused", message="forged \x1b]0;pwned\x07 title\nnext", time_s=1.0)
    got = cli_format.journal_entry_json(ev)
    assert got is not None
    line = cli_format.format_journal_entry(got)
    assert line == "event   demo refused: forged \\x1b]0;pwned\\x07 title\\nnext"
    assert cli.format_watch_event(ev) == line and "é" in cli_format.printable("é")
