"""The weaver's health wiring: transitions become events once, and policy decisions become plans."""

from __future__ import annotations

from typing import Any

from tests.unit.factories import heartbeat
from torchloom.messages import ActionKind, DeviceHealth, Heartbeat, JobEvent, RankState
from weaver import health_plan, liveness
from weaver.config import WeaverConfig
from weaver.health_policy import HealthPolicy, Phase, PolicyMode
from weaver.model import WeaverState


def hb(rank: int, step: int, *, tick: int | None = None, **kw: Any) -> Heartbeat:
    """A heartbeat at `step` whose tick follows the step unless given."""
    return heartbeat(rank, step=step, tick=step if tick is None else tick, **{"step_time_s": 0.1, **kw})


def policy(mode: PolicyMode = PolicyMode.ALERT) -> HealthPolicy:
    return HealthPolicy(mode=mode, dead_after_s=1.0, hung_after_s=5.0, hung_restart_after_s=60.0)


def kinds(effects: health_plan.HealthEffects) -> list[tuple[str, str]]:
    return [(e.kind, e.attrs.get("rank", e.attrs.get("action", ""))) for e in effects.events]


def beat(s: WeaverState, now: float, steps: tuple[int, int], **kw: object) -> None:
    for rank, step in enumerate(steps):
        liveness.observe_heartbeat(s, hb(rank, step, **kw), now)  # type: ignore[arg-type]


def test_frozen_step_is_hung_then_recovers() -> None:
    s = WeaverState()
    beat(s, 0.0, (1, 1))
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        liveness.observe_heartbeat(s, hb(0, int(t) + 1), t)  # rank 0 progresses
        liveness.observe_heartbeat(s, hb(1, 1), t)  # rank 1 heartbeats with a frozen step
    effects = health_plan.check_health(s, 6.0, policy())
    assert kinds(effects) == [("rank_hung", "1"), ("health_action", "Alert")]
    assert "step 1 unchanged for 6.0 s (limit 5 s)" in effects.events[0].attrs["reason"]
    status = liveness.job_status(s.jobs["j"], 6.0, policy())
    assert [(r.health, r.alive) for r in status.ranks] == [("healthy", True), ("hung", True)]
    assert "unchanged" in status.ranks[1].health_reason
    assert health_plan.check_health(s, 6.1, policy()).events == ()  # reported once, alerted once
    liveness.observe_heartbeat(s, hb(1, 2), 6.5)
    assert kinds(health_plan.check_health(s, 6.5, policy())) == [("rank_recovered", "1")]


def test_rollback_rewinding_the_step_is_progress() -> None:
    s = WeaverState()
    beat(s, 0.0, (10, 10))
    for t in range(1, 8):
        # Step goes back after a rollback, but tick keeps counting: not hung.
        beat(s, float(t), (5, 5), tick=10 + t)
    assert [e.kind for e in health_plan.check_health(s, 7.0, policy()).events] == []


def test_paused_rank_is_not_hung_and_resume_restarts_the_clock() -> None:
    s = WeaverState()
    beat(s, 0.0, (3, 3), state=RankState.PAUSED)
    for t in range(1, 8):
        beat(s, float(t), (3, 3), state=RankState.PAUSED)
    assert health_plan.check_health(s, 7.0, policy()).events == ()
    beat(s, 8.0, (3, 3))
    assert health_plan.check_health(s, 8.0, policy()).events == ()


def test_straggler_and_unhealthy_device_events() -> None:
    s = WeaverState()
    bad = DeviceHealth(kind="cuda", device="GPU-1", healthy=False, unhealthy_reason="XID 79")
    liveness.observe_heartbeat(s, hb(0, 1, step_time_s=0.1), 0.0)
    liveness.observe_heartbeat(s, hb(1, 1, step_time_s=0.5), 0.0)
    effects = health_plan.check_health(s, 0.0, policy())
    assert kinds(effects)[0] == ("rank_straggler", "1")
    liveness.observe_heartbeat(s, hb(0, 2, step_time_s=0.1, device=bad), 0.5)
    effects = health_plan.check_health(s, 0.5, policy())
    unhealthy = [e for e in effects.events if e.kind == "device_unhealthy"]
    assert [(e.attrs["rank"], e.attrs["device"]) for e in unhealthy] == [("0", "GPU-1")]
    assert "XID 79" in unhealthy[0].attrs["reason"]
    assert effects.plans == ()  # alert mode: events only


def test_pause_policy_pauses_once_through_a_rule_command() -> None:
    s = WeaverState()
    beat(s, 0.0, (1, 1))
    liveness.observe_heartbeat(s, hb(0, 1), 2.0)
    effects = health_plan.check_health(s, 2.0, policy(PolicyMode.PAUSE))
    assert ("rank_dead", "1") in kinds(effects)
    (plan,) = effects.plans
    (req,) = plan.submits
    assert req.issuer == health_plan.HEALTH_ISSUER and req.body.kind is ActionKind.PAUSE  # type: ignore[union-attr]
    assert plan.restart is None and s.jobs["j"].phase is Phase.PAUSED
    liveness.observe_heartbeat(s, hb(0, 1), 2.5)
    assert health_plan.check_health(s, 2.5, policy(PolicyMode.PAUSE)).plans == ()


def test_reconfigure_on_unhealthy_device_checkpoints_then_requests_a_restart() -> None:
    s = WeaverState()
    beat(s, 0.0, (4, 4))
    bad = DeviceHealth(kind="cuda", device="GPU-1", healthy=False, unhealthy_reason="XID 79")
    liveness.observe_heartbeat(s, hb(0, 4, device=DeviceHealth(kind="cuda", device="GPU-0")), 0.5)
    liveness.observe_heartbeat(s, hb(1, 4, device=bad), 0.5)
    effects = health_plan.check_health(s, 0.5, policy(PolicyMode.RECONFIGURE))
    (plan,) = effects.plans
    assert [r.body.kind for r in plan.submits] == [ActionKind.CHECKPOINT]  # type: ignore[union-attr]
    req = plan.restart
    assert req is not None and (req.job, req.run_id) == ("j", s.jobs["j"].run_id)
    assert req.exclude_ranks == (1,) and req.world_size == 1 and req.grad_accum_steps == 2
    assert req.checkpoint_id == ""  # filled in by the service from the checkpoint it takes
    human = health_plan.restart_event(req)
    assert human.kind == "restart" and human.attrs["exclude_ranks"] == "1"
    assert {e.attrs.get("action") for e in effects.events if e.kind == "health_action"} >= {
        "CheckpointAt",
        "Restart",
        "SetGradAccum",
    }
    assert s.jobs["j"].phase is Phase.CHECKPOINTING
    assert health_plan.check_health(s, 0.6, policy(PolicyMode.RECONFIGURE)).plans == ()


def test_config_builds_the_policy() -> None:
    p = WeaverConfig(hung_after_s=2.0, straggler_factor=3.0, health_policy="pause").policy()
    assert (p.mode, p.hung_after_s, p.straggler_factor, p.dead_after_s) == (PolicyMode.PAUSE, 2.0, 3.0, 0.8)


def stopping_event(run: str = "r1", kind: str = "run_stopping", job: str = "j") -> JobEvent:
    return JobEvent(
        job=job, run_id=run, kind=kind, message="SIGTERM on the launcher", attrs={"signal": "SIGTERM"}
    )


def test_a_stopping_run_gets_no_restart_checkpoint_pause_or_alert() -> None:
    s = WeaverState()
    beat(s, 0.0, (4, 4))
    noted = health_plan.note_stopping(s, stopping_event(), 0.1)
    assert noted is not None and noted.kind == health_plan.HEALTH_STANDING_DOWN
    assert noted.attrs["signal"] == "SIGTERM" and "no restart" in noted.message
    assert s.jobs["j"].phase is Phase.STOPPING
    # Both ranks go silent as the run ends: dead, but nothing is ordered under any policy.
    for mode in PolicyMode:
        decision = health_plan.decide_health(s, 5.0, policy(mode))
        assert decision.effects.plans == (), mode
        assert not [e for e in decision.effects.events if e.kind == "health_action"], mode
    effects = health_plan.check_health(s, 5.0, policy(PolicyMode.RECONFIGURE))
    assert ("rank_dead", "0") in kinds(effects)  # the transitions are still reported as they are
    assert s.jobs["j"].phase is Phase.STOPPING
    # A plan under way when the stop came cannot move the run out of stopping.
    health_plan.set_phase(s, "j", "r1", Phase.RESTARTING)
    assert health_plan.is_stopping(s, "j", "r1") and s.jobs["j"].phase is Phase.STOPPING
    assert health_plan.note_stopping(s, stopping_event(), 5.1) is None  # journaled once


def test_the_same_dead_rank_without_a_stop_gets_a_restart() -> None:
    """The control for the test above: the decision differs only by the stop."""
    s = WeaverState()
    beat(s, 0.0, (4, 4))
    effects = health_plan.check_health(s, 5.0, policy(PolicyMode.RECONFIGURE))
    assert [p.restart is not None for p in effects.plans] == [True]


def test_only_a_stop_of_the_current_run_or_its_attempt_counts() -> None:
    s = WeaverState()
    beat(s, 0.0, (4, 4))
    assert health_plan.note_stopping(s, stopping_event(kind="reconfigure_stopping"), 0.1) is None
    assert health_plan.note_stopping(s, stopping_event(run="r0"), 0.1) is None  # another run
    assert health_plan.note_stopping(s, stopping_event(job="other"), 0.1) is None  # unknown job
    assert s.jobs["j"].phase is Phase.IDLE
    assert health_plan.note_stopping(s, stopping_event(run="r1-a1"), 0.1) is not None  # a relaunch of it
    assert health_plan.is_stopping(s, "j", "r1")
