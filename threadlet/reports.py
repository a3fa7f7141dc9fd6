"""The `Reporter`: what one rank tells the bus from the training thread: the status its heartbeats
carry, the latest step metrics, the ack of each decided command, and bus problems surfaced (logged)
at step boundaries. The `Link` thread publishes; nothing here blocks the step."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import KnobBoard
from threadlet.state import Decided, RankContext, TrainingState
from threadlet.update_ratio import UpdateRatio
from torchloom import knobs, naming, subjects, wire
from torchloom.messages import Ack, Heartbeat, KnobSpec, KnobValue, RankState, StepMetrics

log = logging.getLogger("threadlet")

_ERROR_LOG_INTERVAL_S = 10.0
# The full knob schema rides heartbeats for this many heartbeat intervals after it changes (the link
# publishes the latest status on its own clock, and one heartbeat may be lost); otherwise they carry
# its hash and the current values. A receiver that started since finds the schema elsewhere (a weaver
# in its KV bucket, a UI page from the weaver); for one that cannot (the first weaver started after the
# job, a bucket write that failed) the schema rides again every _KNOBS_REFRESH_S.
_KNOBS_FULL_INTERVALS = 3
_KNOBS_REFRESH_S = 10.0


class Reporter:
    """Status, metrics, acks and error reports of one rank (training thread only).

    The front reads `next_metrics_t` and `next_status_t` at every step and calls `send_metrics` and
    `refresh_status` when they are due, so an idle step costs two comparisons.

    Args:
        config: job, run id and the report intervals.
        ctx: this rank's identity.
        state: the training state the reports describe (read only).
        board: the knobs a heartbeat lists with their values.
        link: the bus thread that publishes (None: no bus; every report is dropped).
        update_ratio: the update-to-weight ratio measured on request (None without an optimizer);
            its latest measurement rides every metrics report.
        clock: monotonic seconds, for when the knob schema rides in full.
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
    ) -> None:
        self._config = config
        self._clock = clock
        self.update_ratio = update_ratio
        self._ctx = ctx
        self._state = state
        self._board = board
        self._link = link
        self.next_metrics_t = 0.0
        self.next_status_t = 0.0
        self._next_error_log_t = 0.0
        self._errors_seen = 0
        # Model health for the weaver's autopilot: counts of steps with a non-finite loss or gradient
        # norm (cumulative, so a sampled metrics report never hides one) and the latest grad norm.
        self.nonfinite_loss_steps = 0
        self.nonfinite_grad_steps = 0
        self.grad_norm: float | None = None
        self._schema_version = -1  # the board's schema version `_knobs_hash` was computed for
        self._knobs_hash = 0  # of the schema last sent in full
        self._knobs_full_until = 0.0
        self._knobs_refresh_t = 0.0

    def status(self, rank_state: RankState) -> Heartbeat:
        """This rank's status now: the knob schema in full while it is new (or due again), else only
        its hash and the current values. The schema is hashed only when the board's schema version
        changed, so a status between two changes reads the values and nothing else of the knobs."""
        ctx, st, board = self._ctx, self._state, self._board
        now = self._clock()
        if board.schema_version != self._schema_version:
            self._schema_version = board.schema_version
            specs = board.schema_specs()
            # No knobs at all: no hash either, so a weaver never waits for a schema there is none of.
            schema_hash = knobs.schema_hash(specs) if specs else 0
            if schema_hash != self._knobs_hash:
                self._knobs_hash = schema_hash
                self._knobs_refresh_t = 0.0  # new: send it now
        if now >= self._knobs_refresh_t:
            self._knobs_full_until = now + _KNOBS_FULL_INTERVALS * self._config.heartbeat_interval_s
            self._knobs_refresh_t = now + _KNOBS_REFRESH_S
        values = board.values()
        full = now < self._knobs_full_until
        return Heartbeat(
            job=self._config.job,
            run_id=self._config.run_id,
            rank=ctx.rank,
            world_size=ctx.world_size,
            local_rank=ctx.local_rank,
            incarnation=ctx.incarnation,
            host=ctx.host,
            pid=ctx.pid,
            step=st.step_count,
            state=rank_state,
            step_time_s=st.step_time_s,
            last_seq=st.last_decided,
            knobs=_with_values(board.schema_specs(), values) if full else (),
            knobs_hash=self._knobs_hash,
            knob_values={} if full else values,
            branch=st.branch,
            tick=st.tick,
            fault_injection_allowed=self._config.fault_injection_allowed,
        )

    def refresh_status(self, rank_state: RankState) -> None:
        """Hand the link a fresh status for its heartbeats."""
        self.next_status_t = time.perf_counter() + self._config.heartbeat_interval_s / 2
        if self._link is not None:
            self._link.status = self.status(rank_state)

    def status_due(self) -> None:
        """Refresh the status at the next step (knobs or the last decided seq changed)."""
        self.next_status_t = 0.0

    def note_loss(self, loss: object) -> None:
        """Count a non-finite loss given as a Python number (a tensor is read only when metrics are
        due, in `send_metrics`: reading it every step would sync the device)."""
        if isinstance(loss, float) and not math.isfinite(loss):
            self.nonfinite_loss_steps += 1

    def note_grad_norm(self, norm: float) -> None:
        """Record the gradient norm `clip_grad_` computed anyway (a Python float already)."""
        self.grad_norm = norm
        if not math.isfinite(norm):
            self.nonfinite_grad_steps += 1

    def send_metrics(
        self, now: float, loss: float | None, tokens: float | None, extra: dict[str, float]
    ) -> None:
        """Swap in this step's metrics; the link publishes the latest on its own clock."""
        self.next_metrics_t = now + self._config.metrics_interval_s
        link = self._link
        if link is None:
            return
        st = self._state
        values: dict[str, float] = {"step_time_s": st.step_time_s}
        if loss is not None:
            values["loss"] = float(loss)
            if not isinstance(loss, float) and not math.isfinite(values["loss"]):
                self.nonfinite_loss_steps += 1  # a tensor loss, read now (see `note_loss`)
        values["nonfinite_loss_steps"] = float(self.nonfinite_loss_steps)
        values["nonfinite_grad_steps"] = float(self.nonfinite_grad_steps)
        if self.grad_norm is not None:
            values["grad_norm"] = self.grad_norm
        if tokens is not None:
            values["tokens"] = float(tokens)
        if self.update_ratio is not None and self.update_ratio.count:
            values.update(self.update_ratio.report())
        lrs = self._board.group_values("lr")
        if lrs:
            values["lr"] = next(iter(lrs.values()))
            if len(lrs) > 1:
                values.update({f"lr@{g}": v for g, v in lrs.items()})
        for key, value in extra.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                link.errors.append(f"metric {key}={value!r} dropped: expected a number")
        link.metrics = StepMetrics(
            job=self._config.job,
            run_id=self._config.run_id,
            rank=self._ctx.rank,
            step=st.step_count,
            branch=st.branch,
            time_s=time.time(),
            values=values,
        )

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
        self._link.publish_durable(subjects.acks(self._config.job), wire.encode(ack), msg_id)

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
