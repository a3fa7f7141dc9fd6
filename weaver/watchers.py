"""A subscriber to the weaver's live feed (`Weaver.watch`): a bounded queue that drops the oldest
events, so a slow reader (a gRPC stream, a page) never blocks the weaver that pushes to it."""

from __future__ import annotations

import asyncio
import collections
from typing import Self

from torchloom.messages import WatchEvent

__all__ = ["Watcher"]


class Watcher:
    """One subscriber to the weaver's live feed, with a bounded queue that drops the oldest events.

    Iterate it with `async for`; it ends when the weaver closes or `close()` is called.
    """

    def __init__(self, job: str, maxlen: int) -> None:
        self.job = job
        self.dropped = 0
        self._queue: collections.deque[WatchEvent] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._closed = False

    def push(self, ev: WatchEvent) -> None:
        if self._closed or (self.job and ev.job != self.job):
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(ev)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()
