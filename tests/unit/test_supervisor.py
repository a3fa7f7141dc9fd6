"""Supervisor decisions without processes: torchrun options per attempt, devices, restart requests, env."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchloom import env
from torchloom.app.supervisor import (
    DISABLE_SHARED_STORE,
    attempt_env,
    checkpoint_dir,
    checkpoint_step,
    nproc_of,
    parse_restart,
    surviving_devices,
    with_nproc,
)
from torchloom.messages import JobEvent


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--standalone", "--nproc-per-node", "2"), ("--standalone", "--nproc-per-node", "1")),
        (("--nproc_per_node=2", "--max-restarts", "1"), ("--max-restarts", "1", "--nproc-per-node", "1")),
        ((), ("--nproc-per-node", "1")),
    ],
)
def test_with_nproc_replaces_or_adds(args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert with_nproc(args, 1) == expected
    assert nproc_of(expected) == 1


def test_with_nproc_rejects_empty_world() -> None:
    with pytest.raises(ValueError, match="at least 1 rank"):
        with_nproc((), 0)


def test_nproc_of() -> None:
    assert nproc_of(("--nproc-per-node", "4")) == 4
    assert nproc_of(("--nproc_per_node=3",)) == 3
    assert nproc_of(("--nproc-per-node", "gpu")) == 1


def test_surviving_devices_skip_the_failed_local_rank() -> None:
    assert surviving_devices(["0", "1", "2", "3"], {1}) == ["0", "2", "3"]
    assert surviving_devices(["3", "5"], {0}) == ["5"]


def _restart(**attrs: str) -> JobEvent:
    return JobEvent(job="j", run_id="r1", kind="restart", message="device 1 failed", attrs=attrs)


def test_parse_restart() -> None:
    req = parse_restart(
        _restart(
            world_size="1", exclude_ranks="1", grad_accum_steps="2", from_checkpoint="ckpt-3", steps_lost="0"
        )
    )
    assert (req.world_size, req.exclude_ranks, req.grad_accum_steps) == (1, frozenset({1}), 2)
    assert (req.checkpoint, req.steps_lost, req.reason) == ("ckpt-3", "0", "device 1 failed")
    assert parse_restart(
        _restart(world_size="2", checkpoint_path="/x/ckpt-3", from_checkpoint="ckpt-3")
    ).checkpoint == ("/x/ckpt-3")


@pytest.mark.parametrize(
    "attrs", [{"world_size": "0"}, {"world_size": "two"}, {"world_size": "1", "exclude_ranks": "a"}, {}]
)
def test_parse_restart_rejects_bad_attrs(attrs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="world_size"):
        parse_restart(_restart(**attrs))


def test_parse_restart_rejects_other_kinds() -> None:
    with pytest.raises(ValueError, match="expected 'restart'"):
        parse_restart(JobEvent(job="j", kind="rank_dead"))


def test_checkpoint_dir_layout(tmp_path: Path) -> None:
    assert (
        checkpoint_dir("j", "r1", "ckpt-3", {env.CHECKPOINT_DIR: str(tmp_path)}) == tmp_path / "j/r1/ckpt-3"
    )
    assert (
        checkpoint_dir("j", "r1", "ckpt-3", {env.HOME: str(tmp_path)}) == tmp_path / "checkpoints/j/r1/ckpt-3"
    )
    assert checkpoint_dir("j", "r1", "/abs/ckpt-3", {}) == Path("/abs/ckpt-3")


def test_checkpoint_step_reads_the_completion_marker(tmp_path: Path) -> None:
    assert checkpoint_step(tmp_path) is None
    (tmp_path / "torchloom-complete.json").write_text(json.dumps({"step": 31}))
    assert checkpoint_step(tmp_path) == 31


def test_attempt_env() -> None:
    base = {"PATH": "/bin", env.RESUME_FROM: "/old", env.KNOB_OVERRIDES: "{}"}
    out = attempt_env(
        base, run_id="r1-a1", base_run_id="r1", resume_from=Path("/c/ckpt-3"), grad_accum_steps=2
    )
    assert out[env.RUN_ID] == "r1-a1" and out[env.BASE_RUN_ID] == "r1"
    assert out[env.RESUME_FROM] == "/c/ckpt-3"
    assert json.loads(out[env.KNOB_OVERRIDES]) == {"grad_accum_steps": 2}
    assert out[DISABLE_SHARED_STORE] == "1" and "CUDA_VISIBLE_DEVICES" not in out
    plain = attempt_env(base, run_id="r1-a2", base_run_id="r1", devices=["0", "2"])
    assert env.RESUME_FROM not in plain and env.KNOB_OVERRIDES not in plain
    assert plain["CUDA_VISIBLE_DEVICES"] == "0,2"
