"""What one rank tells the bus. The `Reporter` runs on the training thread: at a step boundary it hands
over the raw values of a report (a tuple swapped in whole), publishes acks and surfaces bus problems.
The `Outbox` runs on the link thread: it builds the `Heartbeat` and `StepMetrics` from the latest raw
values when the link publishes, so no step ever builds a message."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import KnobBoard
from threadlet.state import Decided, RankContext, TrainingState
from threadlet.update_ratio import UpdateRatio
from torchloom import knobs, naming, wire
from torchloom.messages import Ack, DeviceHealth, Heartbeat, KnobSpec, KnobValue, RankState, StepMetrics

log = logging.getLogger("threadlet")

_ERROR_LOG_INTERVAL_S = 10.0
# The full knob schema rides heartbeats for this many heartbeat intervals after it changes (the link
# publishes the latest status on its own clock, and one heartbeat may be lost); otherwise they carry
# its hash and the current values. A receiver that started since finds the schema elsewhere (a weaver
# in its KV bucket, a UI page from the weaver); for one that cannot (the first weaver started after the
# job, a bucket write that failed) the schema rides again every _KNOBS_REFRESH_S.
_KNOBS_FULL_INTERVALS = 3
_KNOBS_REFRESH_S = 10.0
# A status re-reads the knobs' values at most this often unless a command changed them or a knob was
# registered (the step, state and last seq are fresh in every status): a scheduler's lr shows in
# heartbeats up to this late, and in every metrics report (its lr per group) as before.
KNOB_VALUES_PERIOD_S = 1.0

# The raw values of one status, all read at one step boundary: step, tick, state, last decided seq,
# step time, branch, the board's schema version and schema (without values) and the knob values.
StatusValues = tuple[int, int, RankState, int, float, str, int, tuple[KnobSpec, ...], dict[str, KnobValue]]
# The raw values of one metrics report, all read at one step boundary: step, branch, when (the
# `time.perf_counter()` of the boundary), step time, loss, tokens, the loop's other metrics, the
# non-finite loss and gradient counts, the latest gradient norm, the update ratio's report (None when
# not measured) and the lr per parameter group (in the optimizer's order).
MetricsValues = tuple[
    int,
    str,
    float,
    float,
    float | None,
    float | None,
    Mapping[str, float],
    int,
    int,
    float | None,
    dict[str, float] | None,
    list[float],
]


class Outbox:
    """The hand-over from the training thread to the link thread, and the link thread's builder.

    The training thread stores `status_values` and `metrics_values` whole (one attribute store each,
    atomic under the GIL), so a reader sees one boundary's values or the previous boundary's, never a
    mix: a heartbeat's state, last seq, step time and knobs always come from the same boundary. The
    link thread calls `status` and `new_metrics` when it publishes; only it keeps the schema state
    below (`Reporter.status` builds on the calling thread, for a rank without a link and for tests).

    A heartbeat's step is read from `state` as the heartbeat is built, not from the status values:
    those are refreshed twice per heartbeat interval, so a rank that blocks (in a collective waiting
    on a hung peer) would report the step of its last refresh, up to an interval's worth of steps
    back, and a peer that hangs a step later would look ahead of it: the weaver blames the rank
    behind (`weaver.health_policy`), the wrong one. One attribute read, on the link thread; nothing
    is added to the training thread. The tick stays the boundary's (read apart from the step it
    could come from another boundary); the weaver sees progress in a change of either.

    Args:
        config: job, run id and the heartbeat interval.
        ctx: this rank's identity.
        clock: monotonic seconds, for when the knob schema rides in full.
        lr_groups: the optimizer's parameter group names (`KnobBoard.groups`), for the lr of each.
        state: the training state whose step each heartbeat carries (None: the status values').
    """

    def __init__(
        self,
        config: ThreadletConfig,
        ctx: RankContext,
        clock: Callable[[], float] = time.monotonic,
        *,
        lr_groups: tuple[str, ...] = (),
        state: TrainingState | None = None,
    ) -> None:
        self._config = config
        self._ctx = ctx
        self._clock = clock
        self._state = state
        self.status_values: StatusValues | None = None
        self.metrics_values: MetricsValues | None = None
        self._metrics_sent: MetricsValues | None = None
        self._lr_groups = lr_groups
        self._schema_version = -1  # the board's schema version `_knobs_hash` was computed for
        self._knobs_hash = 0  # of the schema last sent in full
        self._knobs_full_until = 0.0
        self._knobs_refresh_t = 0.0

    def status(self, *, sent_at_s: float = 0.0, device: DeviceHealth | None = None) -> Heartbeat | None:
        """The latest status as a heartbeat sent at `sent_at_s` with this device health (None
        before the first)."""
        values = self.status_values
        return None if values is None else self.heartbeat(values, sent_at_s=sent_at_s, device=device)

    def new_metrics(self) -> StepMetrics | None:
        """The latest metrics if they were not returned here before, else None."""
        values = self.metrics_values
        if values is None or values is self._metrics_sent:
            return None
        self._metrics_sent = values
        return self.step_metrics(values)

    def metrics(self) -> StepMetrics | None:
        """The latest metrics, returned here before or not (None before the first)."""
        values = self.metrics_values
        return None if values is None else self.step_metrics(values)

    def heartbeat(
        self, values: StatusValues, *, sent_at_s: float = 0.0, device: DeviceHealth | None = None
    ) -> Heartbeat:
        """The status of `values`: the knob schema in full while it is new (or due again), else only
        its hash and the values. The schema is hashed only when the board's schema version changed."""
        step, tick, rank_state, last_seq, step_time_s, branch, version, specs, knob_values = values
        live = self._state
        if live is not None:  # where the rank is now, blocked or not (see the class docstring)
            step = live.step_count
        now = self._clock()
        if version != self._schema_version:
            self._schema_version = version
            # No knobs at all: no hash either, so a weaver never waits for a schema there is none of.
            schema_hash = knobs.schema_hash(specs) if specs else 0
            if schema_hash != self._knobs_hash:
                self._knobs_hash = schema_hash
                self._knobs_refresh_t = 0.0  # new: send it now
        if now >= self._knobs_refresh_t:
            self._knobs_full_until = now + _KNOBS_FULL_INTERVALS * self._config.heartbeat_interval_s
            self._knobs_refresh_t = now + _KNOBS_REFRESH_S
        full = now < self._knobs_full_until
        ctx, cfg = self._ctx, self._config
        return Heartbeat(
            job=cfg.job,
            run_id=cfg.run_id,
            rank=ctx.rank,
            world_size=ctx.world_size,
            local_rank=ctx.local_rank,
            incarnation=ctx.incarnation,
            host=ctx.host,
            pid=ctx.pid,
            step=step,
            state=rank_state,
            sent_at_s=sent_at_s,
            step_time_s=step_time_s,
            last_seq=last_seq,
            knobs=_with_values(specs, knob_values) if full else (),
            knobs_hash=self._knobs_hash,
            knob_values={} if full else knob_values,
            branch=branch,
            tick=tick,
            fault_injection_allowed=cfg.fault_injection_allowed,
            device=device,
        )

    def step_metrics(self, values: MetricsValues) -> StepMetrics:
        """The `StepMetrics` of `values`, stamped with the wall clock of their boundary."""
        (
            step,
            branch,
            taken_at,
            step_time_s,
            loss,
            tokens,
            extra,
            bad_loss,
            bad_grad,
            grad_norm,
            ratio,
            lrs,
        ) = values
        out: dict[str, float] = {"step_time_s": step_time_s}
        if loss is not None:
            out["loss"] = loss
        out["nonfinite_loss_steps"] = float(bad_loss)
        out["nonfinite_grad_steps"] = float(bad_grad)
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        if tokens is not None:
            out["tokens"] = tokens
        if ratio:
            out.update(ratio)
        if lrs:
            out["lr"] = lrs[0]
            if len(lrs) > 1:
                # A group added after attach has no name on the board: it is left out.
                out.update({f"lr@{g}": v for g, v in zip(self._lr_groups, lrs, strict=False)})
        for key, value in extra.items():
            out[key] = float(value)  # numbers only: the Reporter converted anything else
        cfg = self._config
        return StepMetrics(
            job=cfg.job,
            run_id=cfg.run_id,
            rank=self._ctx.rank,
            step=step,
            branch=branch,
            time_s=time.time() - (time.perf_counter() - taken_at),
            values=out,
        )


class Reporter:
    """Status, metrics, acks and error reports of one rank (training thread only).

    The front compares the step's time with `next_report_t` at every step and calls `report` when
    it is reached, so an idle step costs one comparison. A report reads the raw values and swaps
    them into the `outbox`; the link thread builds the message when it publishes.

    Args:
        config: job, run id and the report intervals.
        ctx: this rank's identity.
        state: the training state the reports describe (read only).
        board: the knobs a heartbeat lists with their values.
        link: the bus thread that publishes (None: no bus; every report is dropped).
        update_ratio: the update-to-weight ratio measured on request (None without an optimizer);
            its latest measurement rides every metrics report.
        clock: monotonic seconds, for when the knob schema rides in full and the knobs' values are
            read again.
        outbox: the hand-over to `link` (the one given to it); a new one when not given.
        optimizer: the optimizer whose lr per parameter group rides each metrics report (None:
            no lr is reported).
    """

    def __init__(
        self,
        config: ThreadletConfig,
        ctx: RankContext,
        state: TrainingState,
        board: KnobBoard,
        link: Link | None,
        update_ratio: UpdateRatio | None = None,
        clock: Callable[[], float] = time.monotonic,
        outbox: Outbox | None = None,
        optimizer: Any = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self.update_ratio = update_ratio
        self._ctx = ctx
        self._state = state
        self._board = board
        self._link = link
        self.outbox = (
            outbox if outbox is not None else Outbox(config, ctx, clock, lr_groups=board.groups, state=state)
        )
        self._status_period_s = config.heartbeat_interval_s / 2
        self._metrics_period_s = config.metrics_interval_s
        # The lr of every parameter group rides each metrics report (as `board.group_values("lr")`
        # would give them: the board's group names, read through the optimizer).
        self._lr_optimizer = optimizer if optimizer is not None and "lr" in board.schema else None
        self._next_metrics_t = 0.0
        self._next_status_t = 0.0
        self.next_report_t = 0.0  # the earlier of the two
        self._next_error_log_t = 0.0
        self._errors_seen = 0
        # The knobs' values (user getters, the optimizer's groups) are read again at most every
        # KNOB_VALUES_PERIOD_S, or at the next status after a command changed them (`status_due`):
        # reading them made a status step cost about 32 us with cold caches, 14 us without.
        self._knob_values: dict[str, KnobValue] | None = None
        self._knob_values_t = 0.0
        self._knob_values_version = -1  # the board's schema version they were read for
        # Model health for the weaver's autopilot: counts of steps with a non-finite loss or gradient
        # norm (cumulative, so a sampled metrics report never hides one) and the latest grad norm. The
        # front counts a non-finite loss given as a float at every step itself (an idle step makes
        # no call here).
        self.nonfinite_loss_steps = 0
        self.nonfinite_grad_steps = 0
        self.grad_norm: float | None = None

    @property
    def next_metrics_t(self) -> float:
        """When metrics are due next (`time.perf_counter()` seconds)."""
        return self._next_metrics_t

    @next_metrics_t.setter
    def next_metrics_t(self, t: float) -> None:
        self._next_metrics_t = t
        self.next_report_t = min(t, self._next_status_t)

    @property
    def next_status_t(self) -> float:
        """When the status is due next (`time.perf_counter()` seconds)."""
        return self._next_status_t

    @next_status_t.setter
    def next_status_t(self, t: float) -> None:
        self._next_status_t = t
        self.next_report_t = min(self._next_metrics_t, t)

    # The report paths below run once every few dozen steps, so they find the caches cold: every
    # function they call costs microseconds then. They read in plain statements and leave the rest
    # to the link thread.

    def report(
        self, now: float, loss: float | None, tokens: float | None, extra: Mapping[str, float]
    ) -> None:
        """Hand over the report due (`now >= next_report_t`): at most one per step, so no step pays
        for both; when both are due, the one due longer goes now and the other at the next step."""
        if self._next_metrics_t <= self._next_status_t:
            self.send_metrics(now, loss, tokens, extra)
        else:
            self.refresh_status(RankState.RUNNING)

    def refresh_status(self, rank_state: RankState) -> None:
        """Hand the link the raw values of a fresh status for its heartbeats."""
        t = time.perf_counter() + self._status_period_s
        self._next_status_t = t
        self.next_report_t = min(t, self._next_metrics_t)
        st, board = self._state, self._board
        knob_values = self._knob_values
        version = board.schema_version
        clock = self._clock()
        if knob_values is None or clock >= self._knob_values_t or version != self._knob_values_version:
            knob_values = self._knob_values = board.values()
            self._knob_values_t = clock + KNOB_VALUES_PERIOD_S
            self._knob_values_version = version
        self.outbox.status_values = (
            st.step_count,
            st.tick,
            rank_state,
            st.last_decided,
            st.step_time_s,
            st.branch,
            version,
            board.schema_specs(),
            knob_values,
        )

    def status(self, rank_state: RankState) -> Heartbeat:
        """Hand over a fresh status (`refresh_status`) and build it on the calling thread: for a rank
        without a link thread, and for tests."""
        self.refresh_status(rank_state)
        values = self.outbox.status_values
        assert values is not None
        return self.outbox.heartbeat(values)

    def status_due(self) -> None:
        """Refresh the status at the next step (knobs or the last decided seq changed)."""
        self.next_status_t = 0.0
        self._knob_values = None  # read the knobs again then

    def note_grad_norm(self, norm: float) -> None:
        """Record the gradient norm `clip_grad_` computed anyway (a Python float already)."""
        self.grad_norm = norm
        if not math.isfinite(norm):
            self.nonfinite_grad_steps += 1

    def send_metrics(
        self, now: float, loss: float | None, tokens: float | None, extra: Mapping[str, float]
    ) -> None:
        """Hand over this step's metrics (`now` is its `time.perf_counter()`); the link publishes
        the latest on its own clock. What is not a Python float yet (a tensor loss or lr, a metric
        given as a tensor or an int) is read here, on the training thread."""
        t = now + self._metrics_period_s
        self._next_metrics_t = t
        self.next_report_t = min(t, self._next_status_t)
        if loss is not None and not isinstance(loss, float):
            loss = float(loss)  # a tensor: read now, when metrics are due, not at every step
            if not math.isfinite(loss):
                self.nonfinite_loss_steps += 1  # (the front counts a non-finite float at every step)
        if tokens is not None and not isinstance(tokens, float):
            tokens = float(tokens)
        lrs: list[float] = []
        optimizer = self._lr_optimizer
        if optimizer is not None:
            for group in optimizer.param_groups:  # through the optimizer: a rollback replaces them
                lrs.append(float(group["lr"]))
        ratio = self.update_ratio
        st = self._state
        self.outbox.metrics_values = (
            st.step_count,
            st.branch,
            now,
            st.step_time_s,
            loss,
            tokens,
            self._numbers(extra) if extra else extra,
            self.nonfinite_loss_steps,
            self.nonfinite_grad_steps,
            self.grad_norm,
            ratio.report() if ratio is not None and ratio.count else None,
            lrs,
        )

    def _numbers(self, extra: Mapping[str, float]) -> Mapping[str, float]:
        """The loop's metrics as floats. Its `**metrics` dict is the call's own, so when every value
        is a float already it is handed over as it is; a value that is no number is dropped, named
        in the link's errors."""
        if all(isinstance(value, float) for value in extra.values()):
            return extra
        out: dict[str, float] = {}
        for key, value in extra.items():
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                if self._link is not None:
                    self._link.errors.append(f"metric {key}={value!r} dropped: expected a number")
        return out

    def ack(
        self, decided: Decided, *, received_at_s: float, decided_at_s: float, refused_by_peer: bool
    ) -> None:
        """Publish this rank's ack of a decided command."""
        if self._link is None:
            return
        ack = Ack(
            command_id=decided.command_id,
            job=self._config.job,
            run_id=self._config.run_id,
            seq=decided.seq,
            rank=self._ctx.rank,
            incarnation=self._ctx.incarnation,
            status=decided.status,
            reason=decided.reason,
            step=decided.step,
            decided_at_s=decided_at_s,
            received_at_s=received_at_s,
            detail=dict(decided.detail),
            branch=decided.branch,
            refused_by_peer=refused_by_peer,
        )
        # Retried until the acks stream stores it, once per (run, seq, rank, incarnation) and notice:
        # the weaver may be down or NATS restarting right now, and the outcome must still be completed.
        msg_id = f"ack:{ack.run_id}:{ack.seq}:{ack.rank}:{ack.incarnation}"
        if naming.ACK_NOTICE in ack.detail:
            msg_id += f":notice:{ack.detail[naming.ACK_NOTICE]}"
        self._link.publish_durable(self._link.ack_subject(), wire.encode(ack), msg_id)

    def notice(self, decided: Decided, kind: str, message: str) -> None:
        """Report something that went wrong with a command after it was decided (e.g. a set lr that
        a scheduler the threadlet was not given overwrote): logged on this rank and published as a
        follow-up ack of the same command, `detail[naming.ACK_NOTICE]` = `kind` (one of
        `naming.NOTICE_KINDS`), `detail[naming.ACK_NOTICE_MESSAGE]` = `message`. It changes no
        outcome: the weaver journals it as an event of that kind (rate-limited) naming this rank."""
        log.warning("threadlet rank %d: %s", self._ctx.rank, message)
        detail = {naming.ACK_NOTICE: kind, naming.ACK_NOTICE_MESSAGE: message}
        notice = dataclasses.replace(decided, detail=detail)
        self.ack(notice, received_at_s=0.0, decided_at_s=time.time(), refused_by_peer=False)

    def surface_errors(self) -> None:
        """Drain the link's problems and log them, at most one line per interval."""
        link = self._link
        if link is None:
            return
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
                self._ctx.rank,
                self._errors_seen,
                drained[-1],
            )


def _with_values(specs: tuple[KnobSpec, ...], values: Mapping[str, KnobValue]) -> tuple[KnobSpec, ...]:
    return tuple(dataclasses.replace(spec, value=values.get(spec.name)) for spec in specs)
