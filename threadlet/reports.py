"""Reports of one rank on the training thread: the status a heartbeat carries, the latest step
metrics, and bus problems surfaced at step boundaries; mixed into `threadlet.agent.Threadlet`."""

from __future__ import annotations

import logging
import time

from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import KnobBoard
from torchloom.messages import Heartbeat, RankState, StepMetrics

log = logging.getLogger("threadlet")

_ERROR_LOG_INTERVAL_S = 10.0


class ReportsMixin:
    """Status, metrics and error reports of a Threadlet (training thread only)."""

    config: ThreadletConfig
    rank: int
    world_size: int
    local_rank: int
    incarnation: str
    host: str
    pid: int
    step_count: int
    tick: int
    branch: str
    _board: KnobBoard
    _link: Link | None
    _last_decided: int
    _step_time_s: float
    _next_status_t: float
    _next_error_log_t: float
    _errors_seen: int

    def _status(self, state: RankState) -> Heartbeat:
        return Heartbeat(
            job=self.config.job,
            run_id=self.config.run_id,
            rank=self.rank,
            world_size=self.world_size,
            local_rank=self.local_rank,
            incarnation=self.incarnation,
            host=self.host,
            pid=self.pid,
            step=self.step_count,
            state=state,
            step_time_s=self._step_time_s,
            last_seq=self._last_decided,
            knobs=self._board.specs(),
            branch=self.branch,
            tick=self.tick,
            fault_injection_allowed=self.config.fault_injection_allowed,
        )

    def _refresh_status(self, state: RankState) -> None:
        self._next_status_t = time.perf_counter() + self.config.heartbeat_interval_s / 2
        if self._link is not None:
            self._link.status = self._status(state)

    def _send_metrics(self, loss: float | None, tokens: float | None, extra: dict[str, float]) -> None:
        assert self._link is not None
        values: dict[str, float] = {"step_time_s": self._step_time_s}
        if loss is not None:
            values["loss"] = float(loss)
        if tokens is not None:
            values["tokens"] = float(tokens)
        lrs = self._board.group_values("lr")
        if lrs:
            values["lr"] = next(iter(lrs.values()))
            if len(lrs) > 1:
                values.update({f"lr@{g}": v for g, v in lrs.items()})
        for key, value in extra.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                self._link.errors.append(f"metric {key}={value!r} dropped: expected a number")
        sm = StepMetrics(
            job=self.config.job,
            run_id=self.config.run_id,
            rank=self.rank,
            step=self.step_count,
            branch=self.branch,
            time_s=time.time(),
            values=values,
        )
        self._link.metrics = sm  # the link publishes the latest on its own clock

    def _surface_errors(self, link: Link) -> None:
        drained: list[str] = []
        while link.errors:
            try:
                drained.append(link.errors.popleft())
            except IndexError:
                break
        self._errors_seen += len(drained)
        now = time.monotonic()
        if drained and now >= self._next_error_log_t:
            self._next_error_log_t = now + _ERROR_LOG_INTERVAL_S
            log.warning(
                "threadlet rank %d: %d bus problem(s) so far, training continues; latest: %s",
                self.rank,
                self._errors_seen,
                drained[-1],
            )
