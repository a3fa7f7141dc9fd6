"""The weaver's liveness tick: judges every rank's health at the time up to which its heartbeats were
read (`liveness.ReadClock`, so the weaver's own lag is never blamed on a rank), announces what
`health_plan.check_health` decides, forgets dead jobs, and carries out the health policy's plans:
commands through the weaver's submit, then a signed restart request to the job's launcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from torchloom import naming
from torchloom.messages import (
    Action,
    ActionKind,
    JobEvent,
    Outcome,
    OutcomeStatus,
    RestartRequest,
    SubmitRequest,
)
from weaver import admission, health_plan, liveness
from weaver import health_policy as hp
from weaver.config import WeaverConfig
from weaver.metrics import WeaverMetrics
from weaver.model import WeaverState

log = logging.getLogger(__name__)

# The full health check runs at least this often (and on every change of the silent ranks' count).
HEALTH_CHECK_INTERVAL_S = 0.5
# A liveness verdict judged this far behind the wall clock (the weaver's own lag) is logged.
LAG_WARN_S = 0.25

__all__ = ["HEALTH_CHECK_INTERVAL_S", "LAG_WARN_S", "HealthLoop"]


class HealthLoop:
    """The weaver's health checks, run by `run()` in the weaver's TaskGroup.

    Args:
        state: the weaver's state (read and updated by the health decisions; dead jobs removed).
        config: the weaver's config (liveness interval, dead_after_s, health policy).
        limits: the weaver's bounds on jobs and ranks (when a dead job is forgotten).
        metrics: the weaver's Prometheus metrics (a forgotten job's series go).
        clock: how far the weaver has read its heartbeats (fed by the heartbeat handler).
        backlog: how many heartbeats are received but not read yet.
        submit: the weaver's submit.
        announce: journal an event and send it to watchers.
        spawn: run a coroutine in the weaver's TaskGroup under a name.
        restart: send a restart request to a job's launcher, signed by the weaver.
        closing: whether the weaver is closing (a lost connection then is no news).
    """

    def __init__(
        self,
        state: WeaverState,
        config: WeaverConfig,
        limits: admission.Limits,
        metrics: WeaverMetrics,
        clock: liveness.ReadClock,
        *,
        backlog: Callable[[], int],
        submit: Callable[[SubmitRequest], Awaitable[Outcome]],
        announce: Callable[[JobEvent], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        restart: Callable[[str, RestartRequest], Awaitable[None]],
        closing: Callable[[], bool],
    ) -> None:
        self._state = state
        self._config = config
        self._limits = limits
        self._metrics = metrics
        self._read_clock = clock
        self._backlog = backlog
        self._submit = submit
        self._announce = announce
        self._spawn = spawn
        self._restart = restart
        self._closing = closing
        self._lagging_since: float | None = None  # when liveness was last judged in time
        self._lag_max_s = 0.0
        self._next_eviction_s = 0.0

    async def run(self) -> None:
        policy = self._config.policy()
        interval = self._config.liveness_interval_s
        # Every tick counts the silent ranks (O(n), cheap); the full health check (blame, hung,
        # stragglers: most of a tick's cost at 1,000 ranks) runs when that count changed, or at
        # least every HEALTH_CHECK_INTERVAL_S, so a rank going silent is judged as fast as before.
        full_every = max(1, round(HEALTH_CHECK_INTERVAL_S / interval))
        tick, silent_before = 0, -1
        while True:
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            now = time.time()
            at = self._judged_at(now, tick_late_s=time.monotonic() - due)
            if at is None:
                continue
            tick += 1
            silent = liveness.silent_ranks(self._state, at, self._config.dead_after_s)
            if silent == silent_before and tick % full_every:
                continue
            silent_before = silent
            try:
                effects = health_plan.check_health(self._state, at, policy)
            except Exception:  # a bug in a health decision must not take the weaver down
                log.exception("rank health check failed")
                continue
            for ev in effects.events:
                self._announce(ev)
            self._evict(time.time())
            for plan in effects.plans:
                self._spawn(self._carry_out(plan), f"weaver-health-{plan.job}")

    def _judged_at(self, now: float, *, tick_late_s: float) -> float | None:
        """When to judge the ranks' liveness at (`liveness.ReadClock`): the weaver's own lag is not
        blamed on ranks. A lag is logged once when it starts and once, with its worst, when it ends."""
        backlog = self._backlog()
        at = self._read_clock.judged_at(
            now, backlog=backlog, tick_late_s=tick_late_s, dead_after_s=self._config.dead_after_s
        )
        lag = now - at if at is not None else max(tick_late_s, now - self._read_clock.caught_up_at)
        if at is None or lag > LAG_WARN_S:
            if self._lagging_since is None:
                self._lagging_since, self._lag_max_s = now, 0.0
                log.warning(
                    "the weaver is %.2f s behind its heartbeats (%d queued, tick %.2f s late%s): "
                    "liveness is judged at the time read up to",
                    lag,
                    backlog,
                    tick_late_s,
                    ", heartbeat connection down" if self._read_clock.disconnected_at is not None else "",
                )
            self._lag_max_s = max(self._lag_max_s, lag)
        elif self._lagging_since is not None:
            log.warning(
                "the weaver caught up with its heartbeats after %.1f s (at most %.2f s behind)",
                now - self._lagging_since,
                self._lag_max_s,
            )
            self._lagging_since = None
        return at

    def read_time(self, now: float) -> float:
        """The time status judges liveness at: the read clock's (so status and the health events
        agree), else, with no verdict possible now, the last time every heartbeat was folded."""
        clock = self._read_clock
        at = clock.judged_at(
            now,
            backlog=self._backlog(),
            tick_late_s=0.0,
            dead_after_s=self._config.dead_after_s,
        )
        return at if at is not None else min(now, clock.caught_up_at or now)

    async def on_telemetry_lost(self) -> None:
        if self._closing():
            return  # closed on purpose
        log.warning("heartbeat connection lost: no liveness verdict until it is back")
        self._read_clock.disconnected(time.time())

    async def on_telemetry_back(self) -> None:
        self._read_clock.reconnected(time.time(), self._config.dead_after_s)
        log.warning("heartbeat connection back after %.1f s", self._read_clock.gap_s)

    def _evict(self, now: float) -> None:
        """Forget dead jobs now and then (`admission.evict_dead_jobs`), so their slots free up."""
        if now < self._next_eviction_s:
            return
        self._next_eviction_s = now + min(60.0, self._limits.job_evict_after_s / 4)
        gone = admission.evict_dead_jobs(self._state, now, self._config.dead_after_s, self._limits)
        if gone:
            log.info("forgot %d dead job(s): %s", len(gone), ", ".join(gone[:10]))
            self._metrics.forget_jobs(gone)

    async def _carry_out(self, plan: health_plan.HealthPlan) -> None:
        """Issue the policy's commands in order, then ask the launcher for the restart."""
        checkpoint = checkpoint_path = ""
        for req in plan.submits:
            if health_plan.is_stopping(self._state, plan.job, plan.run_id):
                return
            outcome = await self._submit(req)
            taking = isinstance(req.body, Action) and req.body.kind is ActionKind.CHECKPOINT
            if taking and outcome.status is OutcomeStatus.APPLIED and outcome.command is not None:
                first = min(outcome.results, key=lambda r: r.rank, default=None)
                detail = first.detail if first is not None else {}
                checkpoint = detail.get("checkpoint_id") or naming.checkpoint_id(outcome.command.seq)
                checkpoint_path = detail.get("checkpoint_path", "")
            elif taking:
                # Restarting now would lose the state the checkpoint was to save: decide again later.
                log.warning("health checkpoint of %s did not apply: %s", plan.job, outcome.reason)
                health_plan.set_phase(self._state, plan.job, plan.run_id, hp.Phase.IDLE)
                return
        if plan.restart is None or health_plan.is_stopping(self._state, plan.job, plan.run_id):
            return
        request = dataclasses.replace(plan.restart, time_s=time.time())
        if not request.checkpoint_id:
            request = dataclasses.replace(request, checkpoint_id=checkpoint, checkpoint_path=checkpoint_path)
        self._announce(health_plan.restart_event(request))
        await self._restart(plan.job, request)
        health_plan.set_phase(self._state, plan.job, plan.run_id, hp.Phase.RESTARTING)
