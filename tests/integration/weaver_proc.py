"""A weaver in a process of its own, for tests that kill it (SIGKILL) and start it again on the same
gRPC address, and a free loopback port."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "weaver_proc.py"


def free_port() -> int:
    """A TCP port free on loopback right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WeaverProc:
    """`scripts/weaver_proc.py` on a fixed gRPC port, so a restarted weaver is found at once.

    Args:
        nats_urls: the NATS server(s), comma-separated.
        env: the child's environment (its TORCHLOOM_HOME holds the signing key and gRPC tokens, so a
            restart keeps both).
        log: where its output goes (appended across restarts).
        replicas: JetStream replicas of its streams.
    """

    def __init__(self, nats_urls: str, env: dict[str, str], log: Path, *, replicas: int = 1) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.nats_urls, self.env, self.log, self.replicas = nats_urls, env, log, replicas
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it from here
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), self.nats_urls, self.addr, str(self.replicas)],
            env=self.env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        out.close()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def python_m_weaver(
    env: dict[str, str], nats_url: str, grpc: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`python -m weaver --nats NATS_URL --grpc GRPC EXTRA...` in a session of its own, its output
    appended to `log`."""
    out = open(log, "ab")  # noqa: SIM115 - the child owns it from here
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "weaver", "--nats", nats_url, "--grpc", grpc, *extra],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    finally:
        out.close()
