"""Ctrl-C ends a streaming CLI command (`torchloom watch`) promptly, however its shutdown goes.

The command owns SIGINT while it runs, whatever the process inherited: a background job of a
non-interactive shell (a CI script's `make test &`) starts with SIGINT ignored, and `asyncio.run`
then installs no handler, so a Ctrl-C or `kill -INT` was lost and the watch streamed on. The first
SIGINT cancels the command's coroutine for a graceful end; a daemon thread gives that end (closing
the gRPC channel, asyncio's shutdown, the interpreter's exit) `grace_s` and then flushes the output
and exits the process with the command's code. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from types import FrameType
from typing import Any

# What a graceful end may take after Ctrl-C before the process exits without it: closing a gRPC
# channel and asyncio's shutdown take milliseconds; a user pressing Ctrl-C expects the prompt back.
INTERRUPT_GRACE_S = 2.0
# How long the forced exit waits for stdout/stderr to flush (a reader that stopped reading must not
# keep the process alive).
_FLUSH_S = 0.5


def _flush_and_exit(code: int) -> None:
    flusher = threading.Thread(target=_flush, name="torchloom-interrupt-flush", daemon=True)
    flusher.start()
    flusher.join(_FLUSH_S)
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        # Closed, or its lock held by a thread that will not let go: nothing more gets out.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            stream.flush()


class _Interrupt:
    """The SIGINT handler of one `run_until_interrupted` call, and its watchdog."""

    def __init__(self, grace_s: float, code: int) -> None:
        self.grace_s = grace_s
        self.code = code
        self.count = 0
        self._target: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        # A Python signal handler runs in the main thread between bytecodes, possibly inside the
        # event loop's own code: only the thread-safe call touches the loop.
        self.count += 1
        if self.count > 1:
            _flush_and_exit(self.code)
        threading.Thread(target=self._watchdog, name="torchloom-interrupt-watchdog", daemon=True).start()
        if self._target is not None:
            loop, task = self._target
            with contextlib.suppress(RuntimeError):  # the loop has closed: the command has ended
                loop.call_soon_threadsafe(task.cancel)

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace_s)
        _flush_and_exit(self.code)

    async def run(self, main: Coroutine[Any, Any, None]) -> None:
        task = asyncio.current_task()
        assert task is not None, "run() is the task asyncio.run made"
        self._target = (asyncio.get_running_loop(), task)
        if self.count:  # Ctrl-C came before the loop started: do not begin
            main.close()
            return
        try:
            await main
        except asyncio.CancelledError:
            if not self.count:
                raise
            task.uncancel()  # cancelled by Ctrl-C: how the command is meant to end


def run_until_interrupted(
    main: Coroutine[Any, Any, None], *, code: int = 0, grace_s: float = INTERRUPT_GRACE_S
) -> int:
    """Run `main` in a new event loop until it returns or SIGINT ends it; return `code`.

    SIGINT ends it even where the process inherited SIGINT ignored, and SIGINT ends the process:
    after the first one, a process still alive `grace_s` later (the coroutine ignored its
    cancellation, or the loop's or the interpreter's shutdown hangs) flushes stdout and stderr and
    exits with `code`; a second SIGINT does so at once. For a command's entry point only; call it
    from the main thread, where signals are handled.

    Raises:
        ValueError: `grace_s` is not a positive number of seconds, or this is not the main thread.
        Exception: whatever `main` raises (the watchdog is armed only by SIGINT).
    """
    if not (math.isfinite(grace_s) and grace_s > 0):
        raise ValueError(f"grace_s={grace_s!r} rejected: must be a positive number of seconds")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("run_until_interrupted must run in the main thread (it handles SIGINT)")
    interrupt = _Interrupt(grace_s, code)
    previous = signal.signal(signal.SIGINT, interrupt.handle)
    try:
        asyncio.run(interrupt.run(main))
    finally:
        signal.signal(signal.SIGINT, previous)
    return code
