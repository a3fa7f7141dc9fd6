"""Ctrl-C ends a streaming command's process promptly however its shutdown goes
(`torchloom.app.interrupt.run_until_interrupted`, what `torchloom watch` runs under).

Each case is a real process that inherited SIGINT ignored (as a CI script's background job does)
and whose graceful end is made to hang; it must exit with the command's code, its output flushed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# A coroutine printing "ready" and then waiting forever; HANG is what its cancellation does.
_SCRIPT = """
import asyncio, signal, sys, time
from torchloom.app.interrupt import run_until_interrupted

async def main():
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        print("last line, not flushed")
        print("cancelled", file=sys.stderr, flush=True)
{hang}

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a non-interactive shell
raise SystemExit(run_until_interrupted(main(), code=0, grace_s={grace_s}))
"""

_HANGS = {
    # The loop's thread stuck in a call that never returns (a C call, a lock).
    "blocked": "        time.sleep(3600)",
    # A coroutine that swallows its cancellation and waits on.
    "ignores_cancel": textwrap.indent(
        "while True:\n    try:\n        await asyncio.sleep(3600)\n    except asyncio.CancelledError:\n"
        "        pass",
        "        ",
    ),
}


def _start(hang: str, grace_s: float, env: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}  # the flush is part of the test
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(hang=_HANGS[hang], grace_s=grace_s)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=10)
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of its output once it exits, within 30 s (no grace here is that long); killed if not."""
    try:
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


@pytest.mark.parametrize("hang", sorted(_HANGS))
def test_sigint_ends_a_hanging_shutdown_after_the_grace(hang: str, subprocess_env: dict[str, str]) -> None:
    proc = _start(hang, 1.0, subprocess_env)
    proc.send_signal(signal.SIGINT)
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert out == "last line, not flushed\n", (out, err)
    assert err == "cancelled\n"


def test_a_second_sigint_ends_it_at_once(subprocess_env: dict[str, str]) -> None:
    proc = _start("blocked", 3600.0, subprocess_env)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None and proc.stderr.readline() == "cancelled\n", _finish(proc)
    proc.send_signal(signal.SIGINT)  # an hour's grace: only this one can end it in time
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert out == "last line, not flushed\n", (out, err)
