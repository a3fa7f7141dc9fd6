"""The weaver at scale: one real weaver process driven by N simulated ranks, each with real heartbeats
(5 Hz), StepMetrics (10 Hz) and acks, and its own JetStream consumer of the job's command stream, all
on a secured nats-server on loopback. Reports the weaver's CPU (cores) and RSS from /proc, command
latency from submit to the last of N acks (p50/p99), the largest heartbeat age the weaver reports in
status, and whether any rank was ever reported dead.

    .venv/bin/python bench/weaver_scale.py --ranks 100,1000,3000 --duration-s 40
    .venv/bin/python bench/weaver_scale.py --ranks 3000 --profile --out /tmp/profile.json

The simulated ranks ack every command as applied at once (no step boundary, no agreement) and do not
verify command signatures (real ranks do): the latency is the control plane's part alone. They run
in a few processes on the same machine as the weaver, so on a small loaded machine they compete with
it for CPU; each rank's largest gap between two heartbeats it sent is reported to tell their lag
from the weaver's. Prints a table and writes JSON to bench/results/weaver_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import math
import os
import platform
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nats import errors as nats_errors
from nats.js import api

from torchloom import bus, subjects, tokens, wire
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, CredentialStore, Role, inbox_prefix
from torchloom.errors import TorchloomError
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import (
    Ack,
    AckStatus,
    Command,
    DeviceHealth,
    Heartbeat,
    KnobSpec,
    OutcomeStatus,
    SetConfig,
    StepMetrics,
    SubmitRequest,
)
from torchloom.nats_server import EmbeddedNats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from command_latency import pct  # noqa: E402  (a sibling script, not a package)

JOB = "scale"
TICK_S = 0.02  # the simulator's clock: every report is due on one of these ticks
STEPS_PER_S = 10.0  # the simulated training speed (every rank at the same step)
RANKS_PER_PROCESS = 750
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# (name, value) of the knobs an AdamW rank with gradient clipping and accumulation reports.
_KNOBS = (
    ("lr", 1e-3),
    ("weight_decay", 0.01),
    ("betas", (0.9, 0.95)),
    ("eps", 1e-8),
    ("grad_clip_norm", 1.0),
    ("grad_accum_steps", 1),
)


# ---- /proc ----------------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- the weaver process ---------------------------------------------------------------------------


def serve_weaver(a: argparse.Namespace) -> int:
    """`weaver_scale.py weaver ...`: weaver.app.serve with the control plane's secured settings."""
    from weaver.app import RunningWeaver, serve
    from weaver.config import WeaverConfig

    config = WeaverConfig(
        nats_url=a.nats,
        nats_credentials=ClientAuth.from_file(a.creds, inbox_prefix=inbox_prefix(Role.WEAVER)),
        grpc_addr="127.0.0.1:0",
        signing_key_file=a.key,
        grpc_tokens_file=a.tokens,
        api_submit_identity=Role.UI_OPERATOR.value,
        **({"dead_after_s": a.dead_after} if a.dead_after else {}),
    )

    def ready(w: RunningWeaver) -> None:
        print(f"weaver ready: grpc {w.grpc_address}", flush=True)

    profiler = cProfile.Profile() if a.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(serve(config, ready=ready, handle_sigterm=True))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(a.profile)
    return 0


# ---- the simulated ranks --------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class SimRank:
    """One simulated rank: what its heartbeats say and what it has sent."""

    rank: int
    incarnation: str
    knobs: dict[str, Any]
    last_seq: int = 0
    last_hb_s: float = 0.0
    max_gap_s: float = 0.0
    acked: int = 0
    # wire.encode of the fields that change only with a command (knob values, last_seq), and of the
    # metrics that never change; None: encode again. See `Simulator.encoded_heartbeat`.
    hb_static: bytes | None = None
    metrics_static: bytes | None = None

    def specs(self) -> tuple[KnobSpec, ...]:
        return tuple(dataclasses.replace(BUILTIN_SPECS[n], value=v) for n, v in sorted(self.knobs.items()))


class Simulator:
    """Ranks [lo, hi) of a job on one NATS connection with the job's threadlet credential.

    Encoding a full heartbeat (six knob schemas, device health) costs about 300 us in Python, which
    at 3,000 ranks x 5 Hz is more CPU than this machine has. So each rank encodes its heartbeat once
    per change of its knobs or last seq, and per heartbeat only a small Heartbeat with the moving
    fields (step, sent_at_s), appended: protobuf parses concatenated messages as one message whose
    later scalar fields win, so the weaver decodes exactly the heartbeat a rank would send (checked
    on each rank's first heartbeat). Metrics likewise.
    """

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.ranks = [
            SimRank(rank=r, incarnation=uuid.uuid4().hex, knobs=dict(_KNOBS)) for r in range(a.lo, a.hi)
        ]
        self.counts = {"heartbeats": 0, "metrics": 0, "commands": 0, "acks": 0, "late_ticks": 0, "errors": 0}
        self.subscribed = 0
        self.nc: Any = None

    def step(self, at_s: float) -> int:
        return max(0, int((at_s - self.a.t0) * STEPS_PER_S))

    def heartbeat(self, sr: SimRank, now: float) -> Heartbeat:
        """The heartbeat a real rank in this state would send at `now`."""
        a = self.a
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
            knobs=sr.specs(),
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

    def encoded_heartbeat(self, sr: SimRank, now: float) -> bytes:
        """wire bytes that decode to `heartbeat(sr, now)` (see the class docstring)."""
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
            )
        )
        if sr.hb_static is None:
            full = self.heartbeat(sr, now)
            sr.hb_static = wire.encode(dataclasses.replace(full, step=0, sent_at_s=0.0))
            assert wire.decode_heartbeat(sr.hb_static + moving) == full
        return sr.hb_static + moving

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

    async def publish(self, subject: str, data: bytes) -> None:
        """Publish; when the client's outgoing buffer is full (the sim or the server is behind),
        flush and try again a few times, then count the message as dropped."""
        for _ in range(3):
            try:
                await self.nc.publish(subject, data)
                return
            except nats_errors.OutboundBufferLimitError:
                self.counts["buffer_full"] = self.counts.get("buffer_full", 0) + 1
                with contextlib.suppress(Exception):
                    await self.nc.flush(timeout=5)
        self.counts["dropped"] = self.counts.get("dropped", 0) + 1

    async def follow(self, sr: SimRank) -> None:
        """Follow the run's commands through an ordered JetStream consumer, as threadlet/link.py does
        (retrying until the job's command stream exists)."""
        a = self.a
        js = self.nc.jetstream(timeout=10.0)

        async def on_msg(msg: Any) -> None:
            received = time.time()
            try:
                cmd = wire.decode_command(msg.data)
                self.counts["commands"] += 1
                # No signature check here (real ranks verify); only the job and run are checked.
                if (cmd.job, cmd.run_id) != (a.job, a.run_id):
                    return
                await self.ack(sr, cmd, received)
            except Exception:
                self.counts["errors"] += 1

        while True:
            try:
                await js.subscribe(
                    subjects.commands(a.job, a.run_id),
                    stream=subjects.stream_commands_of(a.job),
                    cb=on_msg,
                    config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
                    ordered_consumer=True,
                    idle_heartbeat=0.5,
                )
                self.subscribed += 1
                return
            except Exception:
                self.counts["errors"] += 1
                await asyncio.sleep(0.5)

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
        sr.hb_static = None
        sr.acked += 1
        self.counts["acks"] += 1
        await self.publish(subjects.acks(cmd.job), wire.encode(ack))

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
                    await self.publish(subjects.heartbeat(a.job, sr.rank), self.encoded_heartbeat(sr, now))
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
        try:
            reporting = asyncio.create_task(self.report(stop))
            for i in range(0, len(self.ranks), 50):  # consumers created in batches, as ranks start
                await asyncio.gather(*(self.follow(sr) for sr in self.ranks[i : i + 50]))
            print(json.dumps({"subscribed": self.subscribed}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), a.run_s)
            stop.set()
            await reporting
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5.0)
        return {
            **self.counts,
            "ranks": len(self.ranks),
            "subscribed": self.subscribed,
            "max_send_gap_s": max((sr.max_gap_s for sr in self.ranks), default=0.0),
            "acked_min": min((sr.acked for sr in self.ranks), default=0),
        }


def simulate(a: argparse.Namespace) -> int:
    """`weaver_scale.py sim ...`: simulate ranks [lo, hi) until SIGTERM or `run_s`; print the counts."""
    result = asyncio.run(Simulator(a).run())
    print(json.dumps({"done": result}), flush=True)
    return 0


# ---- the driver -----------------------------------------------------------------------------------


async def _line(proc: asyncio.subprocess.Process, prefix: str, timeout_s: float) -> str:
    """The first line of `proc`'s output starting with `prefix` (others are skipped)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise RuntimeError(f"process {proc.pid} exited before printing {prefix!r}")
            text = raw.decode(errors="replace").strip()
            if text.startswith(prefix):
                return text


async def _stop(proc: asyncio.subprocess.Process, timeout_s: float = 20.0) -> None:
    """Terminate, wait, then kill."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _spawn(log: Path, *args: str) -> asyncio.subprocess.Process:
    """Start this script as a `weaver` or `sim` child, its stderr to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, __file__, *args, stdout=asyncio.subprocess.PIPE, stderr=err, env=env
        )


@contextlib.contextmanager
def _secured_server(tmp: Path) -> Iterator[EmbeddedNats]:
    store = CredentialStore.open(tmp / "secrets")
    with EmbeddedNats(tmp / "nats", credentials=store) as server:
        yield server


async def _watch_events(server: EmbeddedNats, job: str, seen: dict[str, int]) -> Any:
    """Count the job's events by kind (rank_dead, rank_hung, ...), read straight from NATS so the
    weaver does no extra work for it."""
    assert server.credentials is not None
    nc = await bus.connect(
        server.url, name="bench-events", credentials=server.credentials.client_auth(Role.WEAVER)
    )

    async def on_event(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            ev = wire.decode_event(msg.data)
            seen[ev.kind] = seen.get(ev.kind, 0) + 1

    await nc.subscribe(subjects.events(job), cb=on_event)
    return nc


async def measure(
    ranks: int,
    *,
    duration_s: float,
    hb_hz: float = 5.0,
    metrics_hz: float = 10.0,
    command_gap_s: float = 0.5,
    processes: int = 0,
    profile: Path | None = None,
    join_timeout_s: float = 180.0,
    dead_after_s: float = 0.0,
) -> dict[str, Any]:
    """Run one weaver against `ranks` simulated ranks and measure it over `duration_s`.

    `dead_after_s` > 0 overrides the weaver's default silence before a rank is dead.

    Raises:
        RuntimeError: a weaver or simulator process failed.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tl-scale-"))
    procs = processes or max(1, math.ceil(ranks / RANKS_PER_PROCESS))
    run_id = uuid.uuid4().hex[:12]
    children: list[asyncio.subprocess.Process] = []
    ok = False
    try:
        with _secured_server(tmp) as server:
            assert server.credentials is not None and server.pid is not None
            tokens_file = tmp / "grpc-tokens.json"
            token = tokens.TokenTable.load_or_create(tokens_file).token(tokens.TokenRole.OPERATOR)
            creds = server.credentials.nkey_user(Role.WEAVER).seed_file
            weaver_args = [
                "weaver", "--nats", server.url, "--key", str(tmp / "signing.key"),
                "--tokens", str(tokens_file), "--creds", str(creds),
            ]  # fmt: skip
            if profile is not None:
                weaver_args += ["--profile", str(profile)]
            if dead_after_s > 0:
                weaver_args += ["--dead-after", str(dead_after_s)]
            weaver = await _spawn(tmp / "weaver.log", *weaver_args)
            children.append(weaver)
            grpc = (await _line(weaver, "weaver ready:", 60.0)).rsplit(" ", 1)[1]
            # As the control plane does when a job registers: its credential and command stream.
            seed = server.grant_job(JOB).seed_file
            events: dict[str, int] = {}
            events_nc = await _watch_events(server, JOB, events)
            await bus.ensure_job_commands(events_nc.jetstream(timeout=10.0), JOB)
            t0 = time.time()
            sims = []
            for p in range(procs):
                lo, hi = ranks * p // procs, ranks * (p + 1) // procs
                sim_args = [
                    "sim", "--nats", server.url, "--creds", str(seed), "--job", JOB, "--run-id", run_id,
                    "--world", str(ranks), "--lo", str(lo), "--hi", str(hi), "--t0", repr(t0),
                    "--hb-hz", str(hb_hz), "--metrics-hz", str(metrics_hz),
                    "--run-s", str(join_timeout_s + duration_s + 60),
                ]  # fmt: skip
                sims.append(await _spawn(tmp / f"sim{p}.log", *sim_args))
            children.extend(sims)
            async with ControlClient(grpc, token=token, timeout_s=30.0) as client:
                joined_s, joined = await _wait_joined(client, ranks, join_timeout_s)
                for sim in sims:  # every consumer created, or the time is up (counted in the result)
                    with contextlib.suppress(TimeoutError):
                        await _line(sim, '{"subscribed"', max(1.0, join_timeout_s - joined_s))
                await asyncio.sleep(3.0)  # settle: first-heartbeat work and join events are done
                joining = dict(events)
                events.clear()
                pids = (weaver.pid, server.pid, [s.pid for s in sims])
                result = await _window(client, *pids, ranks, duration_s, command_gap_s)
            result["events"] = dict(events)
            result["events_while_joining"] = joining
            result["rank_dead_events"] = events.get("rank_dead", 0)
            await events_nc.close()
            sim_counts = []
            for sim in sims:
                with contextlib.suppress(ProcessLookupError):
                    sim.terminate()
            for sim in sims:  # a simulator too far behind to report in time is counted as silent
                with contextlib.suppress(TimeoutError, RuntimeError):
                    sim_counts.append(json.loads(await _line(sim, '{"done"', 60.0))["done"])
            await _stop(weaver)
        log = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        result.update(
            ranks=ranks,
            processes=procs,
            join_s=round(joined_s, 1),
            joined=joined,
            weaver_slow_consumer=sum(
                "Slow Consumer" in line and "torchloom-weaver" in line for line in log.splitlines()
            ),
            sims_reported=len(sim_counts),
            sim_max_send_gap_s=round(max((c["max_send_gap_s"] for c in sim_counts), default=-1.0), 3),
            sim_late_ticks=sum(c["late_ticks"] for c in sim_counts),
            sim_errors=sum(c["errors"] for c in sim_counts),
            heartbeats_sent=sum(c["heartbeats"] for c in sim_counts),
            metrics_sent=sum(c["metrics"] for c in sim_counts),
            acks_sent=sum(c["acks"] for c in sim_counts),
            sim_dropped=sum(c.get("dropped", 0) for c in sim_counts),
            consumers=sum(c["subscribed"] for c in sim_counts),
        )
        ok = True
        return result
    finally:
        for child in children:
            await _stop(child)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"weaver_scale: failed at {ranks} ranks; logs kept in {tmp}", file=sys.stderr)


async def _wait_joined(client: ControlClient, ranks: int, timeout_s: float) -> tuple[float, int]:
    """Seconds until the weaver's status shows every rank alive, and how many were (fewer when
    `timeout_s` passed first)."""
    start = time.monotonic()
    alive = 0
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(Exception):
            status = await client.status(JOB)
            alive = sum(r.alive for r in status.jobs[0].ranks)
            if alive == ranks:
                return time.monotonic() - start, alive
        await asyncio.sleep(1.0)
    return time.monotonic() - start, alive


async def _window(
    client: ControlClient,
    weaver_pid: int,
    nats_pid: int,
    sim_pids: list[int],
    ranks: int,
    duration_s: float,
    command_gap_s: float,
) -> dict[str, Any]:
    """Submit commands one after another and poll status for `duration_s`; CPU over the window."""
    load_before = os.getloadavg()
    cpu0 = {pid: cpu_s(pid) for pid in (weaver_pid, nats_pid, *sim_pids)}
    t0 = time.monotonic()
    end = t0 + duration_s
    latencies: list[float] = []
    weaver_side: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    polls = {"ages": [], "dead": 0, "not_alive_max": 0, "health": {}, "rss": []}

    async def submitter() -> None:
        i = 0
        while time.monotonic() < end:
            lr = 1e-3 if i % 2 else 2e-3
            start = time.perf_counter()
            try:
                out = await client.submit(
                    SubmitRequest(job=JOB, body=SetConfig(values={"lr": lr}), timeout_s=10.0)
                )
            except TorchloomError as exc:  # e.g. the command could not be stored: count, go on
                statuses["error"] = statuses.get("error", 0) + 1
                errors.append(str(exc)[:300])
                await asyncio.sleep(1.0)
                continue
            took = time.perf_counter() - start
            statuses[out.status.value] = statuses.get(out.status.value, 0) + 1
            if out.status is not OutcomeStatus.APPLIED:
                errors.append(f"{out.status.value}: {out.reason[:300]}")
            if out.status is OutcomeStatus.APPLIED:
                latencies.append(took)
                weaver_side.append(out.completed_at_s - out.submitted_at_s)
            i += 1
            await asyncio.sleep(command_gap_s)

    async def poller() -> None:
        while time.monotonic() < end:
            polls["rss"].append(rss_mib(weaver_pid))
            with contextlib.suppress(Exception):
                job = (await client.status(JOB)).jobs[0]
                polls["ages"].append(max(r.last_heartbeat_s for r in job.ranks))
                not_alive = sum(not r.alive for r in job.ranks)
                polls["not_alive_max"] = max(polls["not_alive_max"], not_alive)
                for r in job.ranks:
                    if r.health != "healthy":
                        polls["health"][r.health] = polls["health"].get(r.health, 0) + 1
            await asyncio.sleep(1.0)

    await asyncio.gather(submitter(), poller())
    elapsed = time.monotonic() - t0
    cpu = {pid: (cpu_s(pid) - cpu0[pid]) / elapsed for pid in cpu0}
    load_after = os.getloadavg()

    def ms(values: list[float], q: float) -> float | None:
        return round(pct(values, q) * 1e3, 1) if values else None

    ages = polls["ages"]
    return {
        "window_s": round(elapsed, 1),
        "weaver_cpu_cores": round(cpu[weaver_pid], 3),
        "weaver_rss_mib_max": round(max(polls["rss"]), 1),
        "nats_cpu_cores": round(cpu[nats_pid], 3),
        "sim_cpu_cores": round(sum(cpu[p] for p in sim_pids), 3),
        "commands": sum(statuses.values()),
        "outcomes": statuses,
        "command_errors": errors[:5],
        "cmd_p50_ms": ms(latencies, 50),
        "cmd_p99_ms": ms(latencies, 99),
        "cmd_max_ms": round(max(latencies) * 1e3, 1) if latencies else None,
        "cmd_weaver_p50_ms": ms(weaver_side, 50),
        "hb_age_max_s": round(max(ages), 3) if ages else None,
        "hb_age_median_s": round(statistics.median(ages), 3) if ages else None,
        "status_polls": len(ages),
        "ranks_not_alive_max": polls["not_alive_max"],
        "health_seen": polls["health"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


def goals(r: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals: under 1 core, command p99 under 50 ms, no rank falsely dead."""
    return {
        "cpu_under_1_core": r["weaver_cpu_cores"] < 1.0,
        "cmd_p99_under_50ms": r["cmd_p99_ms"] is not None
        and r["cmd_p99_ms"] < 50.0
        and r["outcomes"].get("applied", 0) == r["commands"],
        "no_rank_dead": r["joined"] == r["ranks"]
        and r["ranks_not_alive_max"] == 0
        and r["rank_dead_events"] == 0,
    }


def cost_model(ranks: int, hb_hz: float, repeat_s: float = 2.0) -> dict[str, Any]:
    """CPU cost (time.process_time, so a loaded machine inflates it less than wall time) of the
    weaver's per-message and per-tick work at `ranks` ranks, in-process on the weaver's own
    functions, and the cores they add up to at `hb_hz` heartbeats per rank and the weaver's 10 Hz
    liveness tick. The live run shows what a starved weaver does; this shows what it asks for."""
    from weaver import admission, health_plan, liveness
    from weaver.config import WeaverConfig
    from weaver.model import WeaverState

    config = WeaverConfig()
    policy, limits = config.policy(), config.limits()
    sim = Simulator(argparse.Namespace(lo=0, hi=ranks, job=JOB, run_id="model", world=ranks, t0=time.time()))
    now = time.time()
    state = WeaverState()
    payloads = [(subjects.heartbeat(JOB, sr.rank), sim.encoded_heartbeat(sr, now)) for sr in sim.ranks]

    def fold(subject: str, data: bytes, at: float) -> None:  # Weaver._on_heartbeat's work
        hb = wire.decode_heartbeat(data)
        assert admission.check_heartbeat(state, hb, subject, at, config.dead_after_s, limits) is None
        hb, _ = admission.clamp_last_seq(state, hb)
        liveness.observe_heartbeat(state, hb, at)

    def per_call(fn: Any) -> float:
        calls, start = 0, time.process_time()
        while time.process_time() - start < repeat_s:
            fn()
            calls += 1
        return (time.process_time() - start) / calls

    for subject, data in payloads:
        fold(subject, data, now)
    i = iter(range(1 << 60))
    hb_s = per_call(lambda: fold(*payloads[next(i) % ranks], time.time()))
    # A healthy job at `at`: every rank heard within the last heartbeat interval. decide_health
    # changes nothing, so every call sees the same state at the same time.
    at = time.time()
    for k, entry in enumerate(state.jobs[JOB].ranks.values()):
        entry.last_seen_s = entry.last_step_change_at = at - (k % 10) / (10 * hb_hz)
    tick_s = per_call(lambda: health_plan.decide_health(state, at, policy))
    status_s = per_call(lambda: liveness.status(state, JOB, at, policy))
    # One rank silent past dead_after_s: every stalled peer is checked against it (blame).
    silent = state.jobs[JOB].ranks[0]
    silent.last_seen_s = silent.last_step_change_at = at - 2 * config.dead_after_s
    tick_dead_s = per_call(lambda: health_plan.decide_health(state, at, policy))
    tick_hz = 1.0 / config.liveness_interval_s
    return {
        "ranks": ranks,
        "heartbeat_us": round(hb_s * 1e6, 1),
        "liveness_tick_ms": round(tick_s * 1e3, 2),
        "liveness_tick_one_dead_ms": round(tick_dead_s * 1e3, 2),
        "status_ms": round(status_s * 1e3, 2),
        "cores_heartbeats": round(hb_s * ranks * hb_hz, 3),
        "cores_liveness": round(tick_s * tick_hz, 3),
        "cores_liveness_one_dead": round(tick_dead_s * tick_hz, 3),
        "cores_total": round(hb_s * ranks * hb_hz + tick_s * tick_hz, 3),
    }


HEADER = (
    f"{'ranks':>6} {'cpu':>6} {'rss MiB':>8} {'p50 ms':>8} {'p99 ms':>8} {'cmds':>5} {'applied':>7} "
    f"{'hb age s':>8} {'dead':>5} {'slow':>4} {'sim gap s':>9} {'sim cpu':>7} {'nats cpu':>8} {'load':>6}"
)


def row(r: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return (
        f"{r['ranks']:>6} {r['weaver_cpu_cores']:>6.2f} {r['weaver_rss_mib_max']:>8.1f} "
        f"{num(r['cmd_p50_ms'], '8.1f')} {num(r['cmd_p99_ms'], '8.1f')} {r['commands']:>5} "
        f"{r['outcomes'].get('applied', 0):>7} {num(r['hb_age_max_s'], '8.2f')} "
        f"{max(r['ranks_not_alive_max'], r['rank_dead_events'], r['ranks'] - r['joined']):>5} "
        f"{r['weaver_slow_consumer']:>4} {r['sim_max_send_gap_s']:>9.2f} "
        f"{r['sim_cpu_cores']:>7.2f} {r['nats_cpu_cores']:>8.2f} {r['loadavg_before'][0]:>6.1f}"
    )


def print_profile(path: Path, top: int = 25) -> list[str]:
    """The `top` functions by own time in a cProfile dump, as printed lines."""
    stats = pstats.Stats(str(path))
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    lines = [f"{'own %':>6} {'cum s':>8} {'calls':>9}  function"]
    for (file, line, name), (_cc, calls, own, cum, _callers) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        lines.append(f"{100 * own / total:>6.1f} {cum:>8.2f} {calls:>9}  {name} ({where})")
    return lines


def bench(a: argparse.Namespace) -> int:
    counts = [int(x) for x in a.ranks.split(",")]
    runs = []
    print(HEADER, flush=True)
    for n in counts if not a.no_live else ():
        profile = Path(tempfile.mkdtemp(prefix="tl-scale-prof-")) / "weaver.prof" if a.profile else None
        try:
            r = asyncio.run(
                measure(
                    n,
                    duration_s=a.duration_s,
                    hb_hz=a.hb_hz,
                    metrics_hz=a.metrics_hz,
                    command_gap_s=a.command_gap_s,
                    processes=a.processes,
                    profile=profile,
                )
            )
        except (RuntimeError, TimeoutError) as exc:  # recorded; the next rank count still runs
            runs.append({"ranks": n, "failed": repr(exc)})
            print(f"{n:>6} failed: {exc!r}", flush=True)
            traceback.print_exc()
            continue
        r["goals"] = goals(r)
        if profile is not None:
            r["profile_top"] = print_profile(profile)
        runs.append(r)
        print(row(r), flush=True)
        for line in r.get("profile_top", ()):
            print("   ", line)
    models = []
    if a.model:
        print(
            f"\n{'ranks':>6} {'hb us':>7} {'tick ms':>8} {'dead tick ms':>12} {'status ms':>9} {'cores':>6}"
        )
        for n in counts:
            m = cost_model(n, a.hb_hz)
            models.append(m)
            print(
                f"{n:>6} {m['heartbeat_us']:>7.1f} {m['liveness_tick_ms']:>8.2f} "
                f"{m['liveness_tick_one_dead_ms']:>12.2f} {m['status_ms']:>9.2f} {m['cores_total']:>6.2f}",
                flush=True,
            )
    result = {
        "benchmark": "weaver_scale",
        "config": {
            "heartbeat_hz": a.hb_hz,
            "metrics_hz": a.metrics_hz,
            "duration_s": a.duration_s,
            "command_gap_s": a.command_gap_s,
            "simulated_step_hz": STEPS_PER_S,
            "ranks_verify_signatures": False,
            "ranks_ack_at_once": True,
        },
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "cost_model": models,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    w = sub.add_parser("weaver", help="(internal) the weaver process")
    w.add_argument("--nats", required=True)
    w.add_argument("--creds", required=True)
    w.add_argument("--key", required=True)
    w.add_argument("--tokens", required=True)
    w.add_argument("--profile", default="")
    w.add_argument("--dead-after", type=float, default=0.0)
    s = sub.add_parser("sim", help="(internal) one simulator process")
    s.add_argument("--nats", required=True)
    s.add_argument("--creds", required=True)
    s.add_argument("--job", required=True)
    s.add_argument("--run-id", required=True)
    s.add_argument("--world", type=int, required=True)
    s.add_argument("--lo", type=int, required=True)
    s.add_argument("--hi", type=int, required=True)
    s.add_argument("--t0", type=float, required=True)
    s.add_argument("--hb-hz", type=float, default=5.0)
    s.add_argument("--metrics-hz", type=float, default=10.0)
    s.add_argument("--run-s", type=float, required=True)
    p.add_argument(
        "--ranks", default="100,1000,3000", help="comma-separated rank counts (default 100,1000,3000)"
    )
    p.add_argument(
        "--duration-s", type=float, default=40.0, help="measured window per rank count (default 40)"
    )
    p.add_argument("--hb-hz", type=float, default=5.0, help="heartbeats per rank per second (default 5)")
    p.add_argument(
        "--metrics-hz", type=float, default=10.0, help="StepMetrics per rank per second (default 10)"
    )
    p.add_argument(
        "--command-gap-s", type=float, default=0.5, help="pause between two commands (default 0.5)"
    )
    p.add_argument(
        "--processes", type=int, default=0, help=f"simulator processes (0: one per {RANKS_PER_PROCESS})"
    )
    p.add_argument(
        "--profile", action="store_true", help="run the weaver under cProfile and print its hot spots"
    )
    p.add_argument("--model", action="store_true", help="also measure the CPU cost model in-process")
    p.add_argument("--no-live", action="store_true", help="skip the live runs (with --model)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "weaver_scale.json")
    a = p.parse_args(argv)
    if a.role is None:
        try:
            counts = [int(x) for x in a.ranks.split(",")]
        except ValueError:
            p.error(f"--ranks={a.ranks!r} rejected: expected comma-separated integers, e.g. 100,1000")
        if not all(1 <= n <= 4096 for n in counts):
            p.error(
                f"--ranks={a.ranks!r} rejected: each must be in [1, 4096] (the weaver's max_ranks_per_job)"
            )
        if not (a.duration_s > 0 and 0 < a.hb_hz <= 50 and 0 < a.metrics_hz <= 50 and a.command_gap_s >= 0):
            p.error("--duration-s must be > 0, --hb-hz and --metrics-hz in (0, 50], --command-gap-s >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role == "weaver":
        return serve_weaver(a)
    if a.role == "sim":
        return simulate(a)
    return bench(a)


if __name__ == "__main__":
    raise SystemExit(main())
