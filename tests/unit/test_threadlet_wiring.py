"""The Threadlet facade over the knob board: validate hooks refuse at filing, attach(sampler=) registers
the sampler's knobs, and tl.clip_grad_ / tl.grad_accum_steps drive the training-loop knobs."""

from __future__ import annotations

import time

import pytest
import torch

import threadlet
from tests.unit.factories import local_config, set_config
from threadlet.data import MixtureSampler
from torchloom.errors import CommandRejected
from torchloom.messages import KnobValue


def _sampler() -> MixtureSampler:
    return MixtureSampler({"code": 10, "math": 20}, {"code": 1.0}, batch_size=8, seed=3)


def test_attach_with_sampler_registers_mix_and_batch_size() -> None:
    s = _sampler()
    with threadlet.attach(config=threadlet.ThreadletConfig(), sampler=s) as tl:
        assert {"mix", "batch_size"} <= set(tl._board.schema)
        specs = {k.name: k.value for k in tl._board.specs()}
        assert specs["mix"] == "code:1,math:0" and specs["batch_size"] == 8


def test_bad_mix_is_refused_at_filing_and_a_good_one_applies_at_the_next_boundary() -> None:
    s = _sampler()
    tl = threadlet.attach(config=local_config(), sampler=s)
    try:
        tl.step()
        now = time.time()
        tl._agreement.file(set_config(1, mix="code:x"), now)
        tl._agreement.file(set_config(2, mix="math:1", batch_size="4"), now)
        # Refused on receipt (bus thread), before any boundary.
        assert tl._agreement.inbox[1].refusal is not None and tl._agreement.inbox[2].refusal is None
        tl.step()
        tl.step()  # a round ends at a refused command; the next one is decided a boundary later
        assert [(a.seq, a.status) for a in tl.applied] == [(1, "rejected"), (2, "applied")]
        reason = tl.applied[0].reason
        assert reason.startswith("rank 0 refused: mix='code:x' rejected: expected NAME:WEIGHT,...")
        assert "known sources: code, math" in reason
        assert s.batch_size == 4 and {name for name, _ in s.next_batch()} == {"math"}
    finally:
        tl.close()


def test_user_knob_validate_hook_runs_before_apply() -> None:
    seen: list[KnobValue] = []

    def check(value: KnobValue) -> None:
        if not isinstance(value, str) or not value.startswith("x"):
            raise ValueError(f"tag={value!r} rejected: expected a string starting with 'x'")

    tl = threadlet.attach(config=local_config())
    try:
        tl.knob("tag", str, get=lambda: "x0", apply=seen.append, validate=check)
        with pytest.raises(CommandRejected, match="expected a string starting with 'x'"):
            tl._board.validate({"tag": "y"})
        tl._agreement.file(set_config(1, tag="y"), time.time())
        tl._agreement.file(set_config(2, tag="x1"), time.time())
        tl.step()
        tl.step()
        assert [a.status for a in tl.applied] == ["rejected", "applied"]
        assert seen == ["x1"]
    finally:
        tl.close()


def test_clip_grad_and_grad_accum_steps_follow_their_knobs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tl = threadlet.attach(model=model, optimizer=opt, config=local_config())
    try:
        assert "grad_clip_norm" not in tl._board.schema and "grad_accum_steps" not in tl._board.schema
        model(torch.full((2, 4), 100.0)).sum().backward()  # type: ignore[no-untyped-call]
        assert tl.clip_grad_(model.parameters()) is None  # 0 disables clipping
        assert tl.grad_accum_steps == 1
        assert {"grad_clip_norm", "grad_accum_steps"} <= set(tl._board.schema)
        tl._agreement.file(set_config(1, grad_clip_norm="0.5", grad_accum_steps="3"), time.time())
        tl.step()
        assert tl.applied[0].status == "applied", tl.applied
        assert tl.grad_accum_steps == 3 and tl.training.grad_clip_norm == 0.5
        before = tl.clip_grad_(model.parameters())
        assert before is not None and before > 0.5
        after = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
        assert float(after) == pytest.approx(0.5, rel=1e-4)
        tl._agreement.file(set_config(2, grad_accum_steps="0"), time.time())
        tl.step()
        assert tl.applied[1].status == "rejected" and "grad_accum_steps" in tl.applied[1].reason
        assert tl.grad_accum_steps == 3
    finally:
        tl.close()
