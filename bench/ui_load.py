"""UI load benchmark: N simulated ranks publish StepMetrics and Heartbeats at R Hz each to a real
nats-server while the dashboard is open in headless chromium; samples the JS heap (CDP
Performance.getMetrics) and frame times (requestAnimationFrame deltas) over time.

    .venv/bin/python bench/ui_load.py --duration-s 180

Prints a table and writes JSON to bench/results/ui_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from torchloom import subjects, wire
from torchloom.messages import DeviceHealth, Heartbeat, KnobSpec, KnobType, StepMetrics
from torchloom.nats_server import EmbeddedNats
from weaver.ui_server import UiServer

REPO = Path(__file__).resolve().parent.parent
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
JOB = "loadjob"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1800.0, help="how long to publish (default 1800)")
    p.add_argument("--ranks", type=int, default=64, help="simulated ranks (default 64)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="metrics+heartbeats per rank per s (10)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument(
        "--start-step", type=int, default=0, help="first step the ranks report (reach a late run fast; 0)"
    )
    p.add_argument(
        "--profile-at-s",
        type=float,
        default=0.0,
        help="take a 5 s CDP CPU profile at this time and print the hottest functions (0 = none)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ui_load.json")
    a = p.parse_args()
    if a.duration_s <= 0 or a.sample_s <= 0:
        p.error("--duration-s and --sample-s must be > 0")
    if not 1 <= a.ranks <= 1024:
        p.error(f"--ranks={a.ranks} must be in [1, 1024]")
    if a.start_step < 0:
        p.error(f"--start-step={a.start_step} must be >= 0")
    if not 0 < a.rate_hz <= 100:
        p.error(f"--rate-hz={a.rate_hz} must be in (0, 100]")
    return a


def row(s: dict[str, Any]) -> str:
    return (
        f"{s['t_s']:>6.0f} {s['js_heap_used_mib']:>9.1f} {s['dom_nodes']:>6} {s['fps']:>5.1f} "
        f"{s['frame_p50_ms']:>7.1f} {s['frame_p95_ms']:>7.1f} {s['frame_p99_ms']:>7.1f} "
        f"{s['frame_max_ms']:>7.1f} {s['eval_roundtrip_ms']:>8.1f} {s['metrics_received']:>11}"
    )


def knobs(lr: float) -> tuple[KnobSpec, ...]:
    return (
        KnobSpec(name="lr", type=KnobType.FLOAT, min=0.0, min_exclusive=True, max=10.0, value=lr),
        KnobSpec(name="weight_decay", type=KnobType.FLOAT, min=0.0, max=10.0, value=0.01),
    )


async def publish(
    url: str, ranks: int, rate_hz: float, start_step: int, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    """Publish one StepMetrics and one Heartbeat per rank per tick, on an absolute schedule."""
    nc = await nats.connect(url)
    try:
        period = 1.0 / rate_hz
        t0 = time.monotonic()
        tick = 0
        while not stop.is_set():
            step = (
                start_step + tick * 3
            )  # ~30 steps/s per rank, rate-limited to rate_hz reports, as a threadlet does
            lr = 1e-3 if (tick // 600) % 2 == 0 else 5e-4
            now = time.time()
            for r in range(ranks):
                loss = 2.0 * math.exp(-step / 5000) + 0.05 * math.sin(step / 7 + r)
                sm = StepMetrics(
                    job=JOB,
                    run_id="bench",
                    rank=r,
                    step=step,
                    time_s=now,
                    values={"loss": loss, "lr": lr, "step_time_s": 0.033, "tokens": 4096.0},
                )
                await nc.publish(subjects.metrics(JOB, r), wire.encode(sm))
                hb = Heartbeat(
                    job=JOB,
                    run_id="bench",
                    rank=r,
                    world_size=ranks,
                    incarnation=f"inc{r}",
                    host=f"node{r // 8}",
                    pid=1000 + r,
                    step=step,
                    sent_at_s=now,
                    step_time_s=0.033,
                    knobs=knobs(lr),
                    device=DeviceHealth(
                        kind="cuda",
                        device=f"GPU-{r}",
                        index=r % 8,
                        utilization_pct=90.0,
                        memory_used_bytes=60 << 30,
                        memory_total_bytes=80 << 30,
                        temperature_c=70.0,
                        power_w=650.0,
                        healthy=r != 13,
                        unhealthy_reason="" if r != 13 else "xid 79: GPU fell off the bus",
                        xids=() if r != 13 else (79,),
                    ),
                )
                await nc.publish(subjects.heartbeat(JOB, r), wire.encode(hb))
                counts["published"] += 2
            await nc.flush()
            tick += 1
            delay = t0 + tick * period - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                counts["late_ticks"] += 1
    finally:
        await nc.drain()


async def profile(cdp: Any, seconds: float) -> None:
    """Print the functions with the most self time in a CDP CPU profile of `seconds`."""
    await cdp.send("Profiler.enable")
    await cdp.send("Profiler.setSamplingInterval", {"interval": 500})
    await cdp.send("Profiler.start")
    await asyncio.sleep(seconds)
    prof = (await cdp.send("Profiler.stop"))["profile"]
    await cdp.send("Profiler.disable")
    hits = {n["id"]: 0 for n in prof["nodes"]}
    for sid in prof["samples"]:
        hits[sid] += 1
    total = max(1, len(prof["samples"]))
    by_fn: dict[str, int] = {}
    for n in prof["nodes"]:
        cf = n["callFrame"]
        where = f"{cf['url'].rsplit('/', 1)[-1]}:{cf['lineNumber']}:{cf['columnNumber']}"
        name = f"{cf['functionName'] or '(anon)'} {where}"
        by_fn[name] = by_fn.get(name, 0) + hits[n["id"]]
    print(f"CPU profile, {seconds:.0f} s, {total} samples; self time:")
    for name, h in sorted(by_fn.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {100 * h / total:5.1f}%  {name}")


async def run(a: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed: make browser-setup")
    samples: list[dict[str, Any]] = []
    counts = {"published": 0, "late_ticks": 0}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        async with UiServer(nats_ws_url=server.ws_url) as ui, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1500, "height": 1000})
                cdp = await page.context.new_cdp_session(page)
                await cdp.send("Performance.enable")
                await page.goto(f"{ui.viewer_url}&job={JOB}")
                stop = asyncio.Event()
                pub = asyncio.create_task(publish(server.url, a.ranks, a.rate_hz, a.start_step, stop, counts))
                t0 = time.monotonic()
                print(f"{'t_s':>6} {'heap_MiB':>9} {'nodes':>6} {'fps':>5} {'p50_ms':>7} {'p95_ms':>7} "
                      f"{'p99_ms':>7} {'max_ms':>7} {'eval_ms':>8} {'metrics_rx':>11}")  # fmt: skip
                profiled = a.profile_at_s <= 0
                try:
                    while (elapsed := time.monotonic() - t0) < a.duration_s:
                        if not profiled and elapsed >= a.profile_at_s:
                            profiled = True
                            await profile(cdp, 5.0)
                        await asyncio.sleep(min(a.sample_s, a.duration_s - elapsed))
                        if pub.done():
                            pub.result()
                        e0 = time.monotonic()
                        fs = await page.evaluate(
                            "() => { const s = window.__torchloom.frameStats();"
                            " window.__torchloom.resetFrameStats();"
                            " return {...s, rx: window.__torchloom.state.received.metrics,"
                            " conn: window.__torchloom.state.conn.state}; }"
                        )
                        eval_ms = (time.monotonic() - e0) * 1000
                        metrics = {
                            m["name"]: m["value"]
                            for m in (await cdp.send("Performance.getMetrics"))["metrics"]
                        }
                        t = time.monotonic() - t0
                        frames = fs["frames"]
                        sample = {
                            "t_s": round(t, 1),
                            "js_heap_used_mib": round(metrics["JSHeapUsedSize"] / 2**20, 2),
                            "js_heap_total_mib": round(metrics["JSHeapTotalSize"] / 2**20, 2),
                            "dom_nodes": int(metrics["Nodes"]),
                            "frames_total": frames,
                            "frame_p50_ms": round(fs["p50_ms"], 2),
                            "frame_p95_ms": round(fs["p95_ms"], 2),
                            "frame_p99_ms": round(fs["p99_ms"], 2),
                            "frame_max_ms": round(fs["max_ms"], 2),
                            "eval_roundtrip_ms": round(eval_ms, 1),
                            "metrics_received": fs["rx"],
                            "published": counts["published"],
                            "conn": fs["conn"],
                        }
                        if samples:
                            dt = t - samples[-1]["t_s"]
                            sample["fps"] = round((frames - samples[-1]["frames_total"]) / dt, 1)
                        else:
                            sample["fps"] = round(frames / t, 1)
                        samples.append(sample)
                        print(row(sample), flush=True)
                finally:
                    stop.set()
                    await pub
                await page.screenshot(path=str(a.out.with_suffix(".png")))
            finally:
                await browser.close()
    heaps = [s["js_heap_used_mib"] for s in samples]
    half = samples[len(samples) // 2 :] or samples
    return {
        "benchmark": "ui_load",
        "config": {
            "ranks": a.ranks,
            "rate_hz": a.rate_hz,
            "duration_s": a.duration_s,
            "sample_s": a.sample_s,
            "start_step": a.start_step,
            "messages_per_s": 2 * a.ranks * a.rate_hz,
        },
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "summary": {
            "heap_used_mib_min": min(heaps),
            "heap_used_mib_max": max(heaps),
            "heap_used_mib_last": heaps[-1],
            "heap_growth_second_half_mib": round(
                half[-1]["js_heap_used_mib"] - half[0]["js_heap_used_mib"], 2
            ),
            "fps_median": sorted(s["fps"] for s in samples)[len(samples) // 2],
            "frame_p95_ms_worst": max(s["frame_p95_ms"] for s in samples),
            "frame_max_ms_worst": max(s["frame_max_ms"] for s in samples),
            "metrics_received": samples[-1]["metrics_received"],
            "published": counts["published"],
            "late_publisher_ticks": counts["late_ticks"],
        },
        "samples": samples,
    }


def main() -> int:
    a = parse_args()
    result = asyncio.run(run(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
