"""Probe: right after a 3-node JetStream cluster's server restarted (its /healthz is 200 again), does
a JetStream API request (STREAM.INFO of an R3 stream) answer, through each of the three servers?

    .venv/bin/python bench/scripts/js_api_after_restart.py --rounds 6

Each round restarts one server (in turn), then sends one request per server with a 10 s timeout at
once, and again 3 s later. A request that times out was dropped, not slow: the same request a few
seconds later answers at once (docs/benchmarks.md, "A weaver restarted after a server restart").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weaver_restart import Cluster


async def probe(url: str, stream: str) -> str:
    nc = await nats.connect(url)
    try:
        t0 = time.monotonic()
        try:
            await nc.jetstream(timeout=10).stream_info(stream)
        except Exception as exc:  # the probe reports whatever it was
            return f"{type(exc).__name__} after {time.monotonic() - t0:.2f} s"
        return f"{time.monotonic() - t0:.2f} s"
    finally:
        await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="js-probe-") as tmp:
        cluster = Cluster(Path(tmp) / "cluster")
        try:
            for i in range(3):
                cluster.start(i)
            for i in range(3):
                cluster.wait_healthy(i)
            nc = await nats.connect(cluster.urls.split(","))
            await nc.jetstream(timeout=10).add_stream(
                StreamConfig(name="S", subjects=["s.>"], num_replicas=3)
            )
            await nc.close()
            urls = cluster.urls.split(",")
            for k in range(args.rounds):
                node = k % 3
                cluster.kill(node)
                await asyncio.sleep(1.0)
                cluster.start(node)
                cluster.wait_healthy(node)
                for when in ("at once", "3 s later"):
                    said = await asyncio.gather(*(probe(u, "S") for u in urls))
                    print(
                        f"n{node} restarted, {when}: "
                        + ", ".join(f"via n{i} {r}" for i, r in enumerate(said))
                    )
                    await asyncio.sleep(3.0)
        finally:
            cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())
