"""The web UI against a REAL job: nats-server, an in-process weaver, the UI server, and a 2-rank
torchrun of examples/train_tiny.py; headless Debian chromium driven by Playwright does what a person
would (watch the loss, set lr, pause/resume) and the page's debug hook shows what it plotted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from torchloom.nats_server import EmbeddedNats
from weaver.config import WeaverConfig
from weaver.service import Weaver
from weaver.ui_server import UiServer

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium")
EXAMPLE = REPO / "examples" / "train_tiny.py"
ARTIFACTS = REPO / "test-artifacts"
JOB = "uijob"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if CHROMIUM is None:
    pytest.skip("chromium is not installed (make browser-setup)", allow_module_level=True)
try:
    from playwright.async_api import Page, async_playwright
except ImportError:
    pytest.skip("the playwright pip package is not installed (make browser-setup)", allow_module_level=True)


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


async def control_msg(page: Page) -> str:
    return await page.text_content("#control-msg") or ""


@pytest.fixture
def job(
    tmp_path: Path, subprocess_env: dict[str, str], nats_server: EmbeddedNats
) -> Iterator[Callable[..., None]]:
    """Start the 2-rank job on demand; it is stopped (terminate, wait, kill its group) afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*, steps: int = 400, step_sleep: float = 0.02) -> None:
        env = dict(subprocess_env)
        env.update(
            TORCHLOOM_NATS_URL=nats_server.url, TORCHLOOM_JOB=JOB, TORCHLOOM_RUN_ID=uuid.uuid4().hex[:12]
        )
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(EXAMPLE), "--steps", str(steps), "--step-sleep", str(step_sleep),
            "--out", str(tmp_path / "out"),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=open(tmp_path / "torchrun.log", "wb"),  # noqa: SIM115 (closed with the process)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)


@pytest.fixture
async def page(nats_server: EmbeddedNats) -> AsyncIterator[Page]:
    """Weaver + UI server + a chromium page open on the UI."""
    async with (
        Weaver(WeaverConfig(nats_url=nats_server.url, dead_after_s=5.0)),
        UiServer(nats_ws_url=nats_server.ws_url) as ui,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            pg = await browser.new_page(viewport={"width": 1500, "height": 1000})
            # Page errors go to the test's output, where a failing run shows them.
            pg.on("console", lambda m: print(f"[page {m.type}] {m.text}"))
            pg.on("pageerror", lambda e: print(f"[page error] {e}"))
            await pg.goto(ui.url)
            yield pg
        finally:
            await browser.close()


async def hook(page: Page, expr: str) -> Any:
    return await page.evaluate(f"() => window.__torchloom.{expr}")


async def wait_knobs(page: Page) -> None:
    await until("the lr knob in the control panel", lambda: page.locator('[data-knob="lr"]').count())


async def test_watch_loss_and_set_lr_live(page: Page, job: Callable[..., None]) -> None:
    job()
    await until("connected banner", lambda: page.locator("#conn.connected").count())
    # The loss chart gains points as the job trains.
    await until("loss points from both ranks", lambda: hook(page, "seriesKeys('loss').length >= 2"))
    first = len((await hook(page, "series('loss', 'r0')"))["steps"])
    await until("more loss points", lambda: hook(page, f"series('loss', 'r0').steps.length > {first}"))
    await until("the loss chart drawn", lambda: page.locator('.chart[data-metric="loss"] canvas').count())
    await wait_knobs(page)

    # Out of bounds: refused in the page, with the bound named; nothing reaches the weaver.
    await page.fill('[data-knob="lr"]', "-1")
    await page.click('[data-set="lr"]')
    assert await page.text_content("#control-msg") == "lr=-1 rejected: must be in (0, 10]"
    assert not [e for e in await hook(page, "timeline()") if e["kind"] == "command"]

    # A valid value: sent through api.submit, acknowledged by both ranks, shown in the timeline.
    old_lr = (await hook(page, "series('lr', 'r0')"))["values"][-1]
    assert old_lr == pytest.approx(1e-3)
    await page.fill('[data-knob="lr"]', "0.02")
    await page.press('[data-knob="lr"]', "Enter")
    await until("a final outcome", lambda: page.locator("#control-msg:not(.pending)").count(), timeout_s=40)
    msg = await control_msg(page)
    assert "set lr=0.02: applied" in msg, msg
    entry = page.locator("#timeline .entry.command").first
    text = await entry.text_content()
    assert text is not None and "set lr=0.02" in text and "applied" in text and "by ui:" in text
    assert "rank 0: applied" in text and "rank 1: applied" in text
    cmd = next(e for e in await hook(page, "timeline()") if e["kind"] == "command")
    steps = {int(r): x["step"] for r, x in cmd["ranks"].items()}
    assert set(steps) == {0, 1}
    assert steps[0] == steps[1]  # the same step on every rank
    applied_at = steps[0]

    # The lr chart changes at exactly that step, on both ranks.
    for key in ("r0", "r1"):
        await until(
            f"lr points after step {applied_at} on {key}",
            lambda key=key: hook(page, f"series('lr', '{key}').steps.some(s => s >= {applied_at})"),
        )
        series = await hook(page, f"series('lr', '{key}')")
        for step, lr in zip(series["steps"], series["values"], strict=True):
            expected = 0.02 if step >= applied_at else 1e-3
            assert lr == pytest.approx(expected), (key, step, lr, applied_at)
    await until(
        "the knob's current value", lambda: page.locator('[data-current="lr"]', has_text="0.02").count()
    )

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "ui-live.png"), full_page=True)


async def test_pause_and_resume_from_the_page(page: Page, job: Callable[..., None]) -> None:
    job(steps=400, step_sleep=0.02)
    await until(
        "both ranks in the device panel",
        lambda: page.evaluate("() => document.querySelectorAll('#devices tbody tr').length === 2"),
    )
    await wait_knobs(page)

    await page.click('[data-action="pause"]')
    await until("pause applied", lambda: page.locator("#control-msg.ok").count(), timeout_s=40)
    assert "pause: applied" in (await page.text_content("#control-msg") or "")
    await until(
        "both ranks shown paused",
        lambda: page.evaluate(
            "() => [...document.querySelectorAll('#devices tbody tr td:nth-child(2)')]"
            ".every(td => td.textContent.startsWith('paused'))"
        ),
    )
    paused_steps = await page.evaluate(
        "() => [...document.querySelectorAll('#devices tbody tr td:nth-child(3)')].map(td => +td.textContent)"
    )
    pause_entry = page.locator("#timeline .entry.command", has_text="pause")
    assert "applied" in (await pause_entry.first.text_content() or "")

    await page.click('[data-action="resume"]')
    await until(
        "resume applied",
        lambda: page.locator("#control-msg.ok", has_text="resume: applied").count(),
        timeout_s=40,
    )
    await until(
        "both ranks running past the paused step",
        lambda: page.evaluate(
            "(paused) => [...document.querySelectorAll('#devices tbody tr')].every((tr, i) =>"
            " tr.children[1].textContent.startsWith('running') && +tr.children[2].textContent > paused[i])",
            paused_steps,
        ),
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "ui-pause-resume.png"), full_page=True)


async def test_states_when_the_bus_is_unreachable_and_recovers(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    ws_port, port = server.ws_port, server.port
    server.stop()
    try:
        async with UiServer(nats_ws_url=f"ws://127.0.0.1:{ws_port}") as ui, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                pg = await browser.new_page()
                await pg.goto(ui.url)
                await until("the unreachable banner", lambda: pg.locator("#conn.unreachable").count())
                assert await pg.text_content("#conn") == "NATS unreachable: retrying..."
                server = EmbeddedNats(tmp_path / "nats", port=port, ws_port=ws_port).start()
                await until("reconnected by itself", lambda: pg.locator("#conn.connected").count())
                server.stop()
                await until("unreachable again", lambda: pg.locator("#conn.unreachable").count())
                server.start()
                await until("reconnected again", lambda: pg.locator("#conn.connected").count())
            finally:
                await browser.close()
    finally:
        server.stop()
