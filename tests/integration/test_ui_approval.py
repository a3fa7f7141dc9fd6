"""Approval mode from the web page against a REAL job: a 2-rank torchrun of examples/train_tiny.py
under a policy whose one rule proposes (approval = true) a lower lr soon after the start. The
operator page (headless Debian chromium, Playwright) lists the proposal with its rule, commands and
reason and an approve button; a read-only page lists it without buttons. A click on approve goes
over NATS (api.decide, ui-operator credential) to the weaver's DecideProposal code: both ranks apply
the command at one step, and the journal names the operator as the decider."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.helpers import until, weaver_config
from tests.integration.test_ui_live import (  # noqa: F401 (fixtures: the UI port, its nats-server, the job)
    ARTIFACTS,
    BROWSER_ARGS,
    CHROMIUM,
    JOB,
    Page,
    async_playwright,
    hook,
    job,
    nats_server,
    ui_port,
    ui_server,
)
from torchloom.credentials import Role
from torchloom.messages import JobEvent, Outcome, OutcomeStatus
from torchloom.nats_server import EmbeddedNats
from weaver.service import Weaver

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

RULE = "lr-down"
NEW_LR = 0.005  # within the default bounds: 5x the job's start lr (1e-3)
# One proposal only: the rule's cool-down outlasts the test.
POLICY = f"""name = "ask-first"
approval = true

[[rule]]
name = "{RULE}"
when = "every_steps"
steps = 20
cooldown_s = 3600.0
max_per_hour = 1
do = [{{set = {{lr = {NEW_LR}}}}}]
"""


async def open_page(browser: Browser, url: str) -> Page:
    """A page in a context of its own (the UI's session cookie is per context, one role each)."""
    context = await browser.new_context(viewport={"width": 1500, "height": 1000})
    page = await context.new_page()
    page.on("pageerror", lambda e: print(f"[page error] {e}"))
    await page.goto(url)
    return page


@contextlib.asynccontextmanager
async def weaver_and_pages(server: EmbeddedNats, policy: Path) -> AsyncIterator[tuple[Weaver, Page, Page]]:
    """The weaver as the control plane runs it (only ui-operator decides over NATS) with `policy` as
    every job's, the UI server, and an operator page and a viewer page."""
    config = weaver_config(
        server,
        dead_after_s=5.0,
        api_submit_identity=Role.UI_OPERATOR.value,
        autopilot_policy=str(policy),
    )
    async with Weaver(config) as weaver, ui_server(server) as ui, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield weaver, await open_page(browser, ui.operator_url), await open_page(browser, ui.viewer_url)
        finally:
            await browser.close()


async def test_a_proposal_is_approved_from_the_operator_page_and_only_listed_on_a_viewer_page(
    tmp_path: Path,
    nats_server: EmbeddedNats,  # noqa: F811 (the fixture imported above)
    job: Callable[..., None],  # noqa: F811
) -> None:
    policy = tmp_path / "ask-first.toml"
    policy.write_text(POLICY)
    job(steps=5000)  # an upper bound: the fixture stops the job
    async with weaver_and_pages(nats_server, policy) as (weaver, operator, viewer):
        card = operator.locator("#proposal-list .proposal")
        await until("the rule's proposal on the operator page", card.count, timeout_s=120)
        proposal = await card.get_attribute("data-proposal")
        assert proposal
        text = await card.text_content() or ""
        assert f"rule {RULE}" in text and f"set lr={NEW_LR}" in text, text
        assert re.search(r"every_steps at step \d+", text), text  # the reason: the signal that fired it
        assert await card.locator(f'[data-approve="{proposal}"]').is_enabled()
        assert await card.locator(f'[data-refuse="{proposal}"]').is_enabled()

        # The read-only page lists the same proposal, without any button, and its bus cannot decide.
        shown = viewer.locator(f'#proposal-list .proposal[data-proposal="{proposal}"]')
        await until("the proposal on the viewer page", shown.count)
        assert f"set lr={NEW_LR}" in (await shown.text_content() or "")
        assert await viewer.locator("#proposal-list button").count() == 0
        err = await viewer.evaluate(
            f"() => window.__torchloom.bus.decide('{JOB}', '{proposal}', true)"
            ".then(() => 'sent', (e) => String(e.message))"
        )
        assert err == "read-only page: it cannot decide proposals"
        # Nothing was sent while the proposal waited.
        lr = await hook(operator, "series('lr', 'r0')")
        assert lr["values"] and all(v == pytest.approx(1e-3) for v in lr["values"])

        ARTIFACTS.mkdir(exist_ok=True)
        await operator.screenshot(path=str(ARTIFACTS / "ui-approval-pending.png"), full_page=True)
        await operator.click(f'[data-approve="{proposal}"]')
        await until(
            "the weaver's answer on the page",
            lambda: operator.locator("#proposal-msg.ok", has_text=f"approve {proposal}: approved").count(),
            timeout_s=30,
        )
        assert "by ui-operator" in (await operator.text_content("#proposal-msg") or "")
        # Asked again, the weaver holds it no more: nothing is decided, and the answer says why.
        again = await operator.evaluate(
            f"() => window.__torchloom.bus.decide('{JOB}', '{proposal}', false)"
            ".then(e => [e.kind, e.message])"
        )
        assert again == [
            "proposal_not_decided",
            f"job {JOB} has no pending proposal '{proposal}' (pending: none)",
        ]
        # Decided: gone from both pages' lists.
        await until("the operator's list empty", lambda: hook(operator, "proposals().length === 0"))
        await until("the viewer's list empty", lambda: hook(viewer, "proposals().length === 0"))

        # The rule's command, applied on both ranks at one step, in the page's timeline.
        command = operator.locator("#timeline .entry.command", has_text=f"set lr={NEW_LR}")
        await until("the approved command applied", command.filter(has_text="applied").count, timeout_s=60)
        text = await command.first.text_content() or ""
        assert f"by rule:rule:{RULE}" in text and "rank 0: applied" in text and "rank 1: applied" in text, (
            text
        )
        for key in ("r0", "r1"):
            await until(
                f"lr={NEW_LR} reported by {key}",
                lambda key=key: hook(
                    operator, f"series('lr', '{key}').values.some(v => Math.abs(v - {NEW_LR}) < 1e-9)"
                ),
            )

        # The journal: the approval names the operator; the command is the rule's, applied on both ranks.
        async def journaled() -> tuple[JobEvent, Outcome] | None:
            entries = [entry async for entry in weaver.journal(JOB)]
            approval = next(
                (e for e in entries if isinstance(e, JobEvent) and e.kind == "rule_approved"),
                None,
            )
            if approval is None:
                return None
            done = [o for o in entries if isinstance(o, Outcome) and o.command_id == approval.command_id]
            return (approval, done[-1]) if done else None

        approval, outcome = await until(
            "the approval and its command in the journal", journaled, timeout_s=30
        )
        assert approval.attrs["proposal"] == proposal and approval.attrs["rule"] == RULE
        assert approval.attrs["decided_by"] == Role.UI_OPERATOR.value
        assert outcome.status is OutcomeStatus.APPLIED, outcome
        assert outcome.command is not None and outcome.command.issuer.identity == f"rule:{RULE}"
        assert sorted(r.rank for r in outcome.results) == [0, 1]
        assert len({r.step for r in outcome.results}) == 1  # the same step on every rank

        await operator.screenshot(path=str(ARTIFACTS / "ui-approval.png"), full_page=True)
