"""threadlet.integrations.tensorboard: decided commands written into a real SummaryWriter's event
file beside the user's scalars, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from threadlet.integrations.tensorboard import TEXT_TAG, TensorBoardCommands, describe
from threadlet.state import Decided
from torchloom.messages import AckStatus

tensorboard = pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

SET_LR = Decided(
    seq=1, command_id="c1", kind="set", status=AckStatus.APPLIED, step=5, branch="main", values={"lr": 0.01}
)
CHECKPOINT = Decided(
    seq=2,
    command_id="c2",
    kind="checkpoint",
    status=AckStatus.APPLIED,
    step=9,
    branch="main",
    args={"tag": "t1"},
    detail={"checkpoint_id": "ckpt-2", "checkpoint_path": "/secret/where"},
)
REFUSED = Decided(
    seq=3,
    command_id="c3",
    kind="rollback",
    status=AckStatus.REJECTED,
    step=9,
    branch="main",
    reason="no checkpoint t9",
    args={"checkpoint": "t9"},
)


def test_describe_says_what_was_decided() -> None:
    assert describe(SET_LR) == "seq 1 applied: set lr=0.01 on branch main"
    line = describe(CHECKPOINT)
    assert line.startswith("seq 2 applied: checkpoint tag=t1 on branch main; ")
    assert "ckpt-2" in line and "/secret/where" not in line
    assert describe(REFUSED) == "seq 3 rejected: rollback checkpoint=t9 (no checkpoint t9) on branch main"


def test_commands_are_written_once_beside_the_users_scalars(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    commands = TensorBoardCommands(writer)
    applied: list[Decided] = []
    for step in range(12):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
        if step == 5:
            applied.append(SET_LR)
        if step == 9:
            applied += [CHECKPOINT, REFUSED]
        commands.write(applied)
    assert commands.write(applied) == 0  # nothing new
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert len(events.Scalars("loss")) == 12
    assert [(e.step, e.value) for e in events.Scalars("torchloom/set/lr")] == [(5, pytest.approx(0.01))]
    assert [(e.step, e.value) for e in events.Scalars("torchloom/checkpoint")] == [(9, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("torchloom/rejected")] == [(9, 3.0)]
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{TEXT_TAG}/text_summary")
    ]
    assert [step for step, _ in texts] == [5, 9, 9]
    assert texts[0][1] == describe(SET_LR)
    assert texts[2][1].startswith("seq 3 rejected: rollback")
