"""Multi-node pieces without processes: `torchloom run` arguments for a c10d rendezvous, the run id
every node shares, the supervisor declining restarts, and the weaver's scale_down/scale_up events."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.factories import heartbeat
from torchloom.app import run_args
from torchloom.app.health_options import UsageError
from torchloom.app.run_args import is_multinode, split_run_args
from torchloom.app.supervisor import Supervisor
from torchloom.messages import Heartbeat, JobEvent, RestartRequest
from weaver import liveness
from weaver.model import WeaverState

C10D = ["--nnodes", "1:2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "exp7"]


def test_a_c10d_rendezvous_gets_no_standalone_and_the_run_id_comes_from_the_rdzv_id() -> None:
    spec = split_run_args([*C10D, "--max-restarts", "3", "train.py", "--steps", "5"])
    assert "--standalone" not in spec.torchrun_args
    assert spec.torchrun_args[: len(C10D)] == tuple(C10D)
    assert spec.run_id == "exp7"
    assert spec.multinode
    assert spec.script_args == ("--steps", "5")


def test_an_explicit_run_id_wins_over_the_rdzv_id() -> None:
    spec = split_run_args(["--run-id", "mine", *C10D, "train.py"])
    assert spec.run_id == "mine"
    spec = split_run_args(["--run-id=other", "train.py"])
    assert spec.run_id == "other" and "--standalone" in spec.torchrun_args


def test_single_node_runs_get_a_fresh_run_id() -> None:
    assert split_run_args(["train.py"]).run_id is None
    # --standalone makes torchrun ignore --rdzv-id, so it does not name the run either.
    spec = split_run_args(["--standalone", "--rdzv-id", "x", "train.py"])
    assert spec.run_id is None and not spec.multinode


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--run-id", "a.b", "t.py"], "--run-id 'a.b' is not valid"),
        (["--run-id", "run-a2", "t.py"], "must not end in -a<N>"),
        (["--nnodes", "2", "--rdzv-id", "x" * 65, "t.py"], "1 to 64 characters"),
        (["--run-id", "t.py"], "no SCRIPT given"),
    ],
)
def test_bad_run_ids_are_refused_with_the_expected_form(argv: list[str], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        split_run_args(argv)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--nnodes", "1:2"], True),
        (["--nnodes=2"], True),
        (["--nnodes", "1"], False),
        (["--nnodes", "1:1"], False),
        (["--standalone", "--nnodes", "2"], False),
        (["--rdzv-backend", "c10d"], False),
        ([], False),
    ],
)
def test_is_multinode(args: list[str], expected: bool) -> None:
    assert is_multinode(args) is expected


def test_check_run_id_accepts_plain_tokens() -> None:
    assert run_args.check_run_id("exp-7_b") == "exp-7_b"


class _Running:
    """Stands in for the running torchrun attempt: the supervisor only reads its returncode here."""

    returncode: int | None = None
    pid = -1


async def test_a_multi_node_supervisor_declines_restart_requests() -> None:
    sup = Supervisor(
        job="j",
        run_id="r",
        nats_url="nats://127.0.0.1:1",
        command=lambda n: ["true"],
        child_env={},
        nproc=1,
        elastic_membership=True,
    )
    req = RestartRequest(job="j", run_id="r", world_size=1)
    proc: Any = _Running()
    assert await sup._restart(proc, req) is None
    assert [e.kind for e in sup.events] == ["restart_declined"]
    assert sup.run_id == "r" and sup.attempt == 0


def hb(rank: int, *, run: str, world: int, host: str, step: int = 10) -> Heartbeat:
    return heartbeat(rank, run=run, world=world, inc=f"{run}-{rank}", step=step, host=host)


def _kinds(effects: liveness.HeartbeatEffects, kind: str) -> list[JobEvent]:
    return [e for e in effects.events if e.kind == kind]


def test_a_smaller_next_attempt_is_a_scale_down_naming_the_lost_rank_and_host() -> None:
    state = WeaverState()
    liveness.observe_heartbeat(state, hb(0, run="r", world=2, host="node-a"), 1.0)
    liveness.observe_heartbeat(state, hb(1, run="r", world=2, host="node-b"), 1.0)
    effects = liveness.observe_heartbeat(state, hb(0, run="r-a1", world=1, host="node-a", step=3), 5.0)
    [ev] = _kinds(effects, "scale_down")
    assert ev.run_id == "r-a1" and ev.time_s == 5.0
    assert ev.attrs["old_world_size"] == "2" and ev.attrs["new_world_size"] == "1"
    assert ev.attrs["lost_ranks"] == "1" and ev.attrs["lost_hosts"] == "node-b"
    assert ev.attrs["previous_run"] == "r"
    assert ev.attrs["old_hosts"] == "node-a,node-b" and ev.attrs["new_hosts"] == "node-a"
    assert _kinds(effects, "resumed")  # the restart is reported as before, too
    # Once: later heartbeats of the attempt add nothing.
    again = liveness.observe_heartbeat(state, hb(0, run="r-a1", world=1, host="node-a", step=4), 5.2)
    assert not _kinds(again, "scale_down")


def test_a_scale_up_is_reported_once_every_rank_of_the_bigger_world_has_reported() -> None:
    state = WeaverState()
    liveness.observe_heartbeat(state, hb(0, run="r", world=1, host="node-a"), 1.0)
    first = liveness.observe_heartbeat(state, hb(1, run="r-a1", world=2, host="node-b"), 2.0)
    assert not _kinds(first, "scale_up")  # rank 0 of the new world has not reported yet
    second = liveness.observe_heartbeat(state, hb(0, run="r-a1", world=2, host="node-a"), 2.1)
    [ev] = _kinds(second, "scale_up")
    assert (ev.attrs["old_world_size"], ev.attrs["new_world_size"]) == ("1", "2")
    assert ev.attrs["added_ranks"] == "1" and ev.attrs["added_hosts"] == "node-b"


def test_same_size_attempts_and_other_runs_give_no_scale_event() -> None:
    state = WeaverState()
    for rank in (0, 1):
        liveness.observe_heartbeat(state, hb(rank, run="r", world=2, host="h"), 1.0)
    same = [
        liveness.observe_heartbeat(state, hb(rank, run="r-a1", world=2, host="h"), 2.0) for rank in (0, 1)
    ]
    assert not [e for fx in same for e in fx.events if e.kind.startswith("scale_")]
    other = liveness.observe_heartbeat(state, hb(0, run="q", world=1, host="h"), 3.0)
    assert not [e for e in other.events if e.kind.startswith("scale_")]


def test_a_world_that_loses_two_of_three_ranks_on_one_host_lists_the_host_twice() -> None:
    state = WeaverState()
    for rank, host in enumerate(("a", "b", "b")):
        liveness.observe_heartbeat(state, hb(rank, run="r", world=3, host=host), 1.0)
    effects = liveness.observe_heartbeat(state, hb(0, run="r-a1", world=1, host="a"), 2.0)
    [ev] = _kinds(effects, "scale_down")
    assert ev.attrs["lost_ranks"] == "1,2" and ev.attrs["lost_hosts"] == "b,b"
