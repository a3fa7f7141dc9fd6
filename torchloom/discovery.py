"""Where a running weaver can be found: the `$TORCHLOOM_HOME/weaver.json` file and the lookup order.

The control plane (`torchloom weaver`, or the one `torchloom run` starts) writes the file; every other
CLI command reads it, so a second terminal needs no flags. Weavers started on their own (`python -m
weaver`, active or standby on one NATS) each announce their gRPC address in `weavers/<pid>.json`.
Lookup order: an explicit `--grpc`, then `TORCHLOOM_GRPC`, then the file and the announcements
(only while the process that wrote each is alive). The files are 0600 in a 0700 `$TORCHLOOM_HOME`,
written atomically through `torchloom.private_files`, like every state file there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchloom import env
from torchloom.private_files import write_private_json

FILE_NAME = "weaver.json"
WEAVERS_DIR = "weavers"


def home(environ: Mapping[str, str] | None = None) -> Path:
    """Return the run-state directory: `TORCHLOOM_HOME` (of `environ`, default this process's), else
    `~/.torchloom`."""
    raw = env.get(env.HOME) if environ is None else environ.get(env.HOME)
    return Path(raw).expanduser() if raw else Path.home() / ".torchloom"


def discovery_path() -> Path:
    """Return the path of the discovery file under `home()`."""
    return home() / FILE_NAME


def check_address(addr: str) -> str:
    """Return `addr` when it looks like HOST:PORT, or several separated by commas (an active weaver
    and its standbys), else raise ValueError naming the expected form."""
    for one in addr.split(","):
        host, sep, port = one.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"gRPC address {addr!r} is not valid: expected HOST:PORT (e.g. 127.0.0.1:50051), "
                "or several separated by commas"
            )
    return addr


@dataclass(frozen=True, slots=True, kw_only=True)
class WeaverInfo:
    """The content of the discovery file (docs/design.md, Discovery).

    Attributes:
        pid: the control-plane process.
        nats_url: the NATS server (never with credentials inside).
        grpc: the weaver's gRPC address.
        ws_url: the NATS WebSocket URL for the web UI ("" when unknown).
        jobs: jobs holding a lease when the file was written (informational).
        store_dir: the embedded server's JetStream directory ("" with an external server).
        secrets_dir: where the control plane keeps its secrets ("" when it keeps none).
        token: the local operator's gRPC bearer token (torchloom/tokens.py): the file is 0600, so
            only its owner's CLI reads it and needs no flags ("" when not written here).
        ui_port: the port the web UI serves on; nats-server's WebSocket accepts only that page's
            origin, so `torchloom ui` uses it (0: none reserved).
        metrics_url: where Prometheus scrapes the weaver's metrics (loopback; "" when none are served).
        tls_ca_file: the PEM CA of a control plane that serves NATS and gRPC over TLS (`torchloom run
            --listen HOST`): clients of this file trust it for `nats_url` and `grpc` ("" without TLS).
    """

    pid: int
    nats_url: str
    grpc: str
    ws_url: str = ""
    jobs: tuple[str, ...] = ()
    started_at_s: float = field(default_factory=time.time)
    store_dir: str = ""
    secrets_dir: str = ""
    token: str = field(default="", repr=False)
    ui_port: int = 0
    metrics_url: str = ""
    tls_ca_file: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "nats_url": self.nats_url,
            "ws_url": self.ws_url,
            "grpc": self.grpc,
            "jobs": list(self.jobs),
            "started_at_s": self.started_at_s,
            "store_dir": self.store_dir,
            "secrets_dir": self.secrets_dir,
            "token": self.token,
            "ui_port": self.ui_port,
            "metrics_url": self.metrics_url,
            "tls_ca_file": self.tls_ca_file,
        }

    @classmethod
    def from_json(cls, data: Any) -> WeaverInfo:
        """Build from parsed JSON; raise ValueError naming the missing or mistyped key."""
        if not isinstance(data, dict):
            raise ValueError("discovery file: expected a JSON object")
        try:
            pid = data["pid"]
            nats_url = data["nats_url"]
            grpc = data["grpc"]
        except KeyError as exc:
            raise ValueError(f"discovery file: missing key {exc.args[0]!r}") from None
        if not isinstance(pid, int) or not isinstance(nats_url, str) or not isinstance(grpc, str):
            raise ValueError("discovery file: expected pid (int), nats_url (str) and grpc (str)")
        jobs = data.get("jobs") or []
        return cls(
            pid=pid,
            nats_url=nats_url,
            grpc=grpc,
            ws_url=str(data.get("ws_url") or ""),
            jobs=tuple(str(j) for j in jobs) if isinstance(jobs, list) else (),
            started_at_s=float(data.get("started_at_s") or 0.0),
            store_dir=str(data.get("store_dir") or ""),
            secrets_dir=str(data.get("secrets_dir") or ""),
            token=str(data.get("token") or ""),
            ui_port=ui_port if isinstance(ui_port := data.get("ui_port"), int) and 0 < ui_port < 65536 else 0,
            metrics_url=str(data.get("metrics_url") or ""),
            tls_ca_file=str(data.get("tls_ca_file") or ""),
        )


def pid_alive(pid: int) -> bool:
    """Return True when a process with this pid exists and has not exited (signal 0 probes without
    sending; a zombie, exited but not yet reaped by its parent, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): signal 0 is all we know
    return state not in ("Z", "X")


def write(info: WeaverInfo, path: Path | None = None) -> Path:
    """Write the discovery file atomically (0600 in a 0700 directory) and return its path."""
    return write_private_json(path or discovery_path(), info.to_json())


def read(path: Path | None = None) -> WeaverInfo | None:
    """Return the discovery file's content when it exists, parses and its pid is alive; else None."""
    target = path or discovery_path()
    try:
        info = WeaverInfo.from_json(json.loads(target.read_text()))
    except (OSError, ValueError):
        return None
    return info if pid_alive(info.pid) else None


def remove(path: Path | None = None, *, pid: int | None = None) -> None:
    """Remove the discovery file, but only when it is ours (`pid`, default this process)."""
    target = path or discovery_path()
    owner = os.getpid() if pid is None else pid
    try:
        data = json.loads(target.read_text())
    except (OSError, ValueError):
        return
    # Another launcher may have replaced the file since we wrote it; leave theirs alone.
    if isinstance(data, dict) and data.get("pid") == owner:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def weavers_dir(root: Path | None = None) -> Path:
    """Where weavers started on their own (`python -m weaver`, active or standby) announce their
    gRPC address, one file each: `$TORCHLOOM_HOME/weavers/`."""
    return (root or home()) / WEAVERS_DIR


def announce_weaver(grpc: str, *, root: Path | None = None) -> Path:
    """Write this process's entry (its pid and gRPC address) under `weavers_dir(root)`; return its
    path for `withdraw_weaver`. 0600 in a 0700 directory, like the discovery file."""
    path = weavers_dir(root) / f"{os.getpid()}.json"
    return write_private_json(
        path, {"pid": os.getpid(), "grpc": check_address(grpc), "started_at_s": time.time()}
    )


def withdraw_weaver(path: Path) -> None:
    """Remove an entry `announce_weaver` wrote, when it is still this process's."""
    remove(path)


def live_weavers(root: Path | None = None) -> list[str]:
    """The gRPC addresses of the weavers whose entries name a live process, oldest first (an entry
    that does not parse is skipped: a weaver writing it now is seen at the next look)."""
    found: list[tuple[float, str]] = []
    try:
        entries = list(weavers_dir(root).glob("*.json"))
    except OSError:
        return []
    for path in entries:
        try:
            data = json.loads(path.read_text())
            pid, grpc = int(data["pid"]), check_address(str(data["grpc"]))
            started = float(data.get("started_at_s") or 0.0)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if pid_alive(pid):
            found.append((started, grpc))
    return [grpc for _, grpc in sorted(found)]


def resolve_grpc(explicit: str | None = None) -> str | None:
    """Return the weaver's gRPC address: `explicit`, then `TORCHLOOM_GRPC`, then what the live
    weavers of `$TORCHLOOM_HOME` announce: the control plane's (the discovery file) and every
    weaver started on its own, active or standby (`live_weavers`), comma-separated in that order,
    so a client moves on from a standby or a dead weaver to the one that serves.

    Raises:
        ValueError: when the explicit or environment address is not HOST:PORT.
    """
    if explicit:
        return check_address(explicit)
    from_env = env.get(env.GRPC_ADDR)
    if from_env:
        return check_address(from_env)
    info = read()
    found = [info.grpc] if info is not None and info.grpc else []
    found += [a for a in live_weavers() if a not in found]
    return ",".join(found) or None
