"""TensorBoard: every command a threadlet decided, written beside the user's own scalars, so the charts
show where an lr was set, a checkpoint taken or a rollback made.

Give it the `torch.utils.tensorboard.SummaryWriter` the script already logs with (the `tensorboard`
package, extra `torchloom[tensorboard]`); this module imports neither, it only calls the writer's
`add_text` and `add_scalar`. Call `write(tl.applied)` after `tl.step()` (or now and then: the
threadlet's `applied` list only grows, and each command is written once, at the step it was decided)::

    writer = SummaryWriter(log_dir)
    commands = TensorBoardCommands(writer)
    for step in tl.range(steps):
        ...
        writer.add_scalar("loss", loss, step)
        tl.step(loss=loss)
        commands.write(tl.applied)

Every rank decides the same commands at the same steps, so writing from rank 0 (where the writer
usually lives) shows them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

from threadlet.integrations.common import LOG_PREFIX, CommandLog
from threadlet.state import Decided
from torchloom.messages import AckStatus

__all__ = ["TEXT_TAG", "TensorBoardCommands", "describe"]

TEXT_TAG = f"{LOG_PREFIX}commands"


class SummaryWriterLike(Protocol):
    """What of `torch.utils.tensorboard.SummaryWriter` is used."""

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None: ...


def describe(decided: Decided) -> str:
    """One line for a decided command: `seq 3 applied: set lr=0.01 (command c1)`, or the refusal."""
    if decided.kind == "set":
        what = "set " + " ".join(f"{k}={_value(v)}" for k, v in decided.values.items())
    else:
        args = " ".join(f"{k}={v}" for k, v in decided.args.items())
        what = f"{decided.kind} {args}".rstrip()
    line = f"seq {decided.seq} {decided.status.value}: {what}"
    if decided.status is not AckStatus.APPLIED and decided.reason:
        line += f" ({decided.reason})"
    if decided.branch:
        line += f" on branch {decided.branch}"
    detail = {k: v for k, v in decided.detail.items() if k != "checkpoint_path"}
    if detail:
        line += f"; {json.dumps(detail, sort_keys=True)}"
    return line


def _value(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class TensorBoardCommands:
    """Writes a threadlet's decided commands into a TensorBoard writer, each once.

    Per command: a text entry under `TEXT_TAG` (`describe`) and the scalars of `common.CommandLog`
    (`torchloom/set/<knob>` = the value set, `torchloom/<action>` = seq, `torchloom/rejected` = seq),
    all at the step the command was decided.

    Args:
        writer: the script's SummaryWriter.
        text_tag: the tag of the text entries.
    """

    def __init__(self, writer: SummaryWriterLike, *, text_tag: str = TEXT_TAG) -> None:
        self._writer = writer
        self._text_tag = text_tag
        self._seen = 0

    def write(self, applied: Sequence[Decided]) -> int:
        """Write what was decided since the last call; returns how many commands that was.

        Args:
            applied: the threadlet's `applied` list (`tl.applied`).
        """
        new = applied[self._seen :]
        self._seen = len(applied)
        for decided in new:
            self._writer.add_text(self._text_tag, describe(decided), global_step=decided.step)
            for tag, number in CommandLog().row([decided]).items():
                self._writer.add_scalar(tag, number, global_step=decided.step)
        return len(new)
