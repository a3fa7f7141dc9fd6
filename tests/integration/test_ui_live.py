"""The web UI against a REAL job: nats-server (secured as the control plane runs it: torchloom's roles,
WebSocket for the UI's own origin only), an in-process weaver, the UI server, and a 2-rank
torchrun of examples/train_tiny.py; headless Debian chromium driven by Playwright does what a person
would (watch the loss, set lr, checkpoint and roll back from the list, pause/resume, see a device
fault) and the page's debug hook shows what it plotted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.helpers import rank_creds, until, weaver_config, weaver_pubkey
from torchloom import bus as tl_bus
from torchloom import subjects, wire
from torchloom.app.controlplane_config import free_port
from torchloom.credentials import ClientAuth, CredentialStore, Role, inbox_prefix
from torchloom.messages import Action, ActionKind, Issuer, OutcomeStatus, SubmitRequest
from torchloom.nats_server import EmbeddedNats, loopback_origins
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


@pytest.fixture
def ui_port() -> int:
    """The UI's port, chosen before nats-server starts (its WebSocket accepts only that page's origin)."""
    return free_port()


@pytest.fixture
def nats_server(
    tmp_path: Path, nats_store: CredentialStore, ui_port: int, tl_home: Path
) -> Iterator[EmbeddedNats]:
    """The test's nats-server as the control plane runs it for a UI on `ui_port`. After `tl_home`: the
    weaver a test starts signs with the key of the same TORCHLOOM_HOME its ranks verify with."""
    server = EmbeddedNats(
        tmp_path / "nats", credentials=nats_store, allowed_origins=loopback_origins(ui_port)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ui_server(nats_server: EmbeddedNats) -> UiServer:
    """The UI server on the port the server's WebSocket accepts, handing pages their NATS credential."""
    port = int(nats_server.allowed_origins[0].rsplit(":", 1)[1])
    return UiServer(nats_ws_url=nats_server.ws_url, port=port, credentials=nats_server.credentials)


def ui_weaver_config(nats_server: EmbeddedNats) -> WeaverConfig:
    """The weaver as the control plane runs it: only ui-operator may submit over NATS."""
    return weaver_config(nats_server, dead_after_s=5.0, api_submit_identity=Role.UI_OPERATOR.value)


async def control_msg(page: Page) -> str:
    return await page.text_content("#control-msg") or ""


@pytest.fixture
def job(
    tmp_path: Path, subprocess_env: dict[str, str], nats_server: EmbeddedNats
) -> Iterator[Callable[..., None]]:
    """Start the 2-rank job on demand; it is stopped (terminate, wait, kill its group) afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*, steps: int = 400, step_sleep: float = 0.02, **extra_env: str) -> None:
        env = dict(subprocess_env)
        env.update(
            **rank_creds(nats_server, JOB),
            TORCHLOOM_JOB=JOB,
            TORCHLOOM_RUN_ID=uuid.uuid4().hex[:12],
            TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
            TORCHLOOM_WEAVER_PUBKEY=weaver_pubkey(),
            **extra_env,
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


@contextlib.asynccontextmanager
async def open_ui(
    nats_server: EmbeddedNats, *, console: bool = True, operator: bool = True
) -> AsyncIterator[Page]:
    """Weaver + UI server + a chromium page open on the UI with the operator token (the viewer
    token unless `operator`), its console echoed when `console`."""
    async with (
        Weaver(ui_weaver_config(nats_server)),
        ui_server(nats_server) as ui,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            pg = await browser.new_page(viewport={"width": 1500, "height": 1000})
            # Page errors go to the test's output, where a failing run shows them.
            if console:
                pg.on("console", lambda m: print(f"[page {m.type}] {m.text}"))
            pg.on("pageerror", lambda e: print(f"[page error] {e}"))
            await pg.goto(ui.operator_url if operator else ui.viewer_url)
            yield pg
        finally:
            await browser.close()


@pytest.fixture
async def page(nats_server: EmbeddedNats) -> AsyncIterator[Page]:
    """Weaver + UI server + a chromium page open on the UI."""
    async with open_ui(nats_server) as pg:
        yield pg


async def hook(page: Page, expr: str) -> Any:
    return await page.evaluate(f"() => window.__torchloom.{expr}")


async def wait_knobs(page: Page) -> None:
    await until("the lr knob in the control panel", lambda: page.locator('[data-knob="lr"]').count())


async def test_watch_loss_set_lr_and_roll_back_from_the_list(page: Page, job: Callable[..., None]) -> None:
    job(steps=5000)  # an upper bound: the fixture stops the job
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
    # betas takes exactly 2 values: refused in the page with the weaver's wording.
    await page.fill('[data-knob="betas"]', "0.9")
    await page.click('[data-set="betas"]')
    assert await control_msg(page) == (
        "betas='0.9' rejected: expected exactly 2 comma-separated floats (e.g. 0.9,0.999)"
    )

    # A tagged checkpoint from the page; it shows up in the checkpoint list (api.status polling).
    await page.fill("#ckpt-tag", "before-lr")
    await page.click('[data-action="checkpoint"]')
    await until(
        "checkpoint applied",
        lambda: page.locator("#control-msg.ok", has_text="checkpoint: applied").count(),
        timeout_s=40,
    )
    assert "(before-lr) at step" in await control_msg(page)
    row = page.locator("#checkpoints tbody tr", has_text="before-lr")
    await until("the checkpoint in the list", row.count)
    ckpt_id = await row.get_attribute("data-checkpoint")
    ckpt_step = int(await row.locator("td").nth(2).text_content() or "-1")
    assert ckpt_id and ckpt_id.startswith("ckpt-") and ckpt_step >= 0

    # A valid value: sent through api.submit, acknowledged by both ranks, shown in the timeline.
    old_lr = (await hook(page, "series('lr', 'r0')"))["values"][-1]
    assert old_lr == pytest.approx(1e-3)
    await page.fill('[data-knob="lr"]', "0.02")
    await page.press('[data-knob="lr"]', "Enter")
    await until("a final outcome", lambda: page.locator("#control-msg:not(.pending)").count(), timeout_s=40)
    msg = await control_msg(page)
    assert "set lr=0.02: applied" in msg, msg
    entry = page.locator("#timeline .entry.command").first
    await until("the set in the timeline, newest first", lambda: entry.filter(has_text="set lr=0.02").count())
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
            partial(hook, page, f"series('lr', '{key}').steps.some(s => s >= {applied_at})"),
        )
        series = await hook(page, f"series('lr', '{key}')")
        for step, lr in zip(series["steps"], series["values"], strict=True):
            expected = 0.02 if step >= applied_at else 1e-3
            assert lr == pytest.approx(expected), (key, step, lr, applied_at)
    await until(
        "the knob's current value", lambda: page.locator('[data-current="lr"]', has_text="0.02").count()
    )

    # Roll back from the checkpoint list: every rank forks a new branch at the checkpoint's step.
    await page.click(f'[data-rollback="{ckpt_id}"]')
    await until(
        "rollback applied",
        lambda: page.locator("#control-msg.ok", has_text=f"rollback to {ckpt_id}: applied").count(),
        timeout_s=40,
    )
    msg = await control_msg(page)
    assert f"from {ckpt_id} at step {ckpt_step}" in msg, msg
    rb = next(e for e in await hook(page, "timeline()") if e["kind"] == "command")
    branch = f"b{rb['seq']}"
    # The branch tree shows the new branch under main, marked current.
    current = page.locator(f'#branches li.current[data-branch="{branch}"]')
    await until("the new branch marked current in the tree", current.count)
    assert "current" in (await current.text_content() or "")
    assert await page.locator('#branches li[data-branch="main"]').count() == 1
    # The chart has a second line per rank, for the new branch, starting at the fork step.
    for rank in (0, 1):
        key = f"r{rank}/{branch}"
        await until(f"loss points of {key}", partial(hook, page, f"series('loss', '{key}').steps.length > 2"))
        steps = (await hook(page, f"series('loss', '{key}')"))["steps"]
        assert steps[0] == ckpt_step, (key, steps[:5], ckpt_step)
        assert steps == sorted(steps)
    await until(
        "the loss chart redrawn with the branch lines",
        lambda: page.evaluate(
            f"() => [...document.querySelectorAll('.chart[data-metric=\"loss\"] .u-legend th')]"
            f".some(th => th.textContent.includes('r0/{branch}'))"
        ),
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


async def test_a_viewer_page_watches_but_cannot_steer(
    nats_server: EmbeddedNats, job: Callable[..., None]
) -> None:
    job(steps=5000)
    async with open_ui(nats_server, operator=False) as page:
        await until("connected banner", lambda: page.locator("#conn.connected").count())
        await wait_knobs(page)
        # The token left the address bar once the session cookie was set.
        assert "token=" not in page.url
        note = page.locator("#control-note")
        assert await note.is_visible()
        assert "Read-only" in (await note.text_content() or "")
        assert await page.locator('[data-set="lr"]').is_disabled()
        assert await page.locator('[data-knob="lr"]').is_disabled()
        for action in ("pause", "resume", "checkpoint", "rollback", "stop"):
            assert await page.locator(f'[data-action="{action}"]').is_disabled(), action
        # Nor can a script on the page steer through its bus.
        err = await page.evaluate(
            "() => window.__torchloom.bus.submit({job: 'uijob', action: {kind: 'pause', args: {}}})"
            ".then(() => 'sent', (e) => String(e.message))"
        )
        assert err == "read-only page: it cannot steer the job"
        assert not [e for e in await hook(page, "timeline()") if e["kind"] == "command"]


async def test_a_page_without_the_token_is_refused(nats_server: EmbeddedNats) -> None:
    async with ui_server(nats_server) as ui, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            pg = await browser.new_page()
            response = await pg.goto(ui.url)
            assert response is not None and response.status == 403
            assert "token" in (await pg.text_content("body") or "")
        finally:
            await browser.close()


async def submit_over_nats(nats_server: EmbeddedNats, action: Action) -> None:
    """Submit as the operator page does: NATS request-reply on api.submit over the WebSocket, with
    the ui-operator credential (no other browser role may publish there); assert it applied."""
    assert nats_server.credentials is not None
    user = nats_server.credentials.password_user(Role.UI_OPERATOR)
    url = nats_server.ws_url.replace("ws://", f"ws://{user.user}:{user.password}@")
    nc = await tl_bus.connect(
        url, name="ui-test", credentials=ClientAuth(inbox_prefix=inbox_prefix(Role.UI_OPERATOR))
    )
    try:
        req = SubmitRequest(job=JOB, issuer=Issuer(kind="cli", identity="test"), body=action, timeout_s=20)
        reply = await nc.request(subjects.api_submit(), wire.encode(req), timeout=30)
    finally:
        await nc.close()
    outcome = wire.decode_outcome(reply.data)
    assert outcome.status is OutcomeStatus.APPLIED, outcome


async def test_device_fault_is_marked_in_the_device_panel(
    nats_server: EmbeddedNats, job: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHLOOM_ALLOW_FAULT_INJECTION", "1")
    job(steps=5000, TORCHLOOM_ALLOW_FAULT_INJECTION="1")
    async with open_ui(nats_server, console=False) as page:
        rows = "#devices tbody tr"
        await until(
            "both ranks healthy in the device panel",
            lambda: page.evaluate(
                f"() => [...document.querySelectorAll('{rows}')]"
                ".filter(tr => tr.dataset.health === 'healthy').length === 2"
            ),
        )
        await submit_over_nats(
            nats_server, Action(kind=ActionKind.FAULT_INJECT, args={"rank": "1", "xid": "79"})
        )
        bad = page.locator(f'{rows}[data-rank="1"].unhealthy')
        await until("rank 1's device marked unhealthy", bad.count, timeout_s=30)
        text = await bad.locator("td.health").text_content() or ""
        assert text.startswith("UNHEALTHY") and "XID 79" in text, text
        # The faulty device is listed first; rank 0 stays healthy.
        assert await page.locator(f"{rows}").first.get_attribute("data-rank") == "1"
        assert await page.locator(f'{rows}[data-rank="0"]').get_attribute("data-health") == "healthy"
        # The weaver's verdict reaches the timeline as a device_unhealthy event.
        await until(
            "the device_unhealthy event in the timeline",
            lambda: page.locator("#timeline .entry.device_unhealthy").count(),
            timeout_s=30,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "ui-fault.png"), full_page=True)


async def test_timeline_loads_the_journal_written_before_the_page_opened(
    nats_server: EmbeddedNats, job: Callable[..., None]
) -> None:
    job(steps=5000)
    async with Weaver(ui_weaver_config(nats_server)):
        # Wait for the job, then act before any page exists.
        deadline = time.monotonic() + 90
        while True:
            try:
                await submit_over_nats(nats_server, Action(kind=ActionKind.CHECKPOINT, args={"tag": "early"}))
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the job never accepted a checkpoint"
                await asyncio.sleep(0.5)
        async with ui_server(nats_server) as ui, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1500, "height": 1000})
                await page.goto(ui.viewer_url)  # reading needs no more than the viewer token
                await until("the journal history loaded", lambda: hook(page, "historyDone()"))
                entries = await hook(page, "timeline()")
                kinds = {e["kind"] for e in entries}
                assert "rank_joined" in kinds, kinds
                ck = [e for e in entries if e["kind"] == "command" and "checkpoint" in (e.get("body") or "")]
                assert ck and ck[0]["status"] == "applied" and "early" in ck[0]["body"], ck
                # History and live subscriptions overlap at page open: no event is listed twice.
                keys = [(e["kind"], e["time_s"], e.get("message")) for e in entries if e["kind"] != "command"]
                assert len(keys) == len(set(keys))
                await until(
                    "the checkpoint in the page's timeline",
                    lambda: page.locator("#timeline .entry.command", has_text="checkpoint tag=early").count(),
                )
            finally:
                await browser.close()


async def test_states_when_the_bus_is_unreachable_and_recovers(tmp_path: Path) -> None:
    # An open server of its own: this is about the page's reconnects, not about who may connect.
    server = EmbeddedNats(tmp_path / "nats").start()
    ws_port, port = server.ws_port, server.port
    server.stop()
    try:
        async with UiServer(nats_ws_url=f"ws://127.0.0.1:{ws_port}") as ui, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                pg = await browser.new_page()
                await pg.goto(ui.viewer_url)
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
