"""Resume at start: run ids per attempt, latest complete checkpoint, knob overrides, the resume plan."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from threadlet import resume
from torchloom import env, layout, naming
from torchloom.errors import CommandRejected
from torchloom.messages import KnobSpec, KnobType


def _ckpt(root: Path, run: str, seq: int, *, step: int | None, metadata: bool = True) -> Path:
    path = root / "job" / run / f"ckpt-{seq}"
    path.mkdir(parents=True)
    if metadata:
        (path / layout.DCP_METADATA).write_bytes(b"x")
    if step is not None:
        layout.mark_complete(path, step=step, branch="main", world_size=2)
    return path


@pytest.mark.parametrize(
    ("run_id", "count", "expected"),
    [("r1", 0, "r1"), ("r1", 1, "r1-a1"), ("r1", 3, "r1-a3"), ("r1-a1", 1, "r1-a1-a1")],
)
def test_effective_run_id(run_id: str, count: int, expected: str) -> None:
    assert resume.effective_run_id(run_id, {resume.RESTART_COUNT: str(count)}) == expected


@pytest.mark.parametrize(
    ("run_id", "base"), [("r1", "r1"), ("r1-a2", "r1"), ("r1-a1-a3", "r1"), ("a-b", "a-b")]
)
def test_base_run_id(run_id: str, base: str) -> None:
    assert naming.base_run_id(run_id) == base


def test_bad_restart_count_names_form() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        resume.restart_count({resume.RESTART_COUNT: "-1"})


def test_find_latest_picks_highest_complete_step_across_attempts(tmp_path: Path) -> None:
    _ckpt(tmp_path, "r1", 1, step=10)
    _ckpt(tmp_path, "r1-a1", 1, step=25)
    _ckpt(tmp_path, "r1-a1", 2, step=40, metadata=False)  # cut short: no DCP metadata
    _ckpt(tmp_path, "r1-a1", 3, step=None)  # cut short: no marker
    _ckpt(tmp_path, "r10", 1, step=99)  # another run whose id merely starts alike
    found = layout.find_latest(tmp_path, "job", "r1-a1-a1")
    assert found is not None
    assert (found.run_id, found.seq, found.step) == ("r1-a1", 1, 25)


def test_find_latest_none_without_complete_checkpoint(tmp_path: Path) -> None:
    assert layout.find_latest(tmp_path, "job", "r1") is None
    _ckpt(tmp_path, "r1", 1, step=None)
    assert layout.find_latest(tmp_path, "job", "r1") is None


def test_parse_overrides() -> None:
    assert resume.parse_overrides('{"grad_accum_steps": 2, "betas": [0.9, 0.99]}') == {
        "grad_accum_steps": 2,
        "betas": (0.9, 0.99),
    }
    assert resume.parse_overrides(None) == {}
    with pytest.raises(ValueError, match="expected a JSON object"):
        resume.parse_overrides("[1]")
    with pytest.raises(ValueError, match="finite number"):
        resume.parse_overrides('{"lr": null}')


def test_validate_overrides_like_a_command() -> None:
    schema = {"grad_accum_steps": KnobSpec(name="grad_accum_steps", type=KnobType.INT, min=1, max=1024)}
    assert resume.validate_overrides(schema, {"grad_accum_steps": 4}) == {"grad_accum_steps": 4}
    with pytest.raises(CommandRejected, match=env.KNOB_OVERRIDES):
        resume.validate_overrides(schema, {"grad_accum_steps": 0})
    with pytest.raises(CommandRejected, match="unknown knob"):
        resume.validate_overrides(schema, {"lr": 0.1})


def test_plan_fresh_supervisor_and_elastic(tmp_path: Path) -> None:
    fresh = resume.plan(root=tmp_path, job="job", run_id="r1", environ={})
    assert fresh.checkpoint is None and fresh.run_id == "r1" and fresh.source == ""

    given = _ckpt(tmp_path, "r1", 3, step=30)
    sup = resume.plan(
        root=tmp_path,
        job="job",
        run_id="r1-a1",
        environ={env.RESUME_FROM: str(given), env.KNOB_OVERRIDES: '{"grad_accum_steps": 2}'},
    )
    assert (sup.checkpoint, sup.source, sup.run_id) == (given, "supervisor", "r1-a1")
    assert sup.overrides == {"grad_accum_steps": 2}

    newer = _ckpt(tmp_path, "r1-a1", 1, step=45)
    elastic = resume.plan(
        root=tmp_path,
        job="job",
        run_id="r1-a1",
        environ={env.RESUME_FROM: str(given), resume.RESTART_COUNT: "1"},
    )
    assert (elastic.checkpoint, elastic.source, elastic.run_id) == (newer, "elastic", "r1-a1-a1")


def test_plan_rejects_incomplete_resume_from(tmp_path: Path) -> None:
    cut = _ckpt(tmp_path, "r1", 1, step=None)
    with pytest.raises(FileNotFoundError, match=layout.COMPLETE_MARKER):
        resume.plan(root=tmp_path, job="job", run_id="r1-a1", environ={env.RESUME_FROM: str(cut)})


def test_per_rank_source_falls_back_to_rank_0(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"rank0": '{"rng": 0}', "rank1": '{"rng": 1}', "threadlet": {"step": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)  # type: ignore[attr-defined]
    assert os.path.exists(tmp_path / layout.DCP_METADATA)
    assert [resume.per_rank_source(tmp_path, r) for r in (0, 1, 2)] == [0, 1, 0]
