"""The measurement of bench/weaver_scale.py: a secured nats-server, one real weaver process (as the
control plane runs it: signing, gRPC with a token, the Prometheus endpoint) and N simulated ranks
(bench/weaver_sim.py) in a few processes; over a window, commands submitted one after another and
the weaver's status, CPU (from /proc) and RSS polled. Also the in-process CPU cost model of the
weaver's per-message and per-tick work (`cost_model`).
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
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchloom import bus, subjects, tokens, wire
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, CredentialStore, Role, inbox_prefix
from torchloom.errors import TorchloomError
from torchloom.messages import OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from command_latency import pct  # noqa: E402  (a sibling script, not a package)
from weaver_sim import SCHEMA_FULL_HEARTBEATS, SCHEMA_REFRESH_S, Simulator  # noqa: E402

JOB = "scale"
RANKS_PER_PROCESS = 750
SCRAPE_EVERY_S = 15.0  # how often the window scrapes the weaver's /metrics (a common Prometheus interval)
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# The script the children run (`weaver_scale.py weaver|sim ...`).
SCRIPT = BENCH / "weaver_scale.py"


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
        metrics_port=0,  # the control plane serves the Prometheus endpoint by default
        **({"dead_after_s": a.dead_after} if a.dead_after else {}),
    )

    def ready(w: RunningWeaver) -> None:
        metrics = w.metrics.url if w.metrics is not None else "-"
        print(f"weaver ready: grpc {w.grpc_address} metrics {metrics}", flush=True)

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
            sys.executable, str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=err, env=env
        )


@contextlib.contextmanager
def _secured_server(tmp: Path) -> Iterator[EmbeddedNats]:
    store = CredentialStore.open(tmp / "secrets")
    with EmbeddedNats(tmp / "nats", credentials=store) as server:
        yield server


async def _watch_events(server: EmbeddedNats, job: str, seen: dict[str, int], samples: list[str]) -> Any:
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
            if ev.kind not in ("rank_joined", "command") and len(samples) < 12:
                samples.append(f"{ev.time_s:.2f} {ev.kind}: {ev.message[:300]}")

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
            ready = (await _line(weaver, "weaver ready:", 60.0)).split()
            grpc, metrics_url = ready[3], ready[5]
            # As the control plane does when a job registers: its credential and command stream.
            seed = server.grant_job(JOB).seed_file
            events: dict[str, int] = {}
            samples: list[str] = []
            events_nc = await _watch_events(server, JOB, events, samples)
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
                samples.clear()
                pids = (weaver.pid, server.pid, [s.pid for s in sims])
                # The job's first command also makes its ack capture: timed apart, as in
                # bench/command_latency.py, not one of the window's.
                start = time.perf_counter()
                first = await client.submit(
                    SubmitRequest(job=JOB, body=SetConfig(values={"lr": 1e-3}), timeout_s=30.0)
                )
                first_ms = round((time.perf_counter() - start) * 1e3, 1)
                await asyncio.sleep(command_gap_s)
                result = await _window(client, *pids, ranks, duration_s, command_gap_s, metrics_url)
            result["first_command"] = {"ms": first_ms, "status": first.status.value}
            result["events"] = dict(events)
            result["events_while_joining"] = joining
            result["rank_dead_events"] = events.get("rank_dead", 0)
            result["event_samples"] = list(samples)
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
            **_weaver_lag(tmp / "weaver.log"),
            sims_reported=len(sim_counts),
            sim_max_send_gap_s=round(max((c["max_send_gap_s"] for c in sim_counts), default=-1.0), 3),
            sim_late_ticks=sum(c["late_ticks"] for c in sim_counts),
            sim_errors=sum(c["errors"] for c in sim_counts),
            heartbeats_sent=sum(c["heartbeats"] for c in sim_counts),
            metrics_sent=sum(c["metrics"] for c in sim_counts),
            acks_sent=sum(c["acks"] for c in sim_counts),
            sim_dropped=sum(c.get("dropped", 0) for c in sim_counts),
            sim_acks_not_stored=sum(c.get("acks_not_stored", 0) for c in sim_counts),
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


def _weaver_lag(log: Path) -> dict[str, Any]:
    """How far behind its heartbeats the weaver said it was (its lag warnings), and how often."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lags = [float(x) for x in re.findall(r"is ([0-9.]+) s behind its heartbeats", text)]
    lags += [float(x) for x in re.findall(r"at most ([0-9.]+) s behind", text)]
    return {
        "weaver_lag_episodes": text.count("behind its heartbeats ("),
        "weaver_lag_max_s": max(lags, default=0.0),
        "weaver_heartbeat_connection_lost": text.count("heartbeat connection lost"),
    }


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


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30.0) as resp:
        return str(resp.read().decode())


async def _window(
    client: ControlClient,
    weaver_pid: int,
    nats_pid: int,
    sim_pids: list[int],
    ranks: int,
    duration_s: float,
    command_gap_s: float,
    metrics_url: str,
) -> dict[str, Any]:
    """Submit commands one after another, poll status and scrape /metrics for `duration_s`; CPU
    over the window."""
    load_before = os.getloadavg()
    cpu0 = {pid: cpu_s(pid) for pid in (weaver_pid, nats_pid, *sim_pids)}
    t0 = time.monotonic()
    end = t0 + duration_s
    latencies: list[float] = []
    weaver_side: list[float] = []
    to_every_ack: list[float] = []
    parts: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    polls = {"ages": [], "dead": 0, "not_alive_max": 0, "health": {}, "rss": []}
    scrapes: list[float] = []
    scraped_loss = [0]

    async def submitter() -> None:
        i = 0
        while time.monotonic() < end:
            lr = 1e-3 if i % 2 else 2e-3
            start, wall = time.perf_counter(), time.time()
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
                to_every_ack.append(out.completed_at_s - wall)  # the measure
                weaver_side.append(out.completed_at_s - out.submitted_at_s)
                if out.results:  # where the time went, by the timestamps the outcome carries
                    recv = [r.received_at_s for r in out.results]
                    acked = max(r.decided_at_s for r in out.results)
                    for part, value in (
                        ("client_to_weaver", out.submitted_at_s - wall),
                        ("validate_sign", out.published_at_s - out.submitted_at_s),
                        ("publish_to_first_rank", min(recv) - out.published_at_s),
                        ("first_to_last_rank", max(recv) - min(recv)),
                        ("last_rank_to_last_ack", acked - max(recv)),
                        ("last_ack_to_outcome", out.completed_at_s - acked),
                        ("outcome_to_client", wall + took - out.completed_at_s),
                    ):
                        parts.setdefault(part, []).append(value)
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

    async def scraper() -> None:
        """Scrape as Prometheus would: how long one takes, and how many ranks' loss it carries."""
        while time.monotonic() < end and metrics_url != "-":
            start = time.perf_counter()
            with contextlib.suppress(Exception):
                body = await asyncio.to_thread(_get, metrics_url)
                scrapes.append(time.perf_counter() - start)
                scraped_loss[0] = sum(line.startswith("torchloom_rank_loss{") for line in body.splitlines())
            # The next scrape, or the window's end: a window shorter than the interval ends on time.
            await asyncio.sleep(max(0.0, min(SCRAPE_EVERY_S, end - time.monotonic())))

    await asyncio.gather(submitter(), poller(), scraper())
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
        "to_every_ack_p50_ms": ms(to_every_ack, 50),
        "to_every_ack_p99_ms": ms(to_every_ack, 99),
        "cmd_parts_p50_p99_ms": {k: (ms(v, 50), ms(v, 99)) for k, v in parts.items()},
        "hb_age_max_s": round(max(ages), 3) if ages else None,
        "hb_age_median_s": round(statistics.median(ages), 3) if ages else None,
        "status_polls": len(ages),
        "scrapes": len(scrapes),
        "scrape_max_ms": ms(scrapes, 100),
        "scraped_ranks_with_loss": scraped_loss[0],
        "ranks_not_alive_max": polls["not_alive_max"],
        "health_seen": polls["health"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


class _Delivered:
    """What the weaver's handlers read of a nats-py `Msg` (made before the callback, in nats-py's own
    cost per message, which the model leaves out)."""

    __slots__ = ("data", "reply", "subject")

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data, self.reply = subject, data, ""


def cost_model(ranks: int, hb_hz: float, metrics_hz: float, repeat_s: float = 2.0) -> dict[str, Any]:
    """CPU cost (time.process_time, so a loaded machine inflates it less than wall time) of the
    weaver's per-message and per-tick work at `ranks` ranks, in-process on the weaver's own
    functions, and the cores they add up to at `hb_hz` heartbeats and `metrics_hz` metrics per rank
    and the weaver's 10 Hz liveness tick. The live run shows what a starved weaver does; this shows
    what it asks for. Not in it: nats-py's own cost per delivered message.

    Heartbeats are folded as the simulated ranks send them: each rank's schema in full on 3 of
    every `SCHEMA_REFRESH_S` x `hb_hz` heartbeats, else its hash and values, and its device sample
    moving every heartbeat; that mix gives the cores. Apart: a hash-only heartbeat whose device did
    not move (`heartbeat_hashed_us`), one whose device moved (`heartbeat_moved_us`) and one whose
    knob values moved too, as under an lr schedule (`heartbeat_values_moved_us`)."""
    from weaver import health_plan, liveness
    from weaver.config import WeaverConfig
    from weaver.health_loop import HEALTH_CHECK_INTERVAL_S
    from weaver.service import Weaver
    from weaver.telemetry import METRICS_SAMPLE_S

    config = WeaverConfig()
    policy = config.policy()
    sim = Simulator(
        argparse.Namespace(lo=0, hi=ranks, job=JOB, run_id="model", world=ranks, t0=time.time(), hb_hz=hb_hz)
    )
    now = time.time()
    # The weaver's own handlers, on a weaver that is never started (no bus): what a message costs it
    # past nats-py, every check included. A handler that never waits finishes on its first send.
    weaver = Weaver(config)
    weaver.metrics.serving = 1  # the control plane serves /metrics: unwatched metrics are sampled
    state = weaver.state
    on_heartbeat = weaver.telemetry.on_heartbeat
    later = now + 1.0 / hb_hz  # the next heartbeat: step, time and the device sample moved

    def heartbeats(at: float, *, full: bool) -> list[_Delivered]:
        return [
            _Delivered(subjects.heartbeat(JOB, sr.rank), sim.encoded_heartbeat(sr, at, full=full))
            for sr in sim.ranks
        ]

    full, hashed, hashed_later = (
        heartbeats(now, full=True),
        heartbeats(now, full=False),
        heartbeats(later, full=False),
    )
    # Under an lr schedule every heartbeat reports another lr.
    scheduled = [
        _Delivered(
            d.subject,
            wire.encode(
                dataclasses.replace(
                    hb := sim.heartbeat(sr, at, full=False),
                    knob_values={**hb.knob_values, "lr": 1e-3 * (1 + k % 2)},
                )
            ),
        )
        for k, at in enumerate((now, later))
        for d, sr in zip(hashed, sim.ranks, strict=True)
    ]
    metrics = [(subjects.metrics(JOB, sr.rank), sim.encoded_metrics(sr, now)) for sr in sim.ranks]

    # A bare try, not contextlib.suppress: its own microseconds are no part of the weaver's cost.
    def deliver(handler: Any, batch: list[_Delivered]) -> None:
        for msg in batch:
            try:  # noqa: SIM105
                handler(msg).send(None)
            except StopIteration:
                pass

    def fold_all(batch: list[_Delivered]) -> None:
        deliver(on_heartbeat, batch)

    def per_message(handler: Any, *batches: list[_Delivered]) -> float:
        """CPU per message, `handler` given every message of `batches` in turn (each holds one of
        every rank) until `repeat_s` has passed."""
        done, start = 0, time.process_time()
        while time.process_time() - start < repeat_s:
            for batch in batches:
                deliver(handler, batch)
                done += len(batch)
        return (time.process_time() - start) / done

    def per_call(fn: Any) -> float:
        calls, start = 0, time.process_time()
        while time.process_time() - start < repeat_s:
            fn()
            calls += 1
        return (time.process_time() - start) / calls

    fold_all(full)
    fold_all(hashed)
    hashed_s = per_message(on_heartbeat, hashed)  # the same heartbeat again: nothing else moved
    moved_s = per_message(on_heartbeat, hashed_later, hashed)
    values_moved_s = per_message(on_heartbeat, scheduled[ranks:], scheduled[:ranks])
    # A rank's cycle: the schema in full on its first 3 heartbeats (after hash-only ones), then
    # hash-only ones to the end of the refresh period; the device moves every time.
    cycle = max(SCHEMA_FULL_HEARTBEATS + 1, round(SCHEMA_REFRESH_S * hb_hz))
    full_later = heartbeats(later, full=True)
    full_time = rest_time = 0.0
    cycles = 0
    while not cycles or full_time + rest_time < repeat_s:
        fold_all(hashed_later)
        start = time.process_time()
        for k in range(SCHEMA_FULL_HEARTBEATS):
            fold_all(full if k % 2 == 0 else full_later)
        mid = time.process_time()
        for k in range(cycle - SCHEMA_FULL_HEARTBEATS):
            fold_all(hashed if k % 2 == 0 else hashed_later)
        full_time, rest_time = full_time + mid - start, rest_time + time.process_time() - mid
        cycles += 1
    full_s = full_time / (cycles * SCHEMA_FULL_HEARTBEATS * ranks)
    rest_s = rest_time / (cycles * (cycle - SCHEMA_FULL_HEARTBEATS) * ranks)
    hb_s = (SCHEMA_FULL_HEARTBEATS * full_s + (cycle - SCHEMA_FULL_HEARTBEATS) * rest_s) / cycle
    reports = [_Delivered(subject, data) for subject, data in metrics]
    on_metrics = weaver.telemetry.on_metrics
    read_at = weaver.telemetry._metrics_read_at

    async def decode_only(msg: _Delivered) -> None:
        wire.decode_metrics(msg.data)

    async def read_one(msg: _Delivered) -> None:
        read_at.clear()  # as if this rank's last report was read over METRICS_SAMPLE_S ago
        await on_metrics(msg)

    metrics_s = per_message(decode_only, reports)
    deliver(on_metrics, reports)
    # Within METRICS_SAMPLE_S of a rank's last read report, its next ones are passed over.
    skipped_s = per_message(on_metrics, reports)
    read_s = per_message(read_one, reports)
    read_share = min(1.0, 1.0 / (metrics_hz * METRICS_SAMPLE_S))
    metrics_handled_s = read_share * read_s + (1 - read_share) * skipped_s
    # A healthy job at `at`: every rank heard within the last heartbeat interval. decide_health
    # changes nothing, so every call sees the same state at the same time.
    at = time.time()
    for k, entry in enumerate(state.jobs[JOB].ranks.values()):
        entry.last_seen_s = entry.last_step_change_at = at - (k % 10) / (10 * hb_hz)
    tick_s = per_call(lambda: health_plan.decide_health(state, at, policy))
    scan_s = per_call(lambda: liveness.silent_ranks(state, at, config.dead_after_s))
    status_s = per_call(lambda: liveness.status(state, JOB, at, policy))
    # One rank silent past dead_after_s: every stalled peer is checked against it (blame).
    silent = state.jobs[JOB].ranks[0]
    silent.last_seen_s = silent.last_step_change_at = at - 2 * config.dead_after_s
    tick_dead_s = per_call(lambda: health_plan.decide_health(state, at, policy))
    # Half the ranks silent at once (a switch lost, or a starved weaver's view), the other half
    # blocked at the next step, their heartbeats showing it still: every blocked rank waits on
    # every silent one.
    for k, entry in enumerate(state.jobs[JOB].ranks.values()):
        quiet = k % 2 == 0
        entry.last_step_change_at = at - 1.0 - 0.5 * quiet
        entry.last_seen_s = at - 1.0 - (k % 10) / (10 * hb_hz) if quiet else at - (k % 10) / (10 * hb_hz)
    tick_half_quiet_s = per_call(lambda: health_plan.decide_health(state, at, policy))
    tick_hz = 1.0 / config.liveness_interval_s
    # HealthLoop.run: a scan of the silent ranks every tick, the full check at 2 Hz when the
    # silent ranks do not change.
    full_hz = 1.0 / max(config.liveness_interval_s, HEALTH_CHECK_INTERVAL_S)
    cores_liveness = scan_s * tick_hz + tick_s * full_hz
    cores_hb = hb_s * ranks * hb_hz
    cores_metrics = metrics_s * ranks * metrics_hz
    cores_metrics_handled = metrics_handled_s * ranks * metrics_hz
    return {
        "ranks": ranks,
        "heartbeat_full_us": round(full_s * 1e6, 1),
        "heartbeat_hashed_us": round(hashed_s * 1e6, 1),
        "heartbeat_moved_us": round(moved_s * 1e6, 1),
        "heartbeat_values_moved_us": round(values_moved_s * 1e6, 1),
        "heartbeat_mix_us": round(hb_s * 1e6, 1),
        "metrics_decode_us": round(metrics_s * 1e6, 1),
        "metrics_read_us": round(read_s * 1e6, 1),
        "metrics_skipped_us": round(skipped_s * 1e6, 2),
        "liveness_tick_ms": round(tick_s * 1e3, 2),
        "liveness_tick_one_dead_ms": round(tick_dead_s * 1e3, 2),
        "liveness_tick_half_quiet_ms": round(tick_half_quiet_s * 1e3, 2),
        "status_ms": round(status_s * 1e3, 2),
        "cores_heartbeats": round(cores_hb, 3),
        "cores_metrics_if_all_decoded": round(cores_metrics, 3),
        "cores_metrics": round(cores_metrics_handled, 3),
        "silent_scan_ms": round(scan_s * 1e3, 3),
        "cores_liveness": round(cores_liveness, 3),
        "cores_liveness_if_full_every_tick": round(tick_s * tick_hz, 3),
        "cores_liveness_one_dead": round(tick_dead_s * full_hz, 3),
        "cores_total": round(cores_hb + cores_metrics_handled + cores_liveness, 3),
    }
