"""The join file of a multi-node run: what another node's `torchloom run --join FILE` needs to take part
in the first node's run without sharing its TORCHLOOM_HOME (docs/security.md, "Joining nodes").

The first node writes it (0600, in its run's private directory) once its job is registered: the NATS
URL, the job's threadlet credential (the ranks'), the launcher credential (the joining node's
supervisor), the weaver's public key (the ranks verify commands with it), the gRPC address and the
launcher's gRPC token. It names its job and run and expires; the first node removes it when its run
ends, and the job's threadlet credential is withdrawn then anyway.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torchloom import discovery, subjects
from torchloom.app import runs
from torchloom.credentials import Role
from torchloom.errors import TorchloomError
from torchloom.private_files import private_dir, read_private, write_private, write_private_json

JOIN_FORMAT = 1
JOIN_TTL_S = 24 * 3600.0  # a node joining a day later (an elastic replacement) needs a fresh file
JOIN_SUBDIR = "join"  # under the runs directory of the first node's TORCHLOOM_HOME
JOINED_SUBDIR = "joined"  # under the joining node's control plane directory: the credentials it took
EXPECTED_FORM = (
    'a JSON object {"format": 1, "job", "run_id", "expires_at_s", "nats_url", "threadlet_seed", '
    '"launcher_seed", "weaver_pubkey", "grpc", "grpc_token"}, as the first node\'s `torchloom run` '
    "writes it"
)
_SEED = re.compile(r"^SU[A-Z2-7]{56}$")
_PUBKEY = re.compile(r"^[0-9a-f]{64}$")


class JoinError(TorchloomError, ValueError):
    """A join file is open to others, malformed, expired, or of another job or run."""


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinInfo:
    """What a joining node takes from the first node (every field of the file but its format)."""

    job: str
    run_id: str
    expires_at_s: float
    nats_url: str
    threadlet_seed: str
    launcher_seed: str
    weaver_pubkey: str
    grpc: str
    grpc_token: str

    def __repr__(self) -> str:  # keep the secrets out of logs and tracebacks
        return f"JoinInfo(job={self.job!r}, run_id={self.run_id!r}, nats_url={self.nats_url!r}, ...)"


def join_path(job: str, run_id: str, home: Path | None = None) -> Path:
    """Where the first node writes the join file of `job`'s run `run_id`."""
    name = f"{subjects.check_token('job', job)}-{subjects.check_token('run id', run_id)}.json"
    return runs.runs_dir(home) / JOIN_SUBDIR / name


def write(info: JoinInfo, home: Path | None = None) -> Path:
    """Write the join file (0600 in a 0700 directory) and return its path."""
    path = join_path(info.job, info.run_id, home)
    private_dir(path.parent)
    return write_private_json(path, {"format": JOIN_FORMAT, **asdict(info)})


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _field(data: dict[str, object], name: str, kind: type, path: Path) -> object:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JoinError(f"join file {path} has no valid {name!r}: expected {EXPECTED_FORM}")
    return value


def read(
    path: str | Path, *, job: str | None = None, run_id: str | None = None, now: float | None = None
) -> JoinInfo:
    """Read and check a join file for this node.

    Args:
        job: the job this node was told to run (`--job`), if any: the file must be of it.
        run_id: the run id this node was told (`--run-id`, torchrun's `--rdzv-id`), if any.

    Raises:
        JoinError: the file is missing, readable by others (the message names its mode), not of
            the expected form, expired, or of another job or run.
    """
    p = Path(path).expanduser()
    text = read_private(p, "join file", error=JoinError)
    try:
        data = json.loads(text)
    except ValueError:
        raise JoinError(f"join file {p} is not JSON: expected {EXPECTED_FORM}") from None
    if not isinstance(data, dict) or data.get("format") != JOIN_FORMAT:
        raise JoinError(
            f"join file {p} is not a torchloom join file (format {JOIN_FORMAT}): expected {EXPECTED_FORM}"
        )
    strings = {
        n: str(_field(data, n, str, p))
        for n in (
            "job",
            "run_id",
            "nats_url",
            "threadlet_seed",
            "launcher_seed",
            "weaver_pubkey",
            "grpc",
            "grpc_token",
        )
    }
    expires = float(_field(data, "expires_at_s", (int, float), p))  # type: ignore[arg-type]
    try:
        subjects.check_token("job", strings["job"])
        subjects.check_token("run id", strings["run_id"])
        discovery.check_address(strings["grpc"])
    except ValueError as exc:
        raise JoinError(f"join file {p}: {exc}") from None
    for name, pattern, form in (
        ("threadlet_seed", _SEED, "an nkey user seed (SU...)"),
        ("launcher_seed", _SEED, "an nkey user seed (SU...)"),
        ("weaver_pubkey", _PUBKEY, "64 hex characters"),
    ):
        if not pattern.match(strings[name]):
            raise JoinError(f"join file {p} has a malformed {name!r}: expected {form}")
    info = JoinInfo(expires_at_s=expires, **strings)
    current = time.time() if now is None else now
    if current >= info.expires_at_s:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.expires_at_s))
        raise JoinError(
            f"join file {p} expired at {when}: take the one the first node's `torchloom run` writes "
            "now (it prints its path)"
        )
    if job is not None and job != info.job:
        raise JoinError(f"join file {p} is for job {info.job!r}, not {job!r}: use that job's join file")
    if run_id is not None and run_id != info.run_id:
        raise JoinError(
            f"join file {p} is for run {info.run_id!r} of job {info.job!r}, not run {run_id!r}: use the "
            "current run's join file (or the same --rdzv-id as the first node)"
        )
    return info


def take_credentials(info: JoinInfo, home: Path | None = None) -> Path:
    """Put the file's NATS credentials where this node's parties read them: a secrets directory
    (0700, seeds 0600) laid out as `python -m torchloom.credentials` makes one, for `--nats-creds`."""
    directory = private_dir(runs.controlplane_dir(home) / JOINED_SUBDIR / f"{info.job}-{info.run_id}")
    write_private(directory / f"{Role.LAUNCHER.value}.nk", info.launcher_seed + "\n")
    write_private(directory / f"{Role.THREADLET.value}-{info.job}.nk", info.threadlet_seed + "\n")
    return directory
