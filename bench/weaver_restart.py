"""A weaver restarted right after a NATS cluster server restarted: how long until it serves again,
and how often its first start fails and is tried again (`python -m weaver`'s retry, weaver.app).

A 3-node JetStream cluster on loopback and `python -m weaver --replicas 3` on it. Each round kills
one server (in turn), starts it again on the same ports and store, waits for its /healthz, then
SIGKILLs the weaver and starts it again; the time is from that start to its "weaver ready" line.
`--io-load` runs a writer that syncs every 64 KiB write (dd oflag=dsync) and a busy loop beside it,
as a loaded CI machine: JetStream's stream lookups then answer late right after a server restart.

    .venv/bin/python bench/weaver_restart.py --rounds 12 --io-load

Prints a line per round and writes JSON to bench/results/weaver_restart.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from torchloom.nats_server import find_binary  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.binary = find_binary()
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
        self.dirs = [root / f"n{i}" for i in range(3)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * 3
        routes = ", ".join(f'"nats-route://127.0.0.1:{c}"' for _, c, _ in self.ports)
        for i, ((port, cluster, http), d) in enumerate(zip(self.ports, self.dirs, strict=True)):
            d.mkdir(parents=True)
            (d / "server.conf").write_text(
                f'server_name: "n{i}"\nlisten: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{http}"\n'
                f'jetstream {{ store_dir: "{d / "js"}" }}\n'
                f'cluster {{ name: "bench", listen: "127.0.0.1:{cluster}", routes: [{routes}] }}\n'
            )

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p, _, _ in self.ports)

    def start(self, i: int) -> None:
        with open(self.dirs[i] / "server.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [self.binary, "-c", str(self.dirs[i] / "server.conf")], stdout=log, stderr=log
            )

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def healthy(self, i: int) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports[i][2]}/healthz"
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self, i: int, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while not self.healthy(i):
            if time.monotonic() > end:
                raise RuntimeError(f"server n{i} not healthy within {timeout_s:g}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


@contextlib.contextmanager
def io_load(on: bool, scratch: Path) -> Iterator[None]:
    """A synced writer and a busy loop, as a loaded CI machine (nothing when not `on`)."""
    procs = []
    if on:
        writer = (
            f"while :; do dd if=/dev/zero of={scratch / 'io'} bs=64k count=200 oflag=dsync 2>/dev/null; done"
        )
        procs = [
            subprocess.Popen(["sh", "-c", s], start_new_session=True) for s in (writer, "while :; do :; done")
        ]
    try:
        yield
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--io-load", action="store_true", help="a synced writer and a busy loop beside it")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "weaver_restart.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="weaver-restart-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "TORCHLOOM_HOME": str(root / "home")}
        cluster = Cluster(root / "cluster")
        log = root / "weaver.log"
        weaver: subprocess.Popen[bytes] | None = None

        def start_weaver() -> tuple[subprocess.Popen[bytes], float]:
            before = log.read_text().count("weaver ready") if log.exists() else 0
            t0 = time.monotonic()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "weaver", "--nats", cluster.urls, "--grpc", grpc,
                     "--replicas", "3"],
                    env=env, stdout=out, stderr=out, cwd=REPO,
                )  # fmt: skip
            while log.read_text().count("weaver ready") <= before:
                if proc.poll() is not None:
                    raise RuntimeError(f"the weaver exited ({proc.returncode}): {log.read_text()[-2000:]}")
                time.sleep(0.02)
            return proc, time.monotonic() - t0

        grpc = f"127.0.0.1:{free_port()}"
        rounds = []
        try:
            for i in range(3):
                cluster.start(i)
            for i in range(3):
                cluster.wait_healthy(i)
            weaver, _ = start_weaver()
            with io_load(args.io_load, root):
                for k in range(args.rounds):
                    node = k % 3
                    cluster.kill(node)
                    time.sleep(1.0)
                    cluster.start(node)
                    cluster.wait_healthy(node)
                    retries_before = log.read_text().count("trying again")
                    weaver.send_signal(signal.SIGKILL)
                    weaver.wait(timeout=10)
                    weaver, took = start_weaver()
                    retries = log.read_text().count("trying again") - retries_before
                    rounds.append({"server": node, "ready_s": round(took, 3), "retried_starts": retries})
                    print(
                        f"round {k}: server n{node} restarted; weaver ready in {took:.2f} s, "
                        f"{retries} retried start(s)"
                    )
        finally:
            if weaver is not None and weaver.poll() is None:
                weaver.terminate()
                weaver.wait(timeout=30)
            cluster.stop()
    times = [r["ready_s"] for r in rounds]
    summary = {
        "io_load": args.io_load,
        "rounds": len(rounds),
        "ready_s_median": statistics.median(times),
        "ready_s_max": max(times),
        "rounds_with_a_retried_start": sum(r["retried_starts"] > 0 for r in rounds),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "per_round": rounds,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "per_round"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
