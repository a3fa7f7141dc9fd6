"""What nats-server alone takes to fan one command out to N rank consumers, and to take N acks in.

Nothing of torchloom runs but the consumer config (`bus.rank_consumer`) on an open nats-server of
its own: one process creates the stream and N consumers, pulls for all of them on one connection and
times each publish to its first and last delivery. `--state file` keeps each consumer's state in the
server's file store (what torchloom did before), `memory` in its memory (what `bus.rank_consumer`
does now). `--what acks` publishes N acks with msg ids into a file stream that republishes them, as
the TORCHLOOM_ACKS stream does, and times the last republished copy and the last delivery of one
durable push consumer.

    .venv/bin/python bench/consumer_fanout.py --ranks 1000 --state file
    .venv/bin/python bench/consumer_fanout.py --ranks 1000 --state memory
    .venv/bin/python bench/consumer_fanout.py --ranks 1000 --what acks --state memory

Prints one line per round (the first is the warm-up) and a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RePublish, StreamConfig

from torchloom import bus
from torchloom.nats_server import EmbeddedNats

PULL = {"batch": 64, "expires": int(30e9), "idle_heartbeat": int(1e9)}  # as threadlet/link.py


async def _commands(url: str, ranks: int, memory: bool, rounds: int) -> list[tuple[float, float]]:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    await js.add_stream(StreamConfig(name="CMDS", subjects=["cmd.>"]))
    for lo in range(0, ranks, 50):  # the server answers consumer creates one by one
        configs = []
        for r in range(lo, min(ranks, lo + 50)):
            config = bus.rank_consumer("bench", "run1", r, f"inc{r}")
            config = dataclasses.replace(config, filter_subject="cmd.run1", mem_storage=memory)
            configs.append(config)
        await asyncio.gather(*(js.add_consumer("CMDS", c) for c in configs))
    reader = await nats.connect(url, pending_size=1 << 26)
    got: dict[str, float] = {}
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        if not msg.reply:
            return  # a pull's status
        got.setdefault(msg.reply.split(".")[3], time.perf_counter())
        await msg.ack()
        if len(got) >= ranks:
            done.set()

    inbox = reader.new_inbox()
    await reader.subscribe(f"{inbox}.>", cb=on_msg, pending_msgs_limit=1 << 20)
    for r in range(ranks):
        name = bus.rank_consumer("bench", "run1", r, f"inc{r}").durable_name
        await reader.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.CMDS.{name}", json.dumps(PULL).encode(), reply=f"{inbox}.{r}"
        )
    await reader.flush()
    await asyncio.sleep(1.0)
    times = []
    for _ in range(rounds):
        got.clear()
        done.clear()
        t0 = time.perf_counter()
        await js.publish("cmd.run1", b"x" * 300)
        await asyncio.wait_for(done.wait(), 60)
        ts = sorted(got.values())
        times.append(((ts[0] - t0) * 1e3, (ts[-1] - t0) * 1e3))
        print(f"first delivery {times[-1][0]:.1f} ms, last {times[-1][1]:.1f} ms", flush=True)
        await asyncio.sleep(0.5)
    await reader.close()
    await nc.close()
    return times


async def _acks(url: str, ranks: int, memory: bool, rounds: int) -> list[tuple[float, float]]:
    nc = await nats.connect(url, pending_size=1 << 26)
    js = nc.jetstream(timeout=30)
    republish = RePublish(src="wack.>", dest="ack.>")
    await js.add_stream(
        StreamConfig(name="ACKS", subjects=["wack.>"], duplicate_window=120, republish=republish)
    )
    live: dict[bytes, float] = {}
    durable: dict[bytes, float] = {}
    done = asyncio.Event()

    async def on_live(msg: Any) -> None:
        live[msg.data] = time.perf_counter()
        if len(live) >= ranks and len(durable) >= ranks:
            done.set()

    async def on_durable(msg: Any) -> None:
        durable[msg.data] = time.perf_counter()
        await msg.ack()
        if len(live) >= ranks and len(durable) >= ranks:
            done.set()

    await nc.subscribe("ack.>", cb=on_live, pending_msgs_limit=1 << 20)
    config = ConsumerConfig(
        durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=2, max_ack_pending=65536, mem_storage=memory
    )
    await js.subscribe(
        "wack.>",
        durable="w",
        stream="ACKS",
        cb=on_durable,
        manual_ack=True,
        config=config,
        pending_msgs_limit=1 << 20,
    )
    ranks_nc = [await nats.connect(url) for _ in range(2)]  # two simulator processes' worth
    times = []
    for k in range(rounds):
        live.clear()
        durable.clear()
        done.clear()
        t0 = time.perf_counter()
        for r in range(ranks):
            c = ranks_nc[r % 2]
            await c.publish(
                "wack.tok.job", f"{k}-{r}".encode(), reply=c.new_inbox(), headers={"Nats-Msg-Id": f"{k}-{r}"}
            )
        await asyncio.wait_for(done.wait(), 60)
        times.append(((max(live.values()) - t0) * 1e3, (max(durable.values()) - t0) * 1e3))
        print(
            f"last republished copy {times[-1][0]:.1f} ms, last durable delivery {times[-1][1]:.1f} ms",
            flush=True,
        )
        await asyncio.sleep(0.5)
    for c in ranks_nc:
        await c.close()
    await nc.close()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1000)
    p.add_argument("--what", choices=("commands", "acks"), default="commands")
    p.add_argument("--state", choices=("file", "memory"), default="memory")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    run = _commands if a.what == "commands" else _acks
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp)) as server:
        times = asyncio.run(run(server.url, a.ranks, a.state == "memory", a.rounds))
    kept = times[1:] or times  # the first round warms the server up
    print(
        json.dumps(
            {
                "benchmark": "consumer_fanout",
                "what": a.what,
                "ranks": a.ranks,
                "state": a.state,
                "median_ms": [round(statistics.median(t[i] for t in kept), 1) for i in (0, 1)],
                "rounds_ms": [[round(x, 1) for x in t] for t in times],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
