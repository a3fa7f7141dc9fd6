"""decide(): the reconfiguration decision table, its idempotence, and the policy config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaver.health_policy import (
    Alert,
    CheckpointAt,
    HealthKind,
    HealthPolicy,
    JobSnapshot,
    PauseJob,
    Phase,
    PolicyMode,
    RankHealth,
    Restart,
    SetGradAccum,
    decide,
)


def fleet(world: int, **kinds: HealthKind) -> dict[int, RankHealth]:
    """`fleet(4, r1=DEAD)`: world ranks, healthy unless named; each on device GPU-<rank>."""
    out = {}
    for r in range(world):
        kind = kinds.get(f"r{r}", HealthKind.HEALTHY)
        for_s = 120.0 if kind is HealthKind.HUNG else 0.0
        reason = "" if kind is HealthKind.HEALTHY else f"{kind} reason"
        out[r] = RankHealth(rank=r, kind=kind, reason=reason, for_s=for_s, device=f"GPU-{r}")
    return out


def snap(world: int = 4, **kw: Any) -> JobSnapshot:
    base: dict[str, object] = {"job": "j", "world_size": world, "step": 100, "latest_checkpoint_step": 80}
    base.update(kw)
    return JobSnapshot(**base)  # type: ignore[arg-type]


def kinds(actions: Sequence[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


DEAD, SICK, HUNG, SLOW = HealthKind.DEAD, HealthKind.UNHEALTHY, HealthKind.HUNG, HealthKind.STRAGGLER


@pytest.mark.parametrize(
    ("policy", "health", "expected"),
    [
        ("reconfigure", fleet(4), []),
        ("reconfigure", fleet(4, r2=SICK), ["Alert", "CheckpointAt", "Restart", "SetGradAccum"]),
        ("reconfigure", fleet(4, r1=DEAD), ["Alert", "Restart"]),
        ("reconfigure", fleet(4, r1=DEAD, r2=SICK), ["Alert", "Alert", "Restart", "SetGradAccum"]),
        ("reconfigure", fleet(4, r3=SLOW), ["Alert"]),
        ("reconfigure", fleet(4, r0=HUNG), ["Alert", "Restart"]),  # hung for 120 s > 60 s grace
        ("pause", fleet(4, r2=SICK), ["Alert", "PauseJob"]),
        ("pause", fleet(4, r1=DEAD), ["Alert", "PauseJob"]),
        ("pause", fleet(4, r0=HUNG), ["Alert", "PauseJob"]),
        ("pause", fleet(4, r3=SLOW), ["Alert"]),
        ("alert", fleet(4, r2=SICK), ["Alert"]),
        ("alert", fleet(4, r1=DEAD, r3=SLOW), ["Alert", "Alert"]),
    ],
)
def test_decision_table(policy: str, health: dict[int, RankHealth], expected: list[str]) -> None:
    assert kinds(decide(snap(grad_accum_steps=3), health, policy)) == expected


def test_unhealthy_device_checkpoints_next_step_and_shrinks_with_grad_accum_rescaled() -> None:
    actions = decide(snap(world=4, grad_accum_steps=3), fleet(4, r2=SICK), "reconfigure")
    alert, ckpt, restart, accum = actions
    assert alert == Alert(
        key="unhealthy:2", severity="critical", message="rank 2 unhealthy: unhealthy reason", ranks=(2,)
    )
    assert ckpt == CheckpointAt(step=101, reason="save state before leaving: unhealthy reason")
    assert isinstance(restart, Restart)
    assert (restart.world_size, restart.from_step, restart.steps_lost) == (3, 101, 0)
    assert restart.exclude_devices == ("GPU-2",) and restart.spares == ()
    assert "world 4 -> 3, grad_accum_steps 3 -> 4" in restart.reason
    assert accum == SetGradAccum(
        old=3, new=4, reason="keep the global batch of 12 micro-batches on 3 ranks instead of 4"
    )


def test_grad_accum_that_does_not_divide_is_said_not_set() -> None:
    actions = decide(snap(world=4, grad_accum_steps=1), fleet(4, r0=SICK), "reconfigure")
    assert kinds(actions) == ["Alert", "CheckpointAt", "Restart", "Alert"]
    note = actions[-1]
    assert isinstance(note, Alert) and note.severity == "warning"
    assert note.message == (
        "grad_accum_steps=1 cannot keep the global batch: 4 micro-batches (1 x 4 ranks) "
        "do not divide among 3 ranks, so the global batch changes"
    )
    restart = actions[2]
    assert isinstance(restart, Restart) and restart.world_size == 3 and note.message in restart.reason


def test_hot_spare_keeps_the_world_size() -> None:
    actions = decide(snap(world=4, hot_spares=("GPU-7", "GPU-8")), fleet(4, r1=SICK), "reconfigure")
    assert kinds(actions) == ["Alert", "CheckpointAt", "Restart"]
    restart = actions[2]
    assert isinstance(restart, Restart)
    assert (restart.world_size, restart.spares, restart.exclude_devices) == (4, ("GPU-7",), ("GPU-1",))
    assert "hot spare(s) GPU-7 replace GPU-1" in restart.reason


@pytest.mark.parametrize(
    ("ckpt", "from_step", "lost", "text"),
    [
        (80, 80, 20, "restart from checkpoint at step 80, 20 steps lost"),
        (100, 100, 0, "restart from checkpoint at step 100, 0 steps lost"),
        (None, None, 100, "restart from scratch (no checkpoint), 100 steps lost"),
    ],
)
def test_dead_rank_restarts_from_the_latest_checkpoint(
    ckpt: int | None, from_step: int | None, lost: int, text: str
) -> None:
    actions = decide(snap(latest_checkpoint_step=ckpt), fleet(4, r1=DEAD), "reconfigure")
    restart = actions[-1]
    assert isinstance(restart, Restart)
    assert (restart.world_size, restart.from_step, restart.steps_lost) == (4, from_step, lost)
    assert restart.reason == f"rank 1 dead: {text}"
    assert not any(isinstance(a, CheckpointAt) for a in actions)  # a dead rank cannot checkpoint


def test_dead_and_unhealthy_restart_without_the_bad_device() -> None:
    actions = decide(snap(grad_accum_steps=3), fleet(4, r1=DEAD, r2=SICK), "reconfigure")
    restart = next(a for a in actions if isinstance(a, Restart))
    assert (restart.world_size, restart.from_step, restart.exclude_devices) == (3, 80, ("GPU-2",))


def test_hung_within_grace_only_alerts_then_restarts_once_overdue() -> None:
    policy = HealthPolicy(hung_restart_after_s=60)
    young = {0: RankHealth(rank=0, kind=HUNG, reason="stuck", for_s=30.0, device="GPU-0")}
    assert kinds(decide(snap(world=1), young, policy)) == ["Alert"]
    old = {0: RankHealth(rank=0, kind=HUNG, reason="stuck", for_s=61.0, device="GPU-0")}
    s = snap(world=1, alerted=frozenset({"hung:0"}))
    actions = decide(s, old, policy)
    assert kinds(actions) == ["Restart"]
    assert actions[0] == Restart(
        world_size=1,
        from_step=80,
        steps_lost=20,
        reason="rank 0 hung: restart from checkpoint at step 80, 20 steps lost",
    )


def test_no_healthy_device_left_is_critical() -> None:
    actions = decide(snap(world=1), fleet(1, r0=SICK), "reconfigure")
    assert kinds(actions) == ["Alert", "Alert"]
    assert actions[1] == Alert(
        key="no_healthy_device",
        severity="critical",
        message="unhealthy device: unhealthy reason; no healthy device left to restart on",
    )


@pytest.mark.parametrize("phase", [Phase.CHECKPOINTING, Phase.RESTARTING])
def test_nothing_is_ordered_while_a_recovery_is_under_way(phase: Phase) -> None:
    assert decide(snap(phase=phase), fleet(4, r1=DEAD, r2=SICK, r3=SLOW), "reconfigure") == []


def test_a_paused_job_is_not_paused_again_but_new_conditions_alert() -> None:
    s = snap(phase=Phase.PAUSED, alerted=frozenset({"unhealthy:2"}))
    assert decide(s, fleet(4, r2=SICK), "pause") == []
    assert kinds(decide(s, fleet(4, r2=SICK, r1=DEAD), "pause")) == ["Alert"]


@pytest.mark.parametrize(
    ("actions", "phase"),
    [
        (
            [CheckpointAt(step=1, reason=""), Restart(world_size=1, from_step=1, reason="")],
            Phase.CHECKPOINTING,
        ),
        ([Restart(world_size=1, from_step=1, reason="")], Phase.RESTARTING),
        ([PauseJob(reason="")], Phase.PAUSED),
        ([Alert(key="straggler:1", severity="warning", message="")], Phase.IDLE),
    ],
)
def test_after_moves_the_phase(actions: list[object], phase: Phase) -> None:
    assert snap().after(actions, fleet(4)).phase is phase  # type: ignore[arg-type]


def test_after_forgets_cleared_conditions_so_they_alert_again() -> None:
    s = snap()
    health = fleet(4, r3=SLOW)
    s = s.after(decide(s, health, "alert"), health)
    assert s.alerted == {"straggler:3"}
    assert decide(s, health, "alert") == []
    s = s.after([], fleet(4))  # rank 3 recovered
    assert s.alerted == frozenset()
    assert kinds(decide(s, health, "alert")) == ["Alert"]


_KIND = st.sampled_from(list(HealthKind))


@given(
    st.lists(_KIND, min_size=1, max_size=6),
    st.sampled_from(list(PolicyMode)),
    st.integers(1, 4),
    st.lists(st.sampled_from(["S1", "S2"]), max_size=2, unique=True),
)
def test_deciding_again_on_the_same_facts_issues_nothing(
    row: list[HealthKind], mode: PolicyMode, accum: int, spares: list[str]
) -> None:
    health = {
        r: RankHealth(rank=r, kind=k, reason="x", for_s=100.0, device=f"GPU-{r}") for r, k in enumerate(row)
    }
    s = snap(world=len(row), grad_accum_steps=accum, hot_spares=tuple(spares))
    first = decide(s, health, HealthPolicy(mode=mode))
    again = decide(s.after(first, health), health, HealthPolicy(mode=mode))
    assert again == []
    for a in first:
        if isinstance(a, Restart):
            assert 1 <= a.world_size <= len(row)
            assert a.steps_lost >= 0
        if isinstance(a, SetGradAccum):
            assert a.new * (len(row) - sum(k is SICK for k in row)) == accum * len(row)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "reboot"}, "mode='reboot' rejected: expected one of reconfigure, pause, alert"),
        ({"dead_after_s": -1}, "dead_after_s=-1 rejected: must be a finite number > 0"),
        ({"straggler_factor": 0.5}, "straggler_factor=0.5 rejected"),
        (
            {"hung_after_s": 30, "hung_restart_after_s": 10},
            "hung_restart_after_s=10 rejected: must be >= hung_after_s=30",
        ),
    ],
)
def test_policy_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_name_is_checked_and_mode_strings_convert() -> None:
    with pytest.raises(
        ValueError, match="policy='panic' rejected: expected one of reconfigure, pause, alert"
    ):
        decide(snap(), fleet(4), "panic")
    assert HealthPolicy(mode="pause").mode is PolicyMode.PAUSE  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 0}, "world_size=0 rejected: must be >= 1"),
        ({"grad_accum_steps": 0}, "grad_accum_steps=0 rejected: must be >= 1"),
        ({"latest_checkpoint_step": 120}, r"latest_checkpoint_step=120 rejected: must be in \[0, step=100\]"),
        ({"step": -1, "latest_checkpoint_step": None}, "step=-1 rejected: must be >= 0"),
    ],
)
def test_snapshot_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        snap(**kwargs)


def test_policy_classify_uses_its_thresholds() -> None:
    from weaver.health_policy import RankView

    policy = HealthPolicy(dead_after_s=5.0)
    health = policy.classify([RankView(rank=0, last_heartbeat_at=0.0, last_step_change_at=0.0)], 3.0)
    assert health[0].kind is HealthKind.HEALTHY


def test_rank_that_died_after_its_device_failed_does_not_get_it_back() -> None:
    health = {
        0: RankHealth(rank=0, kind=HealthKind.HEALTHY, device="GPU-0"),
        1: RankHealth(rank=1, kind=DEAD, reason="silent", device="GPU-1", device_healthy=False),
    }
    actions = decide(snap(world=2, grad_accum_steps=2), health, "reconfigure")
    restart = next(a for a in actions if isinstance(a, Restart))
    assert (restart.world_size, restart.exclude_devices, restart.from_step) == (1, ("GPU-1",), 80)
    assert (
        SetGradAccum(old=2, new=4, reason="keep the global batch of 4 micro-batches on 1 ranks instead of 2")
        in actions
    )


def test_fake_xid79_flows_from_probe_through_classify_to_a_restart() -> None:
    """The whole pure path: FakeNvml fault -> NvmlProbe sample -> RankView -> classify -> decide."""
    from threadlet.health import NvmlProbe
    from threadlet.nvml_fake import FakeNvml
    from weaver.health_policy import RankView

    fake = FakeNvml(device_count=2)
    fake.fail_at(100, xid=79, index=1)
    probes = [NvmlProbe(fake, index=i) for i in range(2)]
    fake.set_step(100)
    now = 50.0
    views = [
        RankView(rank=r, last_heartbeat_at=now, step=100, last_step_change_at=now, device=p.sample())
        for r, p in enumerate(probes)
    ]
    policy = HealthPolicy()
    health = policy.classify(views, now)
    assert health[1].kind is SICK and "XID 79: GPU has fallen off the bus" in health[1].reason
    s = snap(world=2, grad_accum_steps=1)
    actions = decide(s, health, policy)
    assert kinds(actions) == ["Alert", "CheckpointAt", "Restart", "SetGradAccum"]
    restart = actions[2]
    assert isinstance(restart, Restart)
    assert restart.exclude_devices == (fake.devices[1].uuid,) and restart.world_size == 1
    # The same facts one heartbeat later: nothing new is ordered.
    assert decide(s.after(actions, health), health, policy) == []
