"""Tables for the weaver's checkpoint/branch/source registry, action validation and restart replay."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from tests.unit import factories
from tests.unit.factories import ack, command, heartbeat
from torchloom.errors import CommandRejected
from torchloom.messages import (
    AckStatus,
    Action,
    ActionKind,
    Command,
    Issuer,
    JobEvent,
    Outcome,
    OutcomeStatus,
    RankResult,
    SubmitRequest,
)
from weaver import liveness, outcomes, recovery, submits
from weaver import registry as rg
from weaver.health_policy import HealthPolicy
from weaver.model import WeaverState

DEAD = 1.0
POLICY = HealthPolicy(dead_after_s=DEAD)
CLI = Issuer(kind="cli", identity="me@host")


def running(*, allow: bool = False) -> WeaverState:
    return factories.running(fault_injection_allowed=allow, branch="main")


def submit(s: WeaverState, kind: ActionKind, **args: str) -> Command:
    return submits.plan_submit(s, SubmitRequest(body=Action(kind=kind, args=args)), 100.0, DEAD)


def ack_all(s: WeaverState, cmd: Command, detail: Mapping[str, str], *, step: int = 10) -> Outcome:
    out = None
    for rank in range(2):
        a = ack(
            cmd.seq,
            rank,
            command_id=cmd.command_id,
            step=step,
            detail=detail,
            branch=detail.get("branch", "main"),
        )
        out = outcomes.record_ack(s, a, 101.0)
    assert out is not None
    return out


def checkpoint(s: WeaverState, tag: str = "", step: int = 10) -> Outcome:
    cmd = submit(s, ActionKind.CHECKPOINT, **({"tag": tag} if tag else {}))
    cid = rg.checkpoint_id(cmd.seq)
    detail = {
        "checkpoint_id": cid,
        "checkpoint_tag": tag,
        "checkpoint_path": f"/ck/j/r1/{cid}",
        "checkpoint_step": str(step),
        "branch": s.jobs["j"].registry.branch,
    }
    return ack_all(s, cmd, detail, step=step)


def test_applied_checkpoint_and_rollback_build_the_registry_and_status() -> None:
    s = running()
    out = checkpoint(s, tag="before-spike", step=10)
    assert out.results[0].detail["checkpoint_id"] == "ckpt-1" and out.results[1].branch == "main"
    cmd = submit(s, ActionKind.ROLLBACK, checkpoint="before-spike")
    assert cmd.body == Action(
        kind=ActionKind.ROLLBACK,
        args={"checkpoint": "before-spike", "checkpoint_id": "ckpt-1"},
    )
    ack_all(s, cmd, {"branch": "b2", "parent_branch": "main", "from_checkpoint": "ckpt-1", "fork_step": "10"})
    status = liveness.status(s, "j", 101.0, POLICY).jobs[0]
    assert [(c.id, c.tag, c.step, c.branch, c.seq) for c in status.checkpoints] == [
        ("ckpt-1", "before-spike", 10, "main", 1)
    ]
    assert [(b.id, b.parent, b.from_checkpoint, b.fork_step, b.seq) for b in status.branches] == [
        ("main", "", "", 0, 0),
        ("b2", "main", "ckpt-1", 10, 2),
    ]
    assert status.branch == "b2"
    liveness.observe_heartbeat(s, heartbeat(0, branch="b2"), 101.5)
    assert [r.branch for r in liveness.status(s, "j", 101.5, POLICY).jobs[0].ranks] == ["b2", "main"]


def test_rejected_or_detail_less_outcomes() -> None:
    s = running()
    cmd = submit(s, ActionKind.CHECKPOINT, tag="t")
    for rank, status in ((0, AckStatus.APPLIED), (1, AckStatus.REJECTED)):
        reason = "disk full" if status is AckStatus.REJECTED else ""
        outcomes.record_ack(s, ack(cmd.seq, rank, status, reason, command_id=cmd.command_id, step=0), 101.0)
    assert s.jobs["j"].registry.checkpoints == {}
    # An applied stop without detail still registers the deterministic id.
    stop = submit(s, ActionKind.STOP)
    ack_all(s, stop, {}, step=12)
    assert [(c.id, c.step) for c in s.jobs["j"].registry.checkpoints.values()] == [("ckpt-2", 12)]


def test_data_add_registers_sources() -> None:
    s = running()
    cmd = submit(s, ActionKind.DATA_ADD, name="wiki", path="/data/wiki")
    ack_all(s, cmd, {"source": "wiki"})
    assert s.jobs["j"].registry.sources == {"wiki": "/data/wiki"}


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        (
            "",
            Action(kind=ActionKind.CHECKPOINT, args={"tag": "no spaces"}),
            "checkpoint tag 'no spaces' is not valid",
        ),
        ("", Action(kind=ActionKind.CHECKPOINT, args={"tag": "x" * 65}), "1 to 64 characters"),
        (
            "ckpt:a",
            Action(kind=ActionKind.CHECKPOINT, args={"tag": "a"}),
            "tag 'a' is already used in this run",
        ),
        ("pending-ckpt:b", Action(kind=ActionKind.CHECKPOINT, args={"tag": "b"}), "tag 'b' is already used"),
        ("", Action(kind=ActionKind.ROLLBACK), "action rollback needs argument 'checkpoint'"),
        (
            "",
            Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "x"}),
            "checkpoint 'x' does not exist: there are no checkpoints yet",
        ),
        (
            "ckpt:a",
            Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "x"}),
            "checkpoint 'x' does not exist: known checkpoints are ckpt-1 (tag a)",
        ),
        (
            "pending-rollback",
            Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "ckpt-1"}),
            "a rollback (seq 2) is in flight: wait for it",
        ),
        ("", Action(kind=ActionKind.DATA_ADD, args={"path": "/d"}), "needs argument 'name'"),
        (
            "",
            Action(kind=ActionKind.DATA_ADD, args={"name": "a.b", "path": "/d"}),
            "data source name 'a.b' is not valid",
        ),
        (
            "source:wiki",
            Action(kind=ActionKind.DATA_ADD, args={"name": "wiki", "path": "/d"}),
            "'wiki' already exists",
        ),
        (
            "",
            Action(kind=ActionKind.FAULT_INJECT, args={"rank": "0", "xid": "79"}),
            "fault injection is disabled for job j: start it with torchloom run --allow-fault-injection",
        ),
        (
            "allow",
            Action(kind=ActionKind.FAULT_INJECT, args={"rank": "2", "xid": "79"}),
            "rank='2' rejected: must be an integer in [0, 1]",
        ),
        (
            "allow",
            Action(kind=ActionKind.FAULT_INJECT, args={"rank": "0", "xid": "x"}),
            "xid='x' rejected: must be an integer",
        ),
        ("allow", Action(kind=ActionKind.FAULT_INJECT, args={"rank": "0"}), "needs argument 'xid'"),
    ],
)
def test_invalid_actions_publish_nothing_and_consume_no_seq(setup: str, action: Action, message: str) -> None:
    s = running(allow=setup == "allow")
    if setup.startswith("ckpt:"):
        checkpoint(s, tag=setup.removeprefix("ckpt:"))
    elif setup.startswith("pending-ckpt:"):
        submit(s, ActionKind.CHECKPOINT, tag=setup.removeprefix("pending-ckpt:"))
    elif setup == "pending-rollback":
        checkpoint(s)
        submit(s, ActionKind.ROLLBACK, checkpoint="ckpt-1")
    elif setup.startswith("source:"):
        ack_all(s, submit(s, ActionKind.DATA_ADD, name="wiki", path="/w"), {"source": "wiki"})
    job = s.jobs["j"]
    before = (job.last_seq, dict(job.pending))
    with pytest.raises(CommandRejected) as info:
        submits.plan_submit(s, SubmitRequest(body=action), 100.0, DEAD)
    assert message in str(info.value)
    assert (job.last_seq, dict(job.pending)) == before


def test_valid_fault_inject_is_normalized() -> None:
    s = running(allow=True)
    cmd = submit(s, ActionKind.FAULT_INJECT, rank=" 1", xid="079")
    assert cmd.body == Action(kind=ActionKind.FAULT_INJECT, args={"rank": "1", "xid": "79"})


def test_fault_inject_needs_every_rank_to_allow_it() -> None:
    s = running(allow=True)
    liveness.observe_heartbeat(s, heartbeat(1, fault_injection_allowed=False, branch="main"), 100.1)
    with pytest.raises(CommandRejected, match="fault injection is disabled"):
        submit(s, ActionKind.FAULT_INJECT, rank="0", xid="79")


def test_rollback_resolves_by_id_and_tag_prefers_id() -> None:
    s = running()
    checkpoint(s, tag="ckpt-9")
    checkpoint(s, tag="late")
    assert submit(s, ActionKind.ROLLBACK, checkpoint="ckpt-2").body.args["checkpoint_id"] == "ckpt-2"  # type: ignore[union-attr]


# ---- replay after a weaver restart --------------------------------------------------------------


def _outcome(cmd: Command, status: OutcomeStatus, detail: Mapping[str, str]) -> Outcome:
    return Outcome(
        command_id=cmd.command_id,
        job="j",
        status=status,
        results=tuple(RankResult(rank=r, status=AckStatus.APPLIED, step=5, detail=detail) for r in range(2)),
        command=cmd,
        completed_at_s=50.0,
    )


def _cmd(seq: int, kind: ActionKind, run: str = "r1", **args: str) -> Command:
    return command(seq, Action(kind=kind, args=args), run=run, issuer=CLI, issued_at_s=40.0)


def test_replay_rebuilds_runs_registries_seq_and_in_flight_commands() -> None:
    s = WeaverState()
    old = _cmd(1, ActionKind.CHECKPOINT, run="r0")
    c1 = _cmd(1, ActionKind.CHECKPOINT, tag="a")
    c2 = _cmd(2, ActionKind.EVAL)
    c3 = _cmd(3, ActionKind.PAUSE)
    entries: list[Outcome | JobEvent] = [
        JobEvent(job="j", run_id="r0", kind="run_started", attrs={"world_size": "4"}),
        _outcome(old, OutcomeStatus.APPLIED, {"checkpoint_id": "ckpt-1"}),
        JobEvent(job="j", run_id="r1", kind="run_started", attrs={"world_size": "2"}, time_s=30.0),
        _outcome(
            c1,
            OutcomeStatus.APPLIED,
            {"checkpoint_id": "ckpt-1", "checkpoint_tag": "a", "checkpoint_step": "5"},
        ),
        _outcome(c2, OutcomeStatus.REJECTED, {}),
        # A late outcome of the retired run changes nothing.
        _outcome(_cmd(2, ActionKind.CHECKPOINT, run="r0"), OutcomeStatus.APPLIED, {}),
    ]
    recovery.replay_journal(s, entries)
    job = s.jobs["j"]
    assert (job.run_id, job.world_size, job.retired_runs, job.last_seq) == ("r1", 2, {"r0"}, 2)
    assert [(c.id, c.tag, c.step) for c in job.registry.checkpoints.values()] == [("ckpt-1", "a", 5)]
    assert not job.seq_known
    recovery.replay_commands(s, "j", "r1", [(c1, 11), (c2, 12), (c3, 14)])
    assert (job.last_seq, job.last_stream_seq, job.seq_known, sorted(job.pending)) == (3, 14, True, [3])
    # The ranks answer the in-flight command after the restart: its outcome is complete.
    out = None
    for rank in range(2):
        out = outcomes.record_ack(s, ack(3, rank, command_id=c3.command_id, inc="i", step=7), 60.0)
    assert out is not None and out.status is OutcomeStatus.APPLIED and out.command == c3
    assert [r.step for r in out.results] == [7, 7]
    # Heartbeats of the same run keep the recovered state; the next seq continues.
    liveness.observe_heartbeat(s, heartbeat(0, branch="main"), 100.0)
    assert s.jobs["j"] is job and submit(s, ActionKind.EVAL).seq == 4
