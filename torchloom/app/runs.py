"""The files under `$TORCHLOOM_HOME` that outlive a process: job leases, the run index and the lock.

A `torchloom run` holds a lease (`controlplane/leases/<run>-<pid>.json`) while its job runs; the
control plane lives while any lease's launcher is alive. The run index (`runs/<run>.json`) says where
each run's journal is stored, so `torchloom journal --run ID` finds it after the run. The lock orders
"start a control plane / register a lease" against "the control plane decides to exit".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchloom import discovery, private_files, subjects
from torchloom.errors import JobNotFound, TorchloomError

CONTROLPLANE_DIR = "controlplane"
LEASES_DIR = "leases"
RUNS_DIR = "runs"
LOCK_FILE = "lock"


def controlplane_dir(home: Path | None = None) -> Path:
    """`$TORCHLOOM_HOME/controlplane`: the control plane's state, log, leases and secrets."""
    return (home or discovery.home()) / CONTROLPLANE_DIR


def leases_dir(home: Path | None = None) -> Path:
    return controlplane_dir(home) / LEASES_DIR


def runs_dir(home: Path | None = None) -> Path:
    """`$TORCHLOOM_HOME/runs`: the run index (`<run>.json`) and the embedded servers' stores."""
    return (home or discovery.home()) / RUNS_DIR


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- leases ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """One running `torchloom run`: its job, run and launcher pid (the lease ends when the pid does)."""

    job: str
    run_id: str
    pid: int
    started_at_s: float = field(default_factory=time.time)

    @property
    def file_name(self) -> str:
        # Two launchers of one multi-node run share the run id: the pid keeps their leases apart.
        return f"{self.run_id}-{self.pid}.json"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lease:
        """Build from parsed JSON; raise ValueError naming the expected form."""
        try:
            lease = cls(
                job=subjects.check_token("job", str(data["job"])),
                run_id=subjects.check_token("run id", str(data["run_id"])),
                pid=int(data["pid"]),
                started_at_s=float(data.get("started_at_s") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"lease: {exc}; expected {{job, run_id, pid, started_at_s}}") from None
        return lease


def write_lease(lease: Lease, home: Path | None = None) -> Path:
    return private_files.write_private_json(leases_dir(home) / lease.file_name, asdict(lease))


def remove_lease(lease: Lease, home: Path | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        (leases_dir(home) / lease.file_name).unlink()


def read_leases(home: Path | None = None) -> list[Lease]:
    """Every well-formed lease file, oldest first (a malformed one is skipped)."""
    out: list[Lease] = []
    for path in sorted(leases_dir(home).glob("*.json")):
        data = _load(path)
        if data is None:
            continue
        with contextlib.suppress(ValueError):
            out.append(Lease.from_json(data))
    return sorted(out, key=lambda lease: lease.started_at_s)


def sweep_leases(home: Path | None = None) -> tuple[list[Lease], list[Lease]]:
    """Return (live, ended) leases; an ended one (its launcher pid is gone) is removed from disk."""
    live: list[Lease] = []
    ended: list[Lease] = []
    for lease in read_leases(home):
        if discovery.pid_alive(lease.pid):
            live.append(lease)
        else:
            ended.append(lease)
            remove_lease(lease, home)
    return live, ended


# ---- the run index ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """Where one run's history is stored.

    Attributes:
        run_id: the run (its restarted attempts are `<run_id>-a<N>`).
        job: the job name.
        store_dir: the embedded server's directory holding the JetStream store ("" with an
            external server: then the history is read from `nats_url`).
        nats_url: the server the run used.
        started_at_s / ended_at_s: wall-clock times (ended is None while it runs or if it crashed).
        exit_code: `torchloom run`'s exit status, once known.
        last_run_id: the last attempt's run id.
    """

    run_id: str
    job: str
    store_dir: str
    nats_url: str
    started_at_s: float = field(default_factory=time.time)
    ended_at_s: float | None = None
    exit_code: int | None = None
    last_run_id: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Build from parsed JSON; raise ValueError naming the expected form."""
        try:
            ended, code = data.get("ended_at_s"), data.get("exit_code")
            return cls(
                run_id=subjects.check_token("run id", str(data["run_id"])),
                job=subjects.check_token("job", str(data["job"])),
                store_dir=str(data.get("store_dir") or ""),
                nats_url=str(data.get("nats_url") or ""),
                started_at_s=float(data.get("started_at_s") or 0.0),
                ended_at_s=None if ended is None else float(ended),
                exit_code=None if code is None else int(code),
                last_run_id=str(data.get("last_run_id") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"run record: {exc}; expected {{run_id, job, store_dir, nats_url, ...}}"
            ) from None


def record_run(record: RunRecord, home: Path | None = None) -> Path:
    """Write (or rewrite) the run's index entry `runs/<run_id>.json`."""
    return private_files.write_private_json(runs_dir(home) / f"{record.run_id}.json", asdict(record))


def read_runs(home: Path | None = None) -> list[RunRecord]:
    """Every indexed run, oldest first."""
    out: list[RunRecord] = []
    for path in runs_dir(home).glob("*.json"):
        data = _load(path)
        if data is not None:
            with contextlib.suppress(ValueError):
                out.append(RunRecord.from_json(data))
    return sorted(out, key=lambda r: r.started_at_s)


def find_run(run_id: str | None, *, job: str = "", home: Path | None = None) -> RunRecord:
    """The indexed run `run_id` (or an attempt id of it), else the latest run (of `job`, if named).

    Raises:
        JobNotFound: no such run, naming the runs that are known.
    """
    runs = [r for r in read_runs(home) if not job or r.job == job]
    if run_id is None:
        if not runs:
            raise JobNotFound(
                f"no run{f' of job {job!r}' if job else ''} recorded in {runs_dir(home)}: "
                "start one with `torchloom run`"
            )
        return runs[-1]
    for record in reversed(runs):
        if run_id in (record.run_id, record.last_run_id):
            return record
    known = ", ".join(f"{r.run_id} ({r.job})" for r in runs[-10:]) or "none"
    raise JobNotFound(f"run {run_id!r} not found in {runs_dir(home)}; recorded runs (latest last): {known}")


# ---- the lock -----------------------------------------------------------------------------------------


class LockTimeout(TorchloomError, TimeoutError):
    """Another process held the control-plane lock for longer than the deadline."""


class ControlPlaneLock:
    """The flock on `controlplane/lock`; one per holder (not shared between threads)."""

    def __init__(self, home: Path | None = None) -> None:
        self.path = private_files.private_dir(controlplane_dir(home)) / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this holder has it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, private_files.PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def timeout(self, timeout_s: float) -> LockTimeout:
        return LockTimeout(
            f"the control-plane lock {self.path} stayed taken for {timeout_s:g}s: another torchloom "
            "process is starting or stopping a control plane"
        )


@contextlib.contextmanager
def locked(home: Path | None = None, *, timeout_s: float | None = 60.0) -> Iterator[bool]:
    """Hold the control-plane lock for the block; yields True.

    With `timeout_s=None` it does not wait: it yields False at once when another process holds it.

    Raises:
        LockTimeout: the lock stayed taken for `timeout_s`.
    """
    lock = ControlPlaneLock(home)
    deadline = time.monotonic() + (timeout_s or 0.0)
    while not lock.try_acquire():
        if timeout_s is None:
            yield False
            return
        if time.monotonic() >= deadline:
            raise lock.timeout(timeout_s)
        time.sleep(0.05)
    try:
        yield True
    finally:
        lock.release()
