"""The 'resumed' event of a restarted attempt: where it resumed and how many steps it lost."""

from __future__ import annotations

from tests.unit.factories import heartbeat
from torchloom.messages import CheckpointInfo, Heartbeat
from weaver import liveness
from weaver.model import WeaverState


def hb(rank: int, *, run: str, step: int) -> Heartbeat:
    return heartbeat(rank, run=run, step=step, inc=f"{run}-{rank}")  # each attempt is a new process


def _died_at(step: int, *, checkpoints: tuple[int, ...] = ()) -> WeaverState:
    state = WeaverState()
    for rank in (0, 1):
        liveness.observe_heartbeat(state, hb(rank, run="r1", step=step), 100.0)
    reg = state.jobs["j"].registry
    for seq, ck_step in enumerate(checkpoints, start=1):
        reg.checkpoints[f"ckpt-{seq}"] = CheckpointInfo(id=f"ckpt-{seq}", step=ck_step, seq=seq)
    return state


def _resumed(state: WeaverState, run: str, first_step: int) -> list[dict[str, str]]:
    effects = liveness.observe_heartbeat(state, hb(0, run=run, step=first_step), 110.0)
    return [dict(e.attrs) for e in effects.events if e.kind == "resumed"]


def test_resume_step_is_the_checkpoint_not_the_first_heartbeat() -> None:
    # The restarted attempt loaded ckpt at 27 and had trained 4 more steps by its first heartbeat.
    state = _died_at(40, checkpoints=(10, 27, 45))
    [attrs] = _resumed(state, "r1-a1", 31)
    assert (attrs["resume_step"], attrs["resume_checkpoint"], attrs["first_step"]) == ("27", "ckpt-2", "31")
    assert (attrs["step_at_death"], attrs["steps_lost"]) == ("40", "13")


def test_without_a_known_checkpoint_the_first_step_bounds_the_loss() -> None:
    [attrs] = _resumed(_died_at(40), "r1-a1", 31)
    assert (attrs["resume_step"], attrs["steps_lost"], attrs["resume_checkpoint"]) == ("31", "9", "")


def test_a_new_run_of_another_base_is_not_a_resume() -> None:
    assert _resumed(_died_at(40, checkpoints=(27,)), "r2", 0) == []


def test_a_resume_past_the_death_step_loses_nothing() -> None:
    [attrs] = _resumed(_died_at(30, checkpoints=(30,)), "r1-a1-a1", 32)
    assert attrs["steps_lost"] == "0"
