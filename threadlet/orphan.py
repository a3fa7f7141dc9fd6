"""A rank whose torchrun agent died ends instead of training on unsupervised.

torchrun starts every worker in a session of its own and sets no parent-death signal, so when its
elastic agent is killed (SIGKILL, the OOM killer, a node drain that kills only the agent), its ranks
are re-parented and train on: nobody will collect their exit, restart them or stop them, they hold
their devices, and a launcher that comes back cannot know about them. The watch is a daemon thread
that compares the rank's parent pid, once a second, with the agent's pid at attach; when the agent is
gone it says so on stderr and ends the process with `EXIT_ORPHANED`. It never touches the training
thread (no lock, no collective), so it ends a rank blocked in a collective as well.

Armed only for a rank of a torchrun job (TORCHELASTIC_RUN_ID set) that torchloom steers (not local
mode), whose parent is not init already.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping

AGENT_ENV = "TORCHELASTIC_RUN_ID"  # torchrun's elastic agent sets it on every worker
EXIT_ORPHANED = 75  # EX_TEMPFAIL: the job can be started again from its last checkpoint
POLL_S = 1.0


class OrphanWatch:
    """Ends this process (`exit`) once its parent is no longer `agent_pid`.

    Args:
        agent_pid: the parent at attach (the torchrun agent).
        rank: for the message.
        poll_s: how often the parent is looked at.
        exit: how the process ends (os._exit: no atexit hook may block on a dead job's collective).
        parent: how the current parent pid is read.
    """

    def __init__(
        self,
        agent_pid: int,
        *,
        rank: int,
        poll_s: float = POLL_S,
        exit: Callable[[int], object] = os._exit,
        parent: Callable[[], int] = os.getppid,
    ) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s={poll_s!r} rejected: must be a positive number of seconds")
        self.agent_pid = agent_pid
        self.rank = rank
        self._poll_s = poll_s
        self._exit = exit
        self._parent = parent
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchloom-orphan-watch", daemon=True)

    def start(self) -> OrphanWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._poll_s):
            if self._parent() != self.agent_pid:
                print(
                    f"torchloom: rank {self.rank}: its torchrun agent (pid {self.agent_pid}) is gone; "
                    f"exiting with {EXIT_ORPHANED} rather than training on with nobody to stop, "
                    "restart or collect it (start the job again: it resumes from its last checkpoint)",
                    file=sys.stderr,
                    flush=True,
                )
                self._exit(EXIT_ORPHANED)
                return


def watch_if_supervised(environ: Mapping[str, str], *, rank: int) -> OrphanWatch | None:
    """Start a watch when this process is a torchrun worker whose agent is alive; else None."""
    parent = os.getppid()
    if AGENT_ENV not in environ or parent <= 1:
        return None
    return OrphanWatch(parent, rank=rank).start()
