"""Table tests of the weaver's pure state and decisions (no sockets, no processes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.unit import factories
from tests.unit.factories import ack, heartbeat
from torchloom.errors import CommandRejected, JobNotFound
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Heartbeat,
    KnobSpec,
    KnobType,
    OutcomeStatus,
    RankState,
    SetConfig,
    SubmitRequest,
)
from weaver import health_plan, liveness, outcomes, submits
from weaver.health_policy import HealthPolicy, PolicyMode
from weaver.model import RankEntry, WeaverState

DEAD = 1.0
KNOBS = (
    KnobSpec(
        name="lr", type=KnobType.FLOAT, min=0.0, min_exclusive=True, max=10.0, value=0.1, groups=("head",)
    ),
    BUILTIN_SPECS["weight_decay"],
)


def hb(rank: int = 0, **kw: Any) -> Heartbeat:
    """A heartbeat carrying this file's knobs at step 7."""
    return heartbeat(rank, **{"step": 7, "knobs": KNOBS, **kw})


def running(world: int = 2, **kw: Any) -> WeaverState:
    return factories.running(world, step=7, knobs=KNOBS, **kw)


def set_lr(value: object = "0.5", job: str = "") -> SubmitRequest:
    return SubmitRequest(job=job, body=SetConfig(values={"lr": value}))  # type: ignore[dict-item]


# ---- heartbeats ---------------------------------------------------------------------------------


def test_first_heartbeats_start_a_run_and_join_ranks() -> None:
    s = WeaverState()
    first = liveness.observe_heartbeat(s, hb(0), 1.0)
    assert [e.kind for e in first.events] == ["run_started", "rank_joined"]
    assert first.new_run
    second = liveness.observe_heartbeat(s, hb(1), 1.1)
    assert [e.kind for e in second.events] == ["rank_joined"]
    again = liveness.observe_heartbeat(s, hb(1), 1.2)
    assert again.events == ()
    job = s.jobs["j"]
    assert sorted(job.ranks) == [0, 1] and job.world_size == 2 and job.knobs == KNOBS


def test_new_incarnation_is_a_new_join() -> None:
    s = running()
    effects = liveness.observe_heartbeat(s, hb(1, inc="reborn"), 2.0)
    assert [e.kind for e in effects.events] == ["rank_joined"]
    assert effects.events[0].attrs["incarnation"] == "reborn"


def test_new_run_resets_ranks_pending_and_seq() -> None:
    s = running()
    cmd = submits.plan_submit(s, set_lr(), 100.0, DEAD)
    assert cmd.seq == 1
    effects = liveness.observe_heartbeat(s, hb(0, run="r2", world=1), 101.0)
    assert effects.new_run
    assert [e.kind for e in effects.events] == ["run_started", "rank_joined"]
    assert [o.command_id for o in effects.dropped] == [cmd.command_id]
    assert effects.dropped[0].status is OutcomeStatus.TIMEOUT
    job = s.jobs["j"]
    assert (job.run_id, sorted(job.ranks), job.pending, job.last_seq, job.seq_known) == (
        "r2",
        [0],
        {},
        0,
        False,
    )
    # A late heartbeat of the old run does not flip the job back.
    assert liveness.observe_heartbeat(s, hb(1, run="r1"), 101.5) == liveness.HeartbeatEffects()
    assert s.jobs["j"].run_id == "r2"
    submits.set_seq_floor(s, "j", "r2", 0)
    assert submits.plan_submit(s, set_lr(), 102.0, DEAD).seq == 1


def test_heartbeat_last_seq_never_moves_the_seq_floor() -> None:
    # The commands stream is the truth: a (forged) last_seq=1000000 must not make the next seq
    # unreachable for the ranks.
    s = running()
    liveness.observe_heartbeat(s, hb(0, last_seq=1_000_000), 100.0)
    assert submits.plan_submit(s, set_lr(), 100.0, DEAD).seq == 1


@pytest.mark.parametrize(
    ("age_s", "state", "alive"),
    [
        (0.0, RankState.RUNNING, True),
        (1.0, RankState.RUNNING, True),
        (1.01, RankState.RUNNING, False),
        (0.0, RankState.PAUSED, True),
        (0.0, RankState.FINISHED, False),
    ],
)
def test_liveness(age_s: float, state: RankState, alive: bool) -> None:
    entry = RankEntry(heartbeat=hb(0, state=state), last_seen_s=10.0)
    assert liveness.is_alive(entry, 10.0 + age_s, DEAD) is alive


POLICY = HealthPolicy(mode=PolicyMode.ALERT, dead_after_s=DEAD, hung_after_s=5.0)


def test_dead_rank_is_reported_once_and_recovers() -> None:
    s = running(now=10.0)
    assert health_plan.check_health(s, 10.5, POLICY).events == ()
    liveness.observe_heartbeat(s, hb(0), 11.0)
    events = [e for e in health_plan.check_health(s, 11.5, POLICY).events if e.kind != "health_action"]
    assert [(e.kind, e.attrs["rank"]) for e in events] == [("rank_dead", "1")]
    assert "no heartbeat for 1.5 s" in events[0].attrs["reason"]
    liveness.observe_heartbeat(s, hb(0), 11.6)
    assert [e.kind for e in health_plan.check_health(s, 11.6, POLICY).events] == []
    assert liveness.observe_heartbeat(s, hb(1), 12.0).events == ()
    recovered = health_plan.check_health(s, 12.0, POLICY).events
    assert [(e.kind, e.attrs["rank"]) for e in recovered] == [("rank_recovered", "1")]


def test_finished_rank_is_reported_and_never_dead() -> None:
    s = running(now=10.0)
    effects = liveness.observe_heartbeat(s, hb(1, state=RankState.FINISHED), 10.1)
    assert [e.kind for e in effects.events] == ["rank_finished"]
    assert liveness.observe_heartbeat(s, hb(1, state=RankState.FINISHED), 10.2).events == ()
    dead = [e for e in health_plan.check_health(s, 50.0, POLICY).events if e.kind == "rank_dead"]
    assert [e.attrs["rank"] for e in dead] == ["0"]


# ---- job resolution -----------------------------------------------------------------------------


def two_jobs(now: float = 100.0) -> WeaverState:
    s = running(job="a", now=now)
    for r in range(2):
        liveness.observe_heartbeat(s, hb(r, job="b"), now)
    return s


@pytest.mark.parametrize(
    ("setup", "name", "now", "expected"),
    [
        ("one", "", 100.0, "j"),
        ("one", "j", 100.0, "j"),
        ("one", "j", 500.0, "j"),  # a named job resolves even with no live rank
        ("two", "a", 100.0, "a"),
    ],
)
def test_resolve_job_finds(setup: str, name: str, now: float, expected: str) -> None:
    s = running() if setup == "one" else two_jobs()
    assert liveness.resolve_job(s, name, now, DEAD).job == expected


@pytest.mark.parametrize(
    ("setup", "name", "now", "message"),
    [
        ("none", "", 100.0, "no job has live ranks (known jobs: none)"),
        ("one", "", 500.0, "no job has live ranks (known jobs: j)"),
        ("one", "x", 100.0, "no job named 'x': known jobs are j; pass --job"),
        ("two", "", 100.0, "several jobs are running (a, b): pass --job NAME"),
    ],
)
def test_resolve_job_errors(setup: str, name: str, now: float, message: str) -> None:
    s = {"none": WeaverState, "one": running, "two": two_jobs}[setup]()
    with pytest.raises(JobNotFound) as info:
        liveness.resolve_job(s, name, now, DEAD)
    assert message in str(info.value)
    assert "--job" in str(info.value)


def test_empty_name_picks_the_only_live_job() -> None:
    s = two_jobs(now=100.0)
    for r in range(2):
        liveness.observe_heartbeat(s, hb(r, job="b"), 105.0)
    assert liveness.resolve_job(s, "", 105.5, DEAD).job == "b"


# ---- submits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (SetConfig(values={"lr": "-1"}), "lr=-1 rejected: must be in (0, 10]"),
        (SetConfig(values={"lr": "fast"}), "expected a float"),
        (SetConfig(values={"momentum": "0.9"}), "unknown knob 'momentum'"),
        (SetConfig(values={"lr@tail": "0.1"}), "names no parameter group"),
        (SetConfig(values={}), "empty config change"),
        (Action(kind=ActionKind.ROLLBACK), "action rollback needs argument 'checkpoint'"),
        (Action(kind=ActionKind.DATA_ADD, args={"name": "x"}), "needs argument 'path'"),
        (Action(kind=ActionKind.DATA_ADD, args={"name": " ", "path": "/d"}), "needs argument 'name'"),
    ],
)
def test_invalid_submits_are_rejected_without_consuming_a_seq(body: object, message: str) -> None:
    s = running()
    with pytest.raises(CommandRejected) as info:
        submits.plan_submit(s, SubmitRequest(body=body), 100.0, DEAD)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert s.jobs["j"].last_seq == 0 and s.jobs["j"].pending == {}
    assert submits.plan_submit(s, set_lr(), 100.0, DEAD).seq == 1


@pytest.mark.parametrize(
    ("body", "typed"),
    [
        (SetConfig(values={"lr": "1e-3"}), SetConfig(values={"lr": 0.001})),
        (SetConfig(values={"lr@head": 2}), SetConfig(values={"lr@head": 2.0})),
        (Action(kind=ActionKind.PAUSE), Action(kind=ActionKind.PAUSE)),
        (
            Action(kind=ActionKind.DATA_ADD, args={"name": "n", "path": "/p"}),
            Action(kind=ActionKind.DATA_ADD, args={"name": "n", "path": "/p"}),
        ),
    ],
)
def test_valid_submits_become_typed_commands(body: object, typed: object) -> None:
    s = running()
    cmd = submits.plan_submit(s, SubmitRequest(body=body), 100.0, DEAD)  # type: ignore[arg-type]
    assert (cmd.job, cmd.run_id, cmd.seq, cmd.body, cmd.issued_at_s) == ("j", "r1", 1, typed, 100.0)
    assert len(cmd.command_id) == 32
    assert s.jobs["j"].pending[1].world_size == 2


def test_seqs_are_contiguous_and_floor_is_respected() -> None:
    s = running()
    submits.set_seq_floor(s, "j", "r1", 7)
    submits.set_seq_floor(s, "j", "other-run", 99)  # another run's floor changes nothing
    assert [submits.plan_submit(s, set_lr(), 100.0, DEAD).seq for _ in range(3)] == [8, 9, 10]


def test_abandon_releases_the_seq_and_forces_a_reload() -> None:
    s = running()
    cmd = submits.plan_submit(s, set_lr(), 100.0, DEAD)
    submits.abandon(s, cmd)
    job = s.jobs["j"]
    assert (job.last_seq, job.pending, job.seq_known) == (0, {}, False)


# ---- acks and outcomes --------------------------------------------------------------------------


def test_all_applied_is_applied_with_results_and_timestamps() -> None:
    s = running()
    cmd = submits.plan_submit(s, set_lr(), 100.0, DEAD)
    submits.mark_published(s, cmd, 100.25)
    assert outcomes.record_ack(s, ack(1, 1), 101.0) is None
    out = outcomes.record_ack(s, ack(1, 0), 102.0)
    assert out is not None
    assert out.status is OutcomeStatus.APPLIED and out.reason == ""
    assert [r.rank for r in out.results] == [0, 1]
    assert (out.submitted_at_s, out.published_at_s, out.completed_at_s) == (100.0, 100.25, 102.0)
    assert out.command == cmd
    assert s.jobs["j"].pending == {}


def test_acks_are_deduped_by_seq_and_rank() -> None:
    s = running(world=3)
    submits.plan_submit(s, set_lr(), 100.0, DEAD)
    assert outcomes.record_ack(s, ack(1, 0), 101.0) is None
    assert outcomes.record_ack(s, ack(1, 0), 101.0) is None
    assert outcomes.record_ack(s, ack(1, 1), 101.0) is None
    assert outcomes.record_ack(s, ack(1, 2), 101.0) is not None
    assert outcomes.record_ack(s, ack(1, 2), 101.0) is None  # after the outcome: ignored


@pytest.mark.parametrize(
    "stray",
    [
        ack(1, 0, run="old-run"),
        ack(2, 0),  # unknown seq
        ack(1, 5),  # rank outside the world
        ack(1, 0, command_id="not-this-command"),
    ],
)
def test_stray_acks_are_ignored(stray: Ack) -> None:
    s = running(world=1)
    submits.plan_submit(s, set_lr(), 100.0, DEAD)
    assert outcomes.record_ack(s, stray, 101.0) is None
    assert s.jobs["j"].pending[1].acks == {}


@pytest.mark.parametrize(
    ("acks", "reason"),
    [
        (
            [(0, "refused by another rank"), (1, "rank 1 refused: lr@head unknown")],
            "rank 1: rank 1 refused: lr@head unknown; rank 0: refused by another rank",
        ),
        ([(0, "disk full"), (1, "")], "rank 0: disk full; rank 1: rejected"),
        ([(0, None), (1, "nope")], "rank 1: nope"),
    ],
)
def test_rejections_list_refusing_ranks_first(acks: list[tuple[int, str | None]], reason: str) -> None:
    s = running()
    submits.plan_submit(s, set_lr(), 100.0, DEAD)
    out = None
    for rank, why in acks:
        status = AckStatus.APPLIED if why is None else AckStatus.REJECTED
        a = ack(1, rank, status, why or "")
        if why == "refused by another rank":  # the threadlet flags a peer's refusal; the text is for humans
            a = dataclasses.replace(a, refused_by_peer=True)
        out = outcomes.record_ack(s, a, 101.0)
    assert out is not None
    assert out.status is OutcomeStatus.REJECTED
    assert out.reason == reason


def test_timeout_names_missing_ranks_and_keeps_tracking() -> None:
    s = running(world=3)
    cmd = submits.plan_submit(s, set_lr(), 100.0, DEAD)
    outcomes.record_ack(s, ack(1, 1), 101.0)
    out = outcomes.timeout_outcome(s, cmd, 5.0, 105.0)
    assert out.status is OutcomeStatus.TIMEOUT
    assert "rank(s) 0, 2 did not answer within 5s (answered: 1)" in out.reason
    assert [r.rank for r in out.results] == [1]
    assert 1 in s.jobs["j"].pending
    outcomes.record_ack(s, ack(1, 0), 106.0)
    final = outcomes.record_ack(s, ack(1, 2), 107.0)
    assert final is not None and final.status is OutcomeStatus.APPLIED


def test_outcome_event_describes_the_command() -> None:
    s = running(world=1)
    submits.plan_submit(s, set_lr("0.5"), 100.0, DEAD)
    out = outcomes.record_ack(s, ack(1, 0), 101.0)
    assert out is not None
    ev = outcomes.outcome_event(out, 101.0)
    assert (ev.kind, ev.command_id, ev.run_id) == ("command", out.command_id, "r1")
    assert ev.message == "#1 set lr=0.5: applied"
    assert ev.attrs == {"status": "applied", "seq": "1"}


# ---- status -------------------------------------------------------------------------------------


def test_status_snapshot() -> None:
    s = running(now=100.0)
    liveness.observe_heartbeat(s, hb(0), 100.5)
    reply = liveness.status(s, "", 101.25, POLICY)
    (job,) = reply.jobs
    assert (job.job, job.run_id, job.world_size, job.last_seq) == ("j", "r1", 2, 0)
    assert [(r.rank, r.alive, r.last_heartbeat_s, r.step) for r in job.ranks] == [
        (0, True, 0.75, 7),
        (1, False, 1.25, 7),
    ]
    assert job.ranks[0].knobs == {"lr": 0.1}
    assert job.knobs == KNOBS


def test_status_all_jobs_and_unknown_job() -> None:
    s = two_jobs()
    assert [j.job for j in liveness.status(s, "", 100.0, POLICY).jobs] == ["a", "b"]
    assert [j.job for j in liveness.status(s, "b", 100.0, POLICY).jobs] == ["b"]
    with pytest.raises(JobNotFound, match="no job named 'zzz'"):
        liveness.status(s, "zzz", 100.0, POLICY)
