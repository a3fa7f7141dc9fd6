"""Actions on a world-size-1 threadlet (decided locally at the next boundary): checkpoint, rollback
with a new branch and a rewound `tl.range`, eval detail, stop, and the local refusals."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import threadlet
from tests.unit.factories import JOB, RUN, action, local_config, set_config
from torchloom.messages import ActionKind


def test_checkpoint_rollback_eval_stop_on_one_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = local_config()
    tl = threadlet.attach(model=model, optimizer=opt, config=cfg, checkpoint_dir=str(tmp_path))
    seen: list[tuple[str, int, float]] = []
    # Commands are filed just before the boundary of the step named here (as the link thread would).
    plan = {
        3: [action(1, ActionKind.CHECKPOINT, tag="t")],
        5: [set_config(2, lr=0.5), action(3, ActionKind.EVAL)],
        6: [action(4, ActionKind.ROLLBACK, checkpoint="t", checkpoint_id="ckpt-1")],
        8: [
            action(5, ActionKind.DATA_ADD, name="x", path="/nope"),
            action(6, ActionKind.FAULT_INJECT, rank="0", xid="79"),
        ],
        9: [action(7, ActionKind.STOP)],
    }
    try:
        for step in tl.range(100):
            with torch.no_grad():
                seen.append((tl.branch, step, float(model.weight.sum())))
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if step == 5:
                tl.on_eval(lambda: {"loss": 0.25})
            for cmd in plan.get(step, []) if tl.branch == "main" or step >= 8 else []:
                tl._agreement.file(cmd, time.time())
            tl.step()
        assert tl.should_stop
        got = {a.seq: a for a in tl.applied}
        assert [(a.seq, a.status) for a in tl.applied] == [
            (1, "applied"), (2, "applied"), (3, "applied"), (4, "applied"),
            (5, "rejected"), (6, "rejected"), (7, "applied"),
        ]  # fmt: skip
        ck = got[1].detail
        assert ck == {
            "checkpoint_id": "ckpt-1",
            "checkpoint_tag": "t",
            "checkpoint_path": str(tmp_path / JOB / RUN / "ckpt-1"),
            "checkpoint_step": "4",
            "branch": "main",
            **{f"{part}_saved": "true" for part in ("model", "optimizer", "rng")},
            **{f"{part}_saved": "false" for part in ("scheduler", "data_position")},
        }
        assert got[3].detail == {"eval.loss": "0.25"}
        assert got[4].detail == {
            "branch": "b4",
            "parent_branch": "main",
            "from_checkpoint": "ckpt-1",
            "fork_step": "4",
            **{f"{part}_restored": "true" for part in ("model", "optimizer", "rng")},
            **{f"{part}_restored": "false" for part in ("scheduler", "data_position")},
        }
        assert (got[4].branch, got[4].step) == ("main", 7)  # decided where the run was
        assert "no data sampler attached" in got[5].reason
        assert "fault injection is disabled" in got[6].reason
        assert got[7].detail["checkpoint_id"] == "ckpt-7" and got[7].branch == "b4"
        # tl.range ends the loop itself: the stop does not end the process.
        assert (got[7].detail["handled_by_loop"], got[7].detail["exits_at_next_step"]) == ("true", "false")
        # The loop resumed at the checkpoint's step with the checkpoint's weights and lr.
        main4 = next(w for b, s, w in seen if (b, s) == ("main", 4))
        assert ("b4", 4, main4) in seen
        # A refused command holds back the ones after it for a round: the stop lands one step later.
        assert [s for b, s, _ in seen if b == "b4"] == [4, 5, 6, 7, 8, 9, 10]
        assert opt.param_groups[0]["lr"] == 0.1
        assert tl.step_count == 11 and tl.tick == 14 and got[7].detail["checkpoint_step"] == "11"
    finally:
        tl.close()


def test_rollback_to_a_missing_checkpoint_is_refused_with_the_path(tmp_path: Path) -> None:
    cfg = local_config()
    with threadlet.attach(model=nn.Linear(1, 1), config=cfg, checkpoint_dir=str(tmp_path)) as tl:
        tl.step()
        tl._agreement.file(
            action(1, ActionKind.ROLLBACK, checkpoint="ckpt-9", checkpoint_id="ckpt-9"), time.time()
        )
        tl.step()
        missing = tmp_path / JOB / RUN / "ckpt-9"
        assert (
            tl.applied[0].reason == f"rank 0 refused: checkpoint path {missing} does not exist on this rank"
        )
        assert tl.branch == "main" and tl.step_count == 2


def test_a_value_replaced_at_the_same_boundary_says_no_step_used_it() -> None:
    """Three `set`s decided at one boundary: the optimizer ends with the last one's values, and the
    earlier ones' acks say which of their keys a later one replaced (a tester's six concurrent sets
    were each acked 'lr in effect' though only the last was ever used)."""
    model = nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    tl = threadlet.attach(model=model, optimizer=opt, config=local_config())
    try:
        tl.step()
        for cmd in (
            set_config(1, lr=0.01, weight_decay=0.5),
            set_config(2, lr=0.02),
            set_config(3, weight_decay=0.25),
        ):
            tl._agreement.file(cmd, time.time())
        tl.step()
        assert len({a.step for a in tl.applied}) == 1  # one boundary
        got = {a.seq: a.detail.get("superseded_by") for a in tl.applied}
        assert got == {1: "lr by #2, weight_decay by #3", 2: None, 3: None}
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.02, 0.25)
    finally:
        tl.close()
