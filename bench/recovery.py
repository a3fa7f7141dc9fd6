"""Recovery benchmark: how fast a 2-rank CPU torchrun job under a real weaver notices a crash (kill -9),
a hang and an XID 79, how long until it trains again, and how many steps it redoes.

Each scenario runs `torchloom run` of tests/integration/scripts/reconf_train.py against an embedded
nats-server and a standalone weaver (`python -m weaver`, so its thresholds are ours). Times come from
the weaver's JobEvents and the ranks' own per-step records (wall clock, one machine). Prints a table
and writes bench/results/recovery.json.

    .venv/bin/python bench/recovery.py --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats

from torchloom import subjects, wire
from torchloom.client import ControlClient
from torchloom.messages import Action, ActionKind, Issuer, JobEvent, OutcomeStatus, SubmitRequest
from torchloom.nats_server import EmbeddedNats

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "integration" / "scripts" / "reconf_train.py"
RESULTS = REPO / "bench" / "results" / "recovery.json"
JOB = "recovery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(out: Path, rank: int) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


async def _events(url: str) -> list[JobEvent]:
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe(
            subjects.events(JOB), stream=subjects.STREAM_JOURNAL, ordered_consumer=True
        )
        out: list[JobEvent] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            out.append(wire.decode_event(msg.data))
    finally:
        await nc.close()


async def _until(check: Any, deadline_s: float, what: str) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} within {deadline_s:g}s")
        await asyncio.sleep(0.05)


async def _stop(proc: asyncio.subprocess.Process, grace_s: float = 30.0) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _stack(
    work: Path, env: dict[str, str], weaver_args: list[str], run_args: list[str]
) -> AsyncIterator[tuple[str, str, asyncio.subprocess.Process]]:
    """NATS, a standalone weaver and `torchloom run` reusing it; everything stopped on the way out."""
    nats_server = EmbeddedNats(work / "nats")
    await asyncio.to_thread(nats_server.start)
    grpc = f"127.0.0.1:{_free_port()}"
    weaver = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "weaver", "--nats", nats_server.url, "--grpc", grpc, *weaver_args, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    run: asyncio.subprocess.Process | None = None
    try:

        async def answers() -> bool:
            try:
                async with asyncio.timeout(3), ControlClient(grpc) as c:
                    await c.status()
            except Exception:  # not bound yet
                return False
            return True

        await _until(answers, 60, "weaver")
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torchloom.app.cli", "run", "--job", JOB, "--nats", nats_server.url,
            "--grpc", grpc, "--nproc-per-node", "2", *run_args, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        yield nats_server.url, grpc, run
    finally:
        if run is not None:
            await _stop(run)
        await _stop(weaver)
        await asyncio.to_thread(nats_server.stop)


def _first_of(events: list[JobEvent], kind: str, **attrs: str) -> JobEvent | None:
    return next(
        (e for e in events if e.kind == kind and all(e.attrs.get(k) == v for k, v in attrs.items())), None
    )


def _after_restart(out: Path, fault_t: float, base_run: str) -> dict[str, Any]:
    """Fault -> training again, from the ranks' records of the first and the restarted attempt."""
    recs = [r for rank in (0, 1) for r in _records(out, rank)]
    first = [r for r in recs if r["run"] == base_run]
    again = [r for r in recs if r["run"] != base_run]
    if not again:
        return {}
    trained = max(r["step"] for r in first) + 1
    resume = min(r["step"] for r in again)
    first_t = min(r["t"] for r in again)
    start_t = min(r["start_t"] for r in again)
    return {
        "fault_to_training_s": first_t - fault_t,
        "restart_processes_s": start_t - fault_t,  # fault -> new worker processes start
        "checkpoint_load_s": max(r["attach_s"] for r in again),  # attach, which loads the checkpoint
        "steps_trained_before": trained,
        "resume_step": resume,
        "steps_redone": max(0, trained - resume),
    }


async def crash(work: Path, env: dict[str, str], dead_after_s: float) -> dict[str, Any]:
    """kill -9 of rank 1 after a checkpoint; torchrun restarts the group (--max-restarts 1)."""
    out = work / "out"
    script = [str(SCRIPT), "--steps", "250", "--step-sleep", "0.02", "--out", str(out)]
    weaver = ["--dead-after", str(dead_after_s), "--health-policy", "alert"]
    async with _stack(work, env, weaver, ["--max-restarts", "1", *script]) as (url, grpc, run):
        async with ControlClient(grpc) as client:

            async def at(step: int) -> Any:
                try:
                    reply = await client.status(JOB)
                except Exception:  # no heartbeat yet
                    return None
                ranks = [r for r in reply.jobs[0].ranks if r.alive] if reply.jobs else []
                return reply if len(ranks) == 2 and min(r.step for r in ranks) >= step else None

            reply = await _until(lambda: at(10), 90, "2 ranks at step 10")
            base_run = reply.jobs[0].run_id
            done = await client.submit(
                SubmitRequest(job=JOB, issuer=Issuer(kind="bench"), body=Action(kind=ActionKind.CHECKPOINT))
            )
            assert done.status is OutcomeStatus.APPLIED, done
            ck = int(done.results[0].detail["checkpoint_step"])
            reply = await _until(lambda: at(ck + 5), 60, "steps past the checkpoint")
            pid = next(r.pid for r in reply.jobs[0].ranks if r.rank == 1)
            os.kill(pid, signal.SIGKILL)
            kill_t = time.time()
        async with asyncio.timeout(120):
            code = await run.wait()
        events = await _events(url)
    dead = _first_of(events, "rank_dead", rank="1")
    resumed = _first_of(events, "resumed")
    res = {"exit": code, "detect_s": dead.time_s - kill_t if dead else None}
    res |= _after_restart(out, kill_t, base_run)
    res["weaver_steps_lost"] = int(resumed.attrs["steps_lost"]) if resumed else None
    return res


async def hang(work: Path, env: dict[str, str], dead_after_s: float, hung_after_s: float) -> dict[str, Any]:
    """Rank 1 stalls for a few seconds at step 20."""
    out = work / "out"
    script = [
        str(SCRIPT),
        "--steps",
        "60",
        "--hang-at",
        "20",
        "--hang-s",
        str(hung_after_s + 3),
        "--out",
        str(out),
    ]
    weaver = ["--dead-after", str(dead_after_s), "--hung-after", str(hung_after_s)]
    async with _stack(work, env, weaver, script) as (url, _grpc, run):
        async with asyncio.timeout(120):
            code = await run.wait()
        events = await _events(url)
    start = json.loads((out / "hang.json").read_text())["t"]
    hung = _first_of(events, "rank_hung", rank="1")
    raw = hung.time_s - start if hung else None
    false_dead = sum(e.kind == "rank_dead" for e in events)  # nobody died: any is a false alarm
    return {
        "exit": code,
        "detect_raw_s": raw,
        "detect_net_s": raw - hung_after_s if raw is not None else None,
        "false_dead": false_dead,
    }


async def xid(work: Path, env: dict[str, str], dead_after_s: float) -> dict[str, Any]:
    """XID 79 on rank 1 at step 30 under --health-policy reconfigure: checkpoint, relaunch on 1 rank."""
    out = work / "out"
    script = [str(SCRIPT), "--steps", "90", "--xid-at", "30", "--out", str(out)]
    weaver = ["--dead-after", str(dead_after_s), "--health-policy", "reconfigure"]
    async with _stack(work, env, weaver, script) as (url, _grpc, run):
        async with asyncio.timeout(120):
            code = await run.wait()
        events = await _events(url)
    recs = _records(out, 1)
    # The fake device reports the XID once the rank's step count reaches 30: right after step 29 ends.
    fault_t = next(r["t"] for r in recs if r["step"] == 29)
    base_run = recs[0]["run"]
    unhealthy = _first_of(events, "device_unhealthy", rank="1")
    restarting = _first_of(events, "reconfigure_restarting")
    started = next((e for e in events if e.kind == "run_started" and e.run_id != base_run), None)
    res: dict[str, Any] = {"exit": code, "detect_s": unhealthy.time_s - fault_t if unhealthy else None}
    res |= _after_restart(out, fault_t, base_run)
    if restarting and started:
        res["relaunch_to_heartbeat_s"] = started.time_s - restarting.time_s
    res["weaver_steps_lost"] = int(restarting.attrs["steps_lost"]) if restarting else None
    # Ranks the supervisor stopped on purpose go silent too; only earlier deaths are false alarms.
    stop_t = restarting.time_s if restarting else float("inf")
    res["false_dead"] = sum(e.kind == "rank_dead" and e.time_s < stop_t for e in events)
    return res


def _summary(rows: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dead-after", type=float, default=0.8)
    p.add_argument("--hung-after", type=float, default=1.0)
    p.add_argument("--only", choices=("crash", "hang", "xid"), action="append")
    args = p.parse_args()
    scenarios = args.only or ["crash", "hang", "xid"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    for rep in range(args.reps):
        for name in scenarios:
            with tempfile.TemporaryDirectory(prefix=f"tl-recovery-{name}-") as tmp:
                work = Path(tmp)
                env = dict(os.environ)
                for var in ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID"):
                    env.pop(var, None)
                env |= {
                    "TORCHLOOM_HOME": str(work / "home"),
                    "TORCHLOOM_CHECKPOINT_DIR": str(work / "ckpt"),
                    "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1",
                }
                if name == "crash":
                    row = await crash(work, env, args.dead_after)
                elif name == "hang":
                    row = await hang(work, env, args.dead_after, args.hung_after)
                else:
                    row = await xid(work, env, args.dead_after)
            print(f"rep {rep} {name}: {json.dumps(row)}", flush=True)
            results[name].append(row)
    keys = {
        "crash": [
            "detect_s", "fault_to_training_s", "restart_processes_s", "checkpoint_load_s",
            "steps_redone", "weaver_steps_lost",
        ],
        "hang": ["detect_raw_s", "detect_net_s", "false_dead"],
        "xid": [
            "detect_s", "fault_to_training_s", "relaunch_to_heartbeat_s", "checkpoint_load_s",
            "steps_redone", "weaver_steps_lost", "false_dead",
        ],
    }  # fmt: skip
    print(f"\n{'scenario':<8} {'metric':<26} median [min, max] over {args.reps} run(s)")
    for name in scenarios:
        for key in keys[name]:
            print(f"{name:<8} {key:<26} {_summary(results[name], key)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "dead_after_s": args.dead_after,
                "hung_after_s": args.hung_after,
                "heartbeat_interval_s": float(os.environ.get("TORCHLOOM_HEARTBEAT_INTERVAL_S", "0.2")),
                "cpus": os.cpu_count(),
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
