"""Three nats-servers on loopback forming one JetStream cluster, for tests of a NATS cluster of the
user's (chaos, stream replicas)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.helpers import until
from tests.integration.weaver_proc import free_port
from torchloom.nats_server import find_binary


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    http_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class Cluster:
    """Three nats-servers on loopback forming one JetStream cluster; each keeps its ports and store
    across a kill and restart."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.binary = find_binary()
        self.nodes = [
            Node(f"n{i}", free_port(), free_port(), free_port(), root / f"n{i}") for i in range(size)
        ]
        for node in self.nodes:
            node.dir.mkdir(parents=True)
            routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes)
            (node.dir / "server.conf").write_text(
                f'server_name: "{node.name}"\n'
                f'listen: "127.0.0.1:{node.port}"\n'
                f'http: "127.0.0.1:{node.http_port}"\n'
                f'jetstream {{ store_dir: "{node.dir / "js"}" }}\n'
                f'cluster {{ name: "chaos", listen: "127.0.0.1:{node.cluster_port}", routes: [{routes}] }}\n'
            )

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, i: int) -> None:
        node = self.nodes[i]
        log = open(node.dir / "server.log", "ab")  # noqa: SIM115 - the child owns it from here
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(node.dir / "server.conf")], stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def start_all(self) -> None:
        for i in range(len(self.nodes)):
            self.start(i)

    def all_healthy(self) -> bool:
        return all(self.healthy(i) for i in range(len(self.nodes)))

    def kill(self, i: int) -> None:
        proc = self.nodes[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    async def restart(self, i: int, note: Callable[[str], None] = lambda _: None) -> None:
        """Kill server `i`, start it again a second later on the same ports and store, and wait until
        it is current with the cluster (/healthz; 60 s at most). One that exits meanwhile (a port of
        its, free for that second, taken by another test's connection) is started again, up to 10
        times, as a supervisor would. `note` hears each step (a test's timeline)."""
        self.kill(i)
        await asyncio.sleep(1.0)
        self.start(i)
        note(f"server {i} started again")
        restarts = 0

        def healed() -> bool:
            nonlocal restarts
            proc = self.nodes[i].proc
            if proc is not None and proc.poll() is not None and restarts < 10:
                restarts += 1
                note(f"server {i} exited ({proc.returncode}): starting it again")
                self.start(i)
                return False
            return self.healthy(i)

        await until(
            f"server {i} healthy again", healed, timeout_s=60, logs=[self.nodes[i].dir / "server.log"]
        )
        note(f"server {i} healthy again")

    def healthy(self, i: int) -> bool:
        """The node serves clients and its JetStream is current with the cluster (/healthz is 200)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.nodes[i].http_port}/healthz", timeout=1
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop_all(self) -> None:
        for i in range(len(self.nodes)):
            proc = self.nodes[i].proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
