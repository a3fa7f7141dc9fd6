"""How a control plane runs: its config (`ControlPlaneConfig`), the NATS authentication it asks for
(`Credentials`), its files under `$TORCHLOOM_HOME/controlplane/` and its idle-exit default.

The process itself, which runs on these, is torchloom.app.controlplane.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torchloom import defaults, env, tls
from torchloom.app import runs
from torchloom.app.natsauth import GivenAccess, OpenAccess, StoreAccess
from torchloom.credentials import SECRETS_SUBDIR, ClientAuth, CredentialStore, Role
from torchloom.nats_server import EmbeddedNats

IDLE_EXIT_S = 10.0  # default grace after the last lease ended
IDLE_EXIT_ENV = env.CONTROLPLANE_IDLE_S
STATE_FILE = "state.json"
LOG_FILE = "controlplane.log"


class Credentials(Protocol):
    """What the control plane asks of NATS authentication (phase-2 blueprint, section 2).

    The control plane calls `prepare` before every start of the embedded server (the first and each
    supervised restart), `job_added` when a job's first lease appears (create and apply its threadlet
    credentials) and `job_removed` when its last lease ends (and at start for each job `granted`
    that holds no lease). Its own connections and the weaver's use `client_auth(Role.WEAVER)`.
    Implementations: `StoreAccess`, `GivenAccess` and `OpenAccess` in torchloom.app.natsauth.
    """

    @property
    def secrets_dir(self) -> Path | None: ...

    def prepare(self, server: EmbeddedNats) -> None: ...

    def client_auth(self, role: Role) -> ClientAuth | None: ...

    def granted(self) -> tuple[str, ...]: ...

    def job_added(self, job: str) -> None: ...

    def job_removed(self, job: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneConfig:
    """How a control plane runs.

    Attributes:
        home: the `$TORCHLOOM_HOME` it serves (discovery file, leases, stores).
        nats_url: an external server; None runs the embedded one and supervises it.
        nats_creds: `--nats-creds PATH` for the external server (a credential file or a torchloom
            secrets directory, torchloom.app.natsauth); None connects to it without one.
        ui_port: the web UI's port, whose page origins the embedded server's WebSocket accepts
            (0: a free one, chosen before the server starts and kept across its restarts).
        grpc_addr: the weaver's gRPC bind address (port 0: a free one).
        listen_host: serve the embedded server's client port and the weaver's gRPC on this address
            of the machine, both over TLS with a certificate of the control plane's private CA
            (`torchloom run --listen HOST`, torchloom/certs.py); `grpc_addr` must then be on it.
            None: loopback and plaintext (the WebSocket for the local UI stays on loopback always).
        idle_exit_s: exit once no lease has been held this long; None: never (`torchloom weaver`).
        weaver_options: extra WeaverConfig keyword arguments (the health options).
        nats_check_interval_s: how often the embedded server's process is checked.
        lease_interval_s: how often the leases are swept.
    """

    home: Path
    nats_url: str | None = None
    nats_creds: str | None = None
    ui_port: int = 0
    grpc_addr: str = defaults.GRPC_BIND_ADDR
    listen_host: str | None = None
    idle_exit_s: float | None = IDLE_EXIT_S
    weaver_options: Mapping[str, Any] = field(default_factory=dict)
    nats_check_interval_s: float = 0.1
    lease_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.idle_exit_s is not None and not 0.0 <= self.idle_exit_s <= 24 * 3600.0:
            raise ValueError(f"idle_exit_s={self.idle_exit_s!r} rejected: must be in [0, 86400] or None")
        for name in ("nats_check_interval_s", "lease_interval_s"):
            value = getattr(self, name)
            if not 0.0 < value <= 60.0:
                raise ValueError(f"{name}={value!r} rejected: must be in (0, 60]")
        if not 0 <= self.ui_port <= 65535:
            raise ValueError(f"ui_port={self.ui_port!r} rejected: must be in [0, 65535] (0: a free port)")
        if self.nats_creds is not None and self.nats_url is None:
            raise ValueError(
                "nats_creds is for an external server (nats_url): the embedded one uses the control "
                "plane's own credentials"
            )
        host, sep, port = self.grpc_addr.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"grpc_addr={self.grpc_addr!r} rejected: expected HOST:PORT with PORT in [0, 65535]"
            )
        if self.listen_host is not None:
            if self.nats_url is not None:
                raise ValueError(
                    "listen_host is for the embedded server: a NATS server of yours (nats_url) "
                    "listens where you configured it"
                )
            if host.strip("[]") != self.listen_host:
                raise ValueError(
                    f"grpc_addr={self.grpc_addr!r} rejected: with listen_host={self.listen_host!r} the "
                    f"weaver serves there too: expected {tls.host_port(self.listen_host, 0)} (any port)"
                )


def state_path(home: Path | None = None) -> Path:
    return runs.controlplane_dir(home) / STATE_FILE


def log_path(home: Path | None = None) -> Path:
    return runs.controlplane_dir(home) / LOG_FILE


def free_port() -> int:
    """A TCP port free on loopback right now (for the web UI, whose origin must be known early)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_credentials(config: ControlPlaneConfig) -> Credentials:
    """The embedded server's role table (the control plane's credential store under `home`), or
    for an external server the `nats_creds` given (else none)."""
    if config.nats_url is None:
        return StoreAccess(CredentialStore.open(config.home / SECRETS_SUBDIR))
    if config.nats_creds is not None:
        return GivenAccess(config.nats_creds)
    return OpenAccess()


def idle_exit_default() -> float:
    """TORCHLOOM_CONTROLPLANE_IDLE_S, else IDLE_EXIT_S."""
    return env.get_float(IDLE_EXIT_ENV, IDLE_EXIT_S)


def stream_replicas(given: int | None) -> int:
    """The JetStream replicas of the weaver's streams on an external NATS: `given`, else
    TORCHLOOM_NATS_REPLICAS, else 1.

    Raises:
        ValueError: not in [1, MAX_STREAM_REPLICAS] (naming the flag or the variable it came from).
    """
    top = defaults.MAX_STREAM_REPLICAS
    if given is None:
        return env.get_int(env.NATS_REPLICAS, 1, within=(1, top))
    if not 1 <= given <= top:
        raise ValueError(f"--replicas {given} rejected: must be in [1, {top}]")
    return given
