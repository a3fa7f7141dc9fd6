"""classify(): rank liveness and health from a snapshot and `now`, table by table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchloom.messages import DeviceHealth, Heartbeat, RankState
from weaver.health_policy import HealthKind, RankView, classify

NOW = 1000.0
SICK = DeviceHealth(
    kind="cuda", device="GPU-1", healthy=False, unhealthy_reason="XID 79: GPU has fallen off the bus"
)


def view(rank: int = 0, **kw: object) -> RankView:
    base: dict[str, object] = {
        "rank": rank,
        "last_heartbeat_at": NOW - 0.1,
        "step": 10,
        "last_step_change_at": NOW - 0.5,
        "step_time_s": 0.5,
        "state": RankState.RUNNING,
        "device": DeviceHealth(kind="cuda", device=f"GPU-{rank}"),
    }
    base.update(kw)
    return RankView(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "kind", "reason"),
    [
        ({}, HealthKind.HEALTHY, ""),
        ({"last_heartbeat_at": NOW - 1.5}, HealthKind.DEAD, "no heartbeat for 1.5 s (limit 1 s)"),
        ({"last_heartbeat_at": NOW - 1.0}, HealthKind.HEALTHY, ""),  # exactly at the limit: alive
        ({"device": SICK}, HealthKind.UNHEALTHY, "GPU-1: XID 79: GPU has fallen off the bus"),
        (
            {"device": DeviceHealth(device="GPU-9", healthy=False)},
            HealthKind.UNHEALTHY,
            "GPU-9: device reports unhealthy",
        ),
        ({"last_step_change_at": NOW - 12}, HealthKind.HUNG, "step 10 unchanged for 12.0 s (limit 10 s)"),
        ({"last_step_change_at": NOW - 12, "state": RankState.PAUSED}, HealthKind.HEALTHY, ""),
        ({"last_heartbeat_at": NOW - 50, "state": RankState.FINISHED}, HealthKind.HEALTHY, "finished"),
        ({"last_heartbeat_at": NOW - 5, "device": SICK}, HealthKind.DEAD, "no heartbeat for 5.0 s"),
        ({"last_step_change_at": NOW - 12, "device": SICK}, HealthKind.UNHEALTHY, "GPU-1: XID 79"),
        ({"step_time_s": 1.5}, HealthKind.STRAGGLER, "step time 1.5 s is 3.0x the median 0.5 s"),
        ({"step_time_s": 1.0}, HealthKind.HEALTHY, ""),  # exactly 2x: not yet a straggler
        ({"step_time_s": 1.5, "state": RankState.PAUSED}, HealthKind.HEALTHY, ""),
        ({"step_time_s": 1.5, "last_step_change_at": NOW - 11}, HealthKind.HUNG, "unchanged for 11.0 s"),
        ({"device": None}, HealthKind.HEALTHY, ""),
    ],
)
def test_classify_rank_zero_among_healthy_peers(
    overrides: dict[str, object], kind: HealthKind, reason: str
) -> None:
    ranks = [view(0, **overrides), view(1), view(2)]
    health = classify(ranks, NOW)
    assert health[0].kind is kind
    assert reason in health[0].reason
    if not reason:
        assert health[0].reason == ""
    assert health[1].kind is HealthKind.HEALTHY and health[2].kind is HealthKind.HEALTHY


@pytest.mark.parametrize(
    ("times", "min_samples", "stragglers"),
    [
        ([0.5, 1.2], 1, {1}),  # two ranks: compared with the other one
        ([0.5, 0.9], 1, set()),
        ([0.5, 1.2], 2, set()),  # one peer is not enough evidence here
        ([0.5, 0.5, 0.6, 5.0], 1, {3}),
        ([0.5, 0.0, 1.2], 1, {2}),  # rank 1 has no step time yet: not a sample, never a straggler
        ([0.0, 0.0, 0.0], 1, set()),
        ([1.0, 1.0, 1.0, 1.0], 3, set()),
    ],
)
def test_straggler_against_the_median_of_the_peers(
    times: list[float], min_samples: int, stragglers: set[int]
) -> None:
    ranks = [view(r, step_time_s=t) for r, t in enumerate(times)]
    health = classify(ranks, NOW, min_samples=min_samples)
    assert {r for r, h in health.items() if h.kind is HealthKind.STRAGGLER} == stragglers


def test_thresholds_are_arguments() -> None:
    ranks = [
        view(0, last_heartbeat_at=NOW - 2, last_step_change_at=NOW - 2),
        view(1, last_step_change_at=NOW - 4),
    ]
    health = classify(ranks, NOW, dead_after_s=3.0, hung_after_s=3.0)
    assert (health[0].kind, health[1].kind) == (HealthKind.HEALTHY, HealthKind.HUNG)
    assert health[1].for_s == pytest.approx(4.0)


def test_rank_health_carries_device_and_key() -> None:
    health = classify([view(3, device=SICK)], NOW)
    assert health[3].device == "GPU-1"
    assert health[3].key == "unhealthy:3"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dead_after_s": 0}, "dead_after_s=0 rejected: must be a finite number > 0"),
        ({"hung_after_s": float("inf")}, "hung_after_s=inf rejected"),
        ({"straggler_factor": 1.0}, "straggler_factor=1.0 rejected: must be a finite number > 1"),
        ({"min_samples": 0}, "min_samples=0 rejected: must be >= 1"),
    ],
)
def test_bad_thresholds_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classify([view()], NOW, **kwargs)  # type: ignore[arg-type]


def test_duplicate_ranks_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"ranks \[1, 1\] rejected: each rank must appear once"):
        classify([view(1), view(1)], NOW)


def test_view_from_heartbeat_uses_weaver_clocks() -> None:
    hb = Heartbeat(
        job="j",
        run_id="r",
        rank=2,
        world_size=4,
        incarnation="x",
        step=7,
        step_time_s=0.25,
        state=RankState.PAUSED,
        sent_at_s=5.0,
        device=SICK,
    )
    v = RankView.from_heartbeat(hb, received_at=NOW, last_step_change_at=NOW - 3)
    assert v == RankView(
        rank=2,
        last_heartbeat_at=NOW,
        step=7,
        last_step_change_at=NOW - 3,
        step_time_s=0.25,
        state=RankState.PAUSED,
        device=SICK,
    )


@given(
    st.lists(
        st.tuples(
            st.floats(0, 20),  # silence
            st.floats(0, 30),  # time since step change
            st.floats(0, 5),  # step time
            st.sampled_from(list(RankState)),
            st.booleans(),  # device healthy
        ),
        min_size=1,
        max_size=8,
    )
)
def test_every_rank_gets_exactly_one_consistent_verdict(
    rows: list[tuple[float, float, float, RankState, bool]],
) -> None:
    ranks = [
        RankView(
            rank=r,
            last_heartbeat_at=NOW - silence,
            last_step_change_at=NOW - stuck,
            step_time_s=t,
            state=state,
            device=DeviceHealth(healthy=ok),
        )
        for r, (silence, stuck, t, state, ok) in enumerate(rows)
    ]
    health = classify(ranks, NOW)
    assert sorted(health) == list(range(len(rows)))
    for v in ranks:
        h = health[v.rank]
        finished = v.state is RankState.FINISHED
        assert (h.kind is HealthKind.DEAD) == (not finished and NOW - v.last_heartbeat_at > 1.0)
        if h.kind in (HealthKind.HUNG, HealthKind.STRAGGLER):
            assert v.state is RankState.RUNNING
        if h.kind is not HealthKind.HEALTHY:
            assert h.reason


def test_dead_rank_keeps_its_last_device_verdict() -> None:
    health = classify(
        [view(0, last_heartbeat_at=NOW - 3, device=SICK), view(1, last_heartbeat_at=NOW - 3)], NOW
    )
    assert (health[0].kind, health[0].device_healthy) == (HealthKind.DEAD, False)
    assert health[0].reason == (
        "no heartbeat for 3.0 s (limit 1 s); its device last reported: XID 79: GPU has fallen off the bus"
    )
    assert (health[1].kind, health[1].device_healthy) == (HealthKind.DEAD, True)
