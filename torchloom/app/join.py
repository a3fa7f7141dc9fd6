"""The join file of a multi-node run: what another node's `torchloom run --join FILE` needs to take part
in the first node's run without sharing its TORCHLOOM_HOME (docs/security.md, "Joining nodes").

The first node writes it (0600, in its run's private directory) once its job is registered: the NATS
URL, the job's threadlet credential (the ranks'), the launcher credential (the joining node's
supervisor), the weaver's public key (the ranks verify commands with it), the gRPC address and the
launcher's gRPC token, and, when the first node listens off loopback over TLS (`--listen HOST`), the
certificate of its private CA, which every client of the joining node trusts for those addresses. It
names its job and run and expires; the first node removes it when its run ends, and the job's
threadlet credential is withdrawn then anyway.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from torchloom import discovery, subjects, tls
from torchloom.app import runs
from torchloom.credentials import Role
from torchloom.errors import TorchloomError
from torchloom.private_files import private_dir, read_private, write_private, write_private_json
from weaver.grpc_api import is_loopback

JOIN_FORMAT = 2  # 2: tls_ca_pem (a format-1 reader must not drop the CA and speak plain NATS)
JOIN_TTL_S = 24 * 3600.0  # a node joining a day later (an elastic replacement) needs a fresh file
JOIN_SUBDIR = "join"  # under the runs directory of the first node's TORCHLOOM_HOME
JOINED_SUBDIR = "joined"  # under the joining node's control plane directory: the credentials it took
CA_FILE = "ca.pem"  # in that directory: the first node's CA, when it serves TLS
EXPECTED_FORM = (
    f'a JSON object {{"format": {JOIN_FORMAT}, "job", "run_id", "expires_at_s", "nats_url", '
    '"threadlet_seed", "launcher_seed", "weaver_pubkey", "grpc", "grpc_token", "tls_ca_pem"}, as the '
    "first node's `torchloom run` writes it"
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
    tls_ca_pem: str = ""  # the first node's CA (PEM) when it serves NATS and gRPC over TLS; "" on loopback

    @property
    def uses_tls(self) -> bool:
        """Whether the first node serves NATS and gRPC over TLS (off loopback)."""
        return bool(self.tls_ca_pem)

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
            "tls_ca_pem",
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
    _check_tls(strings, p)
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


def _check_tls(strings: dict[str, str], path: Path) -> None:
    """The CA, when there is one, is a PEM certificate and goes with a `tls://` NATS URL; without one
    both addresses are on loopback (a file never sends a node's secrets off the machine in clear)."""
    pem, url = strings["tls_ca_pem"], strings["nats_url"]
    if pem:
        try:
            tls.client_context(ca_pem=pem)
        except tls.TlsError:
            raise JoinError(
                f"join file {path} has a malformed 'tls_ca_pem': expected a PEM CA certificate"
            ) from None
        if not url.startswith("tls://"):
            raise JoinError(f"join file {path} carries a CA but its nats_url {url!r} is not tls://HOST:PORT")
        return
    hosts = {"nats_url": urlsplit(url).hostname or "", "grpc": strings["grpc"].rpartition(":")[0]}
    off = [f"{name} {strings[name]!r}" for name, host in hosts.items() if not is_loopback(host)]
    if off or url.startswith("tls://"):
        raise JoinError(
            f"join file {path} names {', '.join(off) or 'a tls:// NATS URL'} without 'tls_ca_pem': off "
            "loopback the first node serves over TLS (`torchloom run --listen HOST`) and its join file "
            "carries the CA; take the file that run writes"
        )


def take_credentials(info: JoinInfo, home: Path | None = None) -> Path:
    """Put the file's NATS credentials where this node's parties read them: a secrets directory
    (0700, seeds 0600) laid out as `python -m torchloom.credentials` makes one, for `--nats-creds`,
    with the first node's CA as `ca.pem` when it serves TLS (`ca_file`)."""
    directory = private_dir(runs.controlplane_dir(home) / JOINED_SUBDIR / f"{info.job}-{info.run_id}")
    write_private(directory / f"{Role.LAUNCHER.value}.nk", info.launcher_seed + "\n")
    write_private(directory / f"{Role.THREADLET.value}-{info.job}.nk", info.threadlet_seed + "\n")
    if info.uses_tls:
        write_private(directory / CA_FILE, info.tls_ca_pem)
    return directory


def ca_file(credentials_dir: Path, info: JoinInfo) -> Path | None:
    """The first node's CA that `take_credentials` wrote into `credentials_dir` (None without TLS)."""
    return credentials_dir / CA_FILE if info.uses_tls else None


def verify_servers(info: JoinInfo, path: str | Path) -> None:
    """Before anything of this node connects: the first node's NATS server and weaver present
    certificates that the file's CA verifies for the hosts it names (only for a file with a CA).

    Raises:
        JoinError: one does not verify (the file is of another control plane, or an old one), or
            cannot be reached; the message names the host and the file.
    """
    if not info.uses_tls:
        return
    nats = urlsplit(info.nats_url)
    grpc_host, _, grpc_port = info.grpc.rpartition(":")
    servers: tuple[tuple[str, Literal["nats", "grpc"], str, int], ...] = (
        ("NATS server", "nats", nats.hostname or "", nats.port or 0),
        ("weaver (gRPC)", "grpc", grpc_host.strip("[]"), int(grpc_port)),
    )
    for what, protocol, host, port in servers:
        try:
            tls.verify_server(host, port, info.tls_ca_pem, protocol=protocol)
        except tls.TlsVerifyError as exc:
            where = tls.host_port(host, port)
            if exc.unverified:
                raise JoinError(
                    f"the first node's {what} at {where} presented a certificate that the CA of join "
                    f"file {path} does not verify ({exc.reason}): the file is of another control plane "
                    "(or an older one of that node); take the one its current run wrote"
                ) from None
            raise JoinError(
                f"cannot reach the first node's {what} at {where} named by join file {path} "
                f"({exc.reason}): is its run still going, and can this machine reach that address?"
            ) from None
