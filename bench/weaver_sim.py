"""The simulated ranks of bench/weaver_scale.py: ranks [lo, hi) of one job on one NATS connection with
the job's threadlet credential, sending what real threadlets send (heartbeats with the knob schema in
full only when it is due, else its hash and the values; StepMetrics) and pulling their run's commands
from the consumer the weaver made for each rank process, as threadlet/link.py does, acking each one
`applied` at once.

Run as `weaver_scale.py sim ...` (the driver starts it); prints `{"subscribed": n}` once every rank
pulls and `{"done": {...counts}}` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
import uuid
from typing import Any

from nats import errors as nats_errors

from torchloom import bus, knobs, subjects, wire
from torchloom.credentials import ClientAuth, Role, inbox_prefix
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import (
    Ack,
    AckStatus,
    Command,
    DeviceHealth,
    Heartbeat,
    KnobSpec,
    SetConfig,
    StepMetrics,
)

TICK_S = 0.02  # the simulator's clock: every report is due on one of these ticks
STEPS_PER_S = 10.0  # the simulated training speed (every rank at the same step)
# (name, value) of the knobs an AdamW rank with gradient clipping and accumulation reports.
KNOBS = (
    ("lr", 1e-3),
    ("weight_decay", 0.01),
    ("betas", (0.9, 0.95)),
    ("eps", 1e-8),
    ("grad_clip_norm", 1.0),
    ("grad_accum_steps", 1),
)
# As threadlet/reports.py: the full schema rides this many heartbeats after each refresh, one every
# SCHEMA_REFRESH_S; the others carry its hash and the values.
SCHEMA_FULL_HEARTBEATS = 3
SCHEMA_REFRESH_S = 10.0
# As threadlet/link.py: a long-poll pull of up to _PULL_BATCH commands, expiring after _PULL_EXPIRES_S,
# with an idle heartbeat every _PULL_HEARTBEAT_S; asked again when it ends or goes quiet.
_PULL_BATCH = 64
_PULL_EXPIRES_S = 10.0
_PULL_HEARTBEAT_S = 1.0
_NO_CONSUMER_WAIT_S = 0.25


@dataclasses.dataclass(slots=True)
class SimRank:
    """One simulated rank: what its heartbeats say and what it has sent."""

    rank: int
    incarnation: str
    knobs: dict[str, Any]
    last_seq: int = 0
    last_hb_s: float = 0.0
    first_hb_s: float = 0.0  # when its first heartbeat went (its schema rides the first few)
    max_gap_s: float = 0.0
    acked: int = 0
    pull_id: int = 0
    pull_left: int = 0
    pull_seen_s: float = 0.0  # monotonic time the server last answered a pull of this rank
    pull_wanted: bool = True  # ask again at the next pull sweep
    pulling: bool = False  # a delivery or a status came: the consumer exists
    # wire.encode of the fields that change only with a command (full schema, and hash + values),
    # and of the metrics that never change; None: encode again. See `Simulator.encoded_heartbeat`.
    hb_full: bytes | None = None
    hb_hashed: bytes | None = None
    metrics_static: bytes | None = None

    def specs(self) -> tuple[KnobSpec, ...]:
        return tuple(dataclasses.replace(BUILTIN_SPECS[n], value=v) for n, v in sorted(self.knobs.items()))


class Simulator:
    """Ranks [lo, hi) of a job on one NATS connection.

    Encoding a full heartbeat (six knob schemas, device health) costs about 300 us in Python, which
    at 3,000 ranks x 5 Hz is more CPU than this machine has. So each rank encodes its heartbeat once
    per change of its knobs or last seq, and per heartbeat only a small Heartbeat with the moving
    fields (step, sent_at_s), appended: protobuf parses concatenated messages as one message whose
    later scalar fields win, so the weaver decodes exactly the heartbeat a rank would send (checked
    on each rank's first heartbeat of each form). Metrics likewise.
    """

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.ranks = [
            SimRank(rank=r, incarnation=uuid.uuid4().hex, knobs=dict(KNOBS)) for r in range(a.lo, a.hi)
        ]
        self.by_rank = {sr.rank: sr for sr in self.ranks}
        self.counts = {"heartbeats": 0, "metrics": 0, "commands": 0, "acks": 0, "late_ticks": 0, "errors": 0}
        self.nc: Any = None
        self.inbox = ""
        self.puback = ""
        self.last_command: tuple[bytes, Command | None] = (b"", None)

    def step(self, at_s: float) -> int:
        return max(0, int((at_s - self.a.t0) * STEPS_PER_S))

    def utilization(self, at_s: float) -> float:
        """The device utilization a rank reports at `at_s`: never the same two heartbeats running."""
        return 90.0 + self.step(at_s) % 9

    def heartbeat(self, sr: SimRank, now: float, *, full: bool) -> Heartbeat:
        """The heartbeat a real rank in this state would send at `now` (`full`: with the schema)."""
        a = self.a
        specs = sr.specs()
        return Heartbeat(
            job=a.job,
            run_id=a.run_id,
            rank=sr.rank,
            world_size=a.world,
            local_rank=sr.rank % 8,
            incarnation=sr.incarnation,
            host=f"node{sr.rank // 8}",
            pid=os.getpid(),
            step=self.step(now),
            sent_at_s=now,
            step_time_s=1.0 / STEPS_PER_S,
            last_seq=sr.last_seq,
            knobs=specs if full else (),
            knobs_hash=knobs.schema_hash(specs),
            knob_values={} if full else {s.name: s.value for s in specs if s.value is not None},
            device=DeviceHealth(
                kind="cuda",
                device=f"GPU-{sr.rank:05d}",
                index=sr.rank % 8,
                nvml_available=True,
                utilization_pct=95.0,
                memory_used_bytes=60 << 30,
                memory_total_bytes=80 << 30,
                temperature_c=70.0,
                power_w=650.0,
            ),
        )

    def schema_due(self, sr: SimRank, now: float) -> bool:
        """Whether this heartbeat carries the full schema: the first few of the process, and the
        first few after each refresh."""
        interval = 1.0 / self.a.hb_hz
        window = SCHEMA_FULL_HEARTBEATS * interval
        if not sr.first_hb_s:
            sr.first_hb_s = now
        return (
            now - sr.first_hb_s < window
            or (now - self.a.t0 + sr.rank * interval / 7) % SCHEMA_REFRESH_S < window
        )

    def encoded_heartbeat(self, sr: SimRank, now: float, *, full: bool = True) -> bytes:
        """wire bytes that decode to `heartbeat(sr, now, full=full)` (see the class docstring)."""
        a = self.a
        moving = wire.encode(
            Heartbeat(
                job=a.job,
                run_id=a.run_id,
                rank=sr.rank,
                world_size=a.world,
                incarnation=sr.incarnation,
                step=self.step(now),
                sent_at_s=now,
                # A real probe's sample moves every heartbeat (merged into the static device below).
                device=DeviceHealth(kind="cuda", utilization_pct=self.utilization(now)),
            )
        )
        static = sr.hb_full if full else sr.hb_hashed
        if static is None:
            whole = self.heartbeat(sr, now, full=full)
            static = wire.encode(dataclasses.replace(whole, step=0, sent_at_s=0.0))
            assert whole.device is not None
            whole = dataclasses.replace(
                whole, device=dataclasses.replace(whole.device, utilization_pct=self.utilization(now))
            )
            assert wire.decode_heartbeat(static + moving) == whole
            if full:
                sr.hb_full = static
            else:
                sr.hb_hashed = static
        return static + moving

    def encoded_metrics(self, sr: SimRank, now: float) -> bytes:
        """wire bytes of the StepMetrics a real rank would send at `now`."""
        a = self.a
        step = self.step(now)
        if sr.metrics_static is None:
            static = {"step_time_s": 1.0 / STEPS_PER_S, "lr": float(sr.knobs["lr"]), "tokens": 4096.0}
            sr.metrics_static = wire.encode(
                StepMetrics(job=a.job, run_id=a.run_id, rank=sr.rank, step=0, values=static)
            )
        moving = StepMetrics(
            job=a.job,
            run_id=a.run_id,
            rank=sr.rank,
            step=step,
            time_s=now,
            values={"loss": 2.0 * math.exp(-step / 5000)},
        )
        return sr.metrics_static + wire.encode(moving)

    async def publish(
        self, subject: str, data: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish; when the client's outgoing buffer is full (the sim or the server is behind),
        flush and try again a few times, then count the message as dropped."""
        for _ in range(3):
            try:
                await self.nc.publish(subject, data, reply=reply, headers=headers)
                return
            except nats_errors.OutboundBufferLimitError:
                self.counts["buffer_full"] = self.counts.get("buffer_full", 0) + 1
                with contextlib.suppress(Exception):
                    await self.nc.flush(timeout=5)
        self.counts["dropped"] = self.counts.get("dropped", 0) + 1

    # ---- commands: a pull consumer per rank process, as threadlet/link.py ------------------------

    async def pull(self, sr: SimRank) -> None:
        """Ask the rank's consumer for up to _PULL_BATCH commands (a long poll)."""
        a = self.a
        api = (
            f"{subjects.JS_API}.CONSUMER.MSG.NEXT.{subjects.stream_commands_of(a.job)}."
            f"{subjects.rank_consumer(a.run_id, sr.rank, sr.incarnation)}"
        )
        sr.pull_id += 1
        sr.pull_left, sr.pull_seen_s, sr.pull_wanted = _PULL_BATCH, time.monotonic(), False
        request = {
            "batch": _PULL_BATCH,
            "expires": int(_PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(_PULL_HEARTBEAT_S * 1e9),
        }
        await self.publish(api, json.dumps(request).encode(), reply=f"{self.inbox}.{sr.rank}.{sr.pull_id}")

    async def on_pull_msg(self, msg: Any) -> None:
        """A delivery (ack it to JetStream, answer the command) or a pull status of some rank."""
        received = time.time()
        try:
            if msg.reply:  # a delivery keeps its stored subject; its ack subject names the consumer
                consumer = msg.reply.split(".")[3]  # $JS.ACK.<stream>.<consumer>.<counters...>
                rank, pull_id = consumer.split("-")[2], "-1"
            else:  # a status: on the pull's reply subject <inbox>.<rank>.<pull id>
                _, rank, pull_id = msg.subject.rsplit(".", 2)
            sr = self.by_rank[int(rank)]
        except (ValueError, KeyError, IndexError):
            self.counts["errors"] += 1
            return
        status = (msg.headers or {}).get("Status") if not msg.reply else None
        if status is not None:
            if int(pull_id) == sr.pull_id:
                sr.pull_seen_s = time.monotonic()
                sr.pulling = sr.pulling or status != "503"
                if status != "100":  # 404/408/409: this pull ended; 503: no consumer yet
                    sr.pull_wanted = True
            return
        sr.pulling = True
        sr.pull_seen_s = time.monotonic()
        sr.pull_left -= 1
        sr.pull_wanted = sr.pull_left <= 0
        with contextlib.suppress(Exception):
            await msg.ack()
        try:
            # Every rank of this process gets the same command: decoded once (a real rank decodes
            # its own copy, in its own process, at the same time as the others).
            if msg.data != self.last_command[0]:
                self.last_command = (msg.data, wire.decode_command(msg.data))
            cmd = self.last_command[1]
            assert cmd is not None
            self.counts["commands"] += 1
            # No signature check here (real ranks verify); only the job and run are checked.
            if (cmd.job, cmd.run_id) == (self.a.job, self.a.run_id):
                await self.ack(sr, cmd, received)
        except Exception:
            self.counts["errors"] += 1

    async def on_puback(self, msg: Any) -> None:
        """The acks stream's answer to an ack: counted when it is an error (not stored)."""
        if b'"error"' in msg.data:
            self.counts["acks_not_stored"] = self.counts.get("acks_not_stored", 0) + 1

    async def pull_sweep(self, stop: asyncio.Event) -> None:
        """Ask again for each rank whose pull ended, was refused (no consumer yet) or went quiet."""
        while not stop.is_set():
            now = time.monotonic()
            for sr in self.ranks:
                quiet = now - sr.pull_seen_s > 2.5 * _PULL_HEARTBEAT_S
                if sr.pull_wanted or quiet:
                    await self.pull(sr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _NO_CONSUMER_WAIT_S)

    async def ack(self, sr: SimRank, cmd: Command, received: float) -> None:
        """Apply a set at once and ack it as applied at the step every rank decides alike."""
        if isinstance(cmd.body, SetConfig):
            sr.knobs.update({k: v for k, v in cmd.body.values.items() if k in sr.knobs})
            sr.metrics_static = None
        ack = Ack(
            command_id=cmd.command_id,
            job=cmd.job,
            run_id=cmd.run_id,
            seq=cmd.seq,
            rank=sr.rank,
            incarnation=sr.incarnation,
            status=AckStatus.APPLIED,
            step=self.step(cmd.issued_at_s) + 1,
            decided_at_s=time.time(),
            received_at_s=received,
        )
        sr.last_seq = max(sr.last_seq, cmd.seq)
        sr.hb_full = sr.hb_hashed = None
        sr.acked += 1
        self.counts["acks"] += 1
        # As threadlet/reports.py: a JetStream publish on the capture subject of the ack token the
        # command carried (the acks stream stores it, the weaver reads it through its durable
        # consumer), its msg id making a retry one message; the stream's answer is not waited for.
        subject = subjects.ack_capture(cmd.ack_token, cmd.job) if cmd.ack_token else subjects.acks(cmd.job)
        msg_id = f"ack:{ack.run_id}:{ack.seq}:{ack.rank}:{ack.incarnation}"
        await self.publish(subject, wire.encode(ack), reply=self.puback, headers={"Nats-Msg-Id": msg_id})

    # ---- reports --------------------------------------------------------------------------------

    async def report(self, stop: asyncio.Event) -> None:
        """Heartbeats and metrics on an absolute tick schedule, ranks spread over the ticks."""
        a = self.a
        hb_every = max(1, round(1.0 / (a.hb_hz * TICK_S)))
        metrics_every = max(1, round(1.0 / (a.metrics_hz * TICK_S)))
        start = time.monotonic()
        tick = 0
        while not stop.is_set():
            now = time.time()
            for sr in self.ranks:
                if (tick + sr.rank) % hb_every == 0:
                    if sr.last_hb_s:
                        sr.max_gap_s = max(sr.max_gap_s, now - sr.last_hb_s)
                    sr.last_hb_s = now
                    data = self.encoded_heartbeat(sr, now, full=self.schema_due(sr, now))
                    await self.publish(subjects.heartbeat(a.job, sr.rank), data)
                    self.counts["heartbeats"] += 1
                if (tick + sr.rank) % metrics_every == 0:
                    await self.publish(subjects.metrics(a.job, sr.rank), self.encoded_metrics(sr, now))
                    self.counts["metrics"] += 1
            tick += 1
            delay = start + tick * TICK_S - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                self.counts["late_ticks"] += 1
                await asyncio.sleep(0)

    async def run(self) -> dict[str, Any]:
        a = self.a
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        auth = ClientAuth.from_file(a.creds, inbox_prefix=inbox_prefix(Role.THREADLET, a.job))
        self.nc = await bus.connect(a.nats, name=f"sim-{a.job}-{a.lo}-{a.hi}", credentials=auth)
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.>", cb=self.on_pull_msg, pending_msgs_limit=1 << 20)
        self.puback = self.nc.new_inbox()
        await self.nc.subscribe(self.puback, cb=self.on_puback, pending_msgs_limit=1 << 20)
        try:
            reporting = asyncio.create_task(self.report(stop))
            pulling = asyncio.create_task(self.pull_sweep(stop))
            deadline = time.monotonic() + a.run_s
            while not stop.is_set() and not all(sr.pulling for sr in self.ranks):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
            print(json.dumps({"subscribed": self.subscribed()}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
            stop.set()
            await reporting
            await pulling
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5.0)
        return {
            **self.counts,
            "ranks": len(self.ranks),
            "subscribed": self.subscribed(),
            "max_send_gap_s": max((sr.max_gap_s for sr in self.ranks), default=0.0),
            "acked_min": min((sr.acked for sr in self.ranks), default=0),
        }

    def subscribed(self) -> int:
        return sum(sr.pulling for sr in self.ranks)


def simulate(a: argparse.Namespace) -> int:
    """`weaver_scale.py sim ...`: simulate ranks [lo, hi) until SIGTERM or `run_s`; print the counts."""
    result = asyncio.run(Simulator(a).run())
    print(json.dumps({"done": result}), flush=True)
    return 0
