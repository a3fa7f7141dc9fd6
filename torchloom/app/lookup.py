"""How a CLI command finds the weaver it talks to: `--grpc`, then TORCHLOOM_GRPC, then the discovery
file and the announcements of weavers started on their own (an active one and its standbys: the client
moves on from a standby to the one that serves); shared by every command so they fail with the same
help when none is running. While a running job's control plane is being restarted (no live weaver
announced, but a live lease of a `torchloom run`, whose keeper starts it again), a command waits for
it, bounded, instead of saying that no job runs."""

from __future__ import annotations

import asyncio
import sys
import time

from torchloom import discovery, env
from torchloom.app import runs
from torchloom.errors import WeaverUnavailable

NO_WEAVER_HELP = (
    "no weaver found: start a job with `torchloom run SCRIPT` (it starts one), `torchloom weaver` or "
    "`python -m weaver`, "
    "or point at one with --grpc HOST:PORT or TORCHLOOM_GRPC"
)
# How long a command without a --timeout of its own (status, journal, watch, ...) waits for the
# control plane of a running job to come back: a killed one is restarted within about 1.5 s.
RESTART_WAIT_S = 5.0
_POLL_S = 0.1  # how often the discovery file and the leases are looked at while waiting


def restarting_jobs(grpc: str | None) -> list[runs.Lease]:
    """The running jobs whose control plane a command looking up `grpc` waits for: the leases of
    `$TORCHLOOM_HOME` whose `torchloom run` is alive (its keeper restarts a control plane that is gone),
    when the address comes from there (no `grpc`, no TORCHLOOM_GRPC); else none. Read only: ended
    leases are the control plane's to sweep."""
    if grpc or env.get(env.GRPC_ADDR):
        return []
    return [lease for lease in runs.read_leases() if discovery.pid_alive(lease.pid)]


def _jobs(leases: list[runs.Lease]) -> str:
    """`job NAME (launcher pid N)`, or `jobs A (...), B (...)` for several."""
    named = ", ".join(f"{lease.job} (launcher pid {lease.pid})" for lease in leases)
    return f"job{'s' if len(leases) > 1 else ''} {named}"


def not_back_message(leases: list[runs.Lease], waited_s: float) -> str:
    """What a command says when the control plane of the running jobs `leases` did not come back."""
    return (
        f"the control plane of the running {_jobs(leases)} did not come back within {waited_s:g} s; "
        "the command was not sent"
    )


class _Search:
    """One lookup of the weaver, bounded by `wait_s` while a running job's control plane restarts."""

    def __init__(self, grpc: str | None, wait_s: float) -> None:
        self.grpc = grpc
        self.wait_s = wait_s
        self.deadline = time.monotonic() + wait_s
        self.told = False

    def attempt(self) -> str | None:
        """Return the weaver's address, or None to look again after a pause.

        Raises:
            WeaverUnavailable: no weaver and no running job (at once), or the running job's control
                plane was not back by the deadline.
            ValueError: the given or environment address is not HOST:PORT.
        """
        addr = discovery.resolve_grpc(self.grpc)
        if addr is not None:
            return addr
        leases = restarting_jobs(self.grpc)
        if not leases:
            raise WeaverUnavailable(NO_WEAVER_HELP)
        if time.monotonic() >= self.deadline:
            raise WeaverUnavailable(not_back_message(leases, self.wait_s))
        if not self.told:
            self.told = True
            print(
                f"torchloom: the control plane of the running {_jobs(leases)} is gone and being "
                f"restarted: waiting up to {self.wait_s:g} s for it",
                file=sys.stderr,
                flush=True,
            )
        return None


def weaver_address(grpc: str | None, *, wait_s: float | None = None) -> str:
    """Return the weaver's gRPC address: `grpc`, then TORCHLOOM_GRPC, then the live weavers of
    `$TORCHLOOM_HOME` (`discovery.resolve_grpc`: possibly several, comma-separated). While none is
    announced but a job runs (a live lease), wait for its control plane up to `wait_s` (default
    `RESTART_WAIT_S`), blocking: the callers look before they open any connection.

    Raises:
        WeaverUnavailable: when none is given and no live weaver announced itself (at once when no
            job runs, else after `wait_s`).
        ValueError: when the given or environment address is not HOST:PORT.
    """
    search = _Search(grpc, RESTART_WAIT_S if wait_s is None else wait_s)
    while True:
        addr = search.attempt()
        if addr is not None:
            return addr
        # A file poll: the launcher's keeper sends no event this process could wait on.
        time.sleep(_POLL_S)


async def find_weaver(grpc: str | None, *, wait_s: float) -> str:
    """`weaver_address` for a coroutine: the same lookup, waiting without blocking the event loop.

    Raises:
        WeaverUnavailable, ValueError: as `weaver_address`.
    """
    search = _Search(grpc, wait_s)
    while True:
        addr = search.attempt()
        if addr is not None:
            return addr
        await asyncio.sleep(_POLL_S)  # a file poll, as in weaver_address
