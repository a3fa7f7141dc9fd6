"""Replay mode: the threadlet applies the commands of a replay file (torchloom.replay_file, named by
TORCHLOOM_REPLAY), each when the run reaches the same (branch, step) it was decided at, instead of
commands from the bus. Positions are predetermined and the same on every rank, so no agreement round
is needed.
"""

from __future__ import annotations

from torchloom.replay_file import ReplayEntry


class Schedule:
    """The replay's pending entries; hands out those due at a (branch, step) position, in seq order.

    Entries are applied strictly in seq order: an entry whose position is not reached holds back
    the ones after it, as a live run decides commands in seq order.
    """

    def __init__(self, entries: list[ReplayEntry]) -> None:
        self._entries = sorted(entries, key=lambda e: e.seq)
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._entries) - self._next

    def due(self, branch: str, step: int) -> list[ReplayEntry]:
        """Pop the entries decided at (`branch`, `step`): the run is at that position now."""
        out: list[ReplayEntry] = []
        while self._next < len(self._entries):
            entry = self._entries[self._next]
            if entry.branch != branch or entry.step != step:
                break
            out.append(entry)
            self._next += 1
        return out
