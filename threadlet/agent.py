"""The training-thread side of the threadlet: step boundaries, the step agreement over a dedicated
gloo group, applying decided commands, pause/resume, acks, metrics and status for heartbeats."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import torch
import torch.distributed as dist

from threadlet import agreement
from threadlet.agreement import Verdict
from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import Applier, Getter, KnobBoard, knob_type
from torchloom import subjects, wire
from torchloom.errors import CommandRejected
from torchloom.knobs import validate_set
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    Heartbeat,
    KnobSpec,
    KnobType,
    KnobValue,
    RankState,
    SetConfig,
    StepMetrics,
)

log = logging.getLogger("threadlet")

_SUPPORTED_ACTIONS = frozenset({ActionKind.PAUSE, ActionKind.RESUME})
_ERROR_LOG_INTERVAL_S = 10.0
_STEP_TIME_EMA = 0.1  # weight of the newest step in the step-time mean


@dataclass(frozen=True, slots=True)
class _Filed:
    """A received command with this rank's local verdict (refusal None: acceptable here)."""

    command: Command
    received_at_s: float
    refusal: str | None
    values: dict[str, KnobValue]


@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def rank_info() -> RankInfo:
    """Rank, world size and local rank: from torch.distributed, else RANK/WORLD_SIZE/LOCAL_RANK."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return RankInfo(rank, world, local_rank)


class Threadlet:
    """One rank's agent. Create it with `threadlet.attach`; call `step()` once per training step.

    Attributes:
        applied: one dict per decided command on this rank, in seq order, with keys seq,
            command_id, kind ("set" or the action), status ("applied"/"rejected"), step, reason
            and values (typed values of a set; {} for actions).
        step_count: completed `step()` calls; the step every report names.
    """

    def __init__(
        self,
        config: ThreadletConfig,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
    ) -> None:
        self.config = config
        info = rank_info()
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.incarnation = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.applied: list[dict[str, Any]] = []
        self.step_count = 0
        self._model = model
        self._board = KnobBoard(optimizer, scheduler)
        self._lock = threading.Lock()
        self._inbox: dict[int, _Filed] = {}
        self._last_decided = 0
        self._paused = False
        self._closed = False
        self._work: Any = None
        self._round_buf: torch.Tensor | None = None
        self._offer = (0, agreement.NONE_REFUSED)
        self._next_round_step = 0
        self._due_step = 0
        self._lag = 1  # agreed in each round; the first round is read at the next boundary
        self.rounds = 0  # agreement rounds launched (a cost/latency statistic)
        self._step_time_s = 0.0
        self._last_t = time.perf_counter()
        self._next_metrics_t = 0.0
        self._next_status_t = 0.0
        self._next_error_log_t = 0.0
        self._errors_seen = 0
        self.group: Any = None
        self._link: Link | None = None
        if config.local:
            return
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            from datetime import timedelta

            # Every rank calls attach at the same point, so this collective group creation matches.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.agreement_timeout_s))
        self._link = Link(config, rank=self.rank, on_command=self._file)
        self._refresh_status(RankState.RUNNING)
        self._link.start()

    # ---- public API -----------------------------------------------------------------------------

    def step(self, loss: float | None = None, tokens: float | None = None, **metrics: float) -> None:
        """Mark a step boundary: decide and apply agreed commands, report metrics when due.

        Returns quickly; blocks only while the job is paused. Never raises because of the bus.
        """
        now = time.perf_counter()
        dt = now - self._last_t
        self._last_t = now
        self.step_count += 1
        self._step_time_s = (
            dt if self.step_count == 1 else self._step_time_s + _STEP_TIME_EMA * (dt - self._step_time_s)
        )
        link = self._link
        if link is None or self._closed:
            return
        self._boundary()
        if self._paused:
            self._wait_paused()
            self._last_t = time.perf_counter()  # a pause is not step time
            now = self._last_t
        if now >= self._next_metrics_t:
            self._next_metrics_t = now + self.config.metrics_interval_s
            self._send_metrics(loss, tokens, metrics)
        if now >= self._next_status_t:
            self._refresh_status(RankState.RUNNING)
        if link.errors:
            self._surface_errors(link)

    def knob(
        self,
        name: str,
        type: KnobType | str | type,
        *,
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
        max_exclusive: bool = False,
        description: str = "",
        choices: tuple[str, ...] = (),
        get: Getter,
        apply: Applier,
    ) -> None:
        """Register a user knob, settable like lr (`torchloom set NAME=VALUE`).

        Args:
            name: knob name (no '@'); must differ from the built-ins.
            type: KnobType, its name ("float") or a Python type (float, int, bool, str).
            min, max, min_exclusive, max_exclusive: numeric bounds checked before any apply.
            description: shown in the UI and CLI.
            choices: allowed values of a str knob.
            get: returns the current value (called on the training thread).
            apply: sets a validated value (called on the training thread at a step boundary).

        Raises:
            ValueError: on a duplicate or malformed name, an unknown type or inverted bounds.
        """
        if min is not None and max is not None and min > max:
            raise ValueError(f"knob {name!r} rejected: min={min} must be <= max={max}")
        spec = KnobSpec(
            name=name,
            type=knob_type(type),
            min=min,
            max=max,
            min_exclusive=min_exclusive,
            max_exclusive=max_exclusive,
            description=description,
            choices=choices,
        )
        self._board.register(spec, get, apply)
        self._next_status_t = 0.0

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Finish the last agreement round, send a FINISHED heartbeat (bounded) and stop the bus
        thread. Idempotent. Destroys nothing of the user's (`threadlet.finish` does the rest)."""
        if self._closed:
            return
        self._closed = True
        if self._work is not None:
            # Every rank launched the same rounds; complete ours so the group is quiescent.
            try:
                self._work.wait()
            except Exception as exc:
                log.warning("threadlet: last agreement round failed: %s", exc)
            self._work = None
        if self._link is not None:
            self._link.close(self._status(RankState.FINISHED))
        self._model = None
        self._board = KnobBoard()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- background thread: filing ------------------------------------------------------------

    def _file(self, cmd: Command, received_at_s: float) -> None:
        """Validate a command locally and file it (runs on the link thread; no training state)."""
        if cmd.seq <= self._last_decided:
            return
        with self._lock:
            if cmd.seq in self._inbox:
                return
        refusal: str | None = None
        values: dict[str, KnobValue] = {}
        body = cmd.body
        if isinstance(body, SetConfig):
            try:
                values = validate_set(self._board.schema, body.values)
            except CommandRejected as exc:
                refusal = exc.reason
        elif body.kind not in _SUPPORTED_ACTIONS:
            refusal = f"action {body.kind.value} is not supported yet"
        with self._lock:
            if cmd.seq > self._last_decided:
                self._inbox.setdefault(cmd.seq, _Filed(cmd, received_at_s, refusal, values))

    # ---- training thread: agreement -------------------------------------------------------------

    def _local_offer(self) -> tuple[int, int]:
        if not self._inbox:  # the common case costs no lock
            return self._last_decided, agreement.NONE_REFUSED
        with self._lock:
            refusals = {seq: f.refusal is not None for seq, f in self._inbox.items()}
        return agreement.local_offer(self._last_decided, refusals)

    def _boundary(self) -> None:
        if self.group is None:
            ready, refused = self._local_offer()
            if ready > self._last_decided:
                self._carry_out(agreement.decide(self._last_decided, ready, refused, ready, refused))
            return
        # A round launched at boundary k is read at boundary k + lag (at once while paused), so
        # gloo has `lag` whole steps to finish it and the wait is almost always free. Launch step,
        # lag and pause state are agreed, so every rank reads every round at the same step.
        if self._work is not None and (self._paused or self.step_count >= self._due_step):
            self._work.wait()
            assert self._round_buf is not None
            agreed_ready, agreed_refused, least_idle, neg_spacing, neg_lag = (
                int(v) for v in self._round_buf.tolist()
            )
            self._work = None
            ready, refused = self._offer
            if agreed_ready > self._last_decided:
                self._carry_out(
                    agreement.decide(self._last_decided, ready, refused, agreed_ready, agreed_refused)
                )
            self._lag = -neg_lag
            # Some rank had commands filed: the next round at once until all are decided.
            # Otherwise it waits the agreed spacing (the largest any rank proposed).
            self._next_round_step = self.step_count + (0 if least_idle < 0 else -neg_spacing)
        # A round costs the step some CPU and wake-ups (gloo runs it beside the training step),
        # so an idle job spaces rounds about idle_round_period_s apart.
        if self._work is None and (self._paused or self.step_count >= self._next_round_step):
            self._offer = self._local_offer()
            idle = -1 if self._inbox else 0
            spacing, lag = self._proposals()
            self._round_buf = torch.tensor((*self._offer, idle, -spacing, -lag), dtype=torch.int64)
            self._work = dist.all_reduce(
                self._round_buf, op=dist.ReduceOp.MIN, group=self.group, async_op=True
            )
            self._due_step = self.step_count + self._lag
            self.rounds += 1

    def _proposals(self) -> tuple[int, int]:
        """This rank's proposals, in steps at its step time: the idle spacing between rounds
        (idle_round_period_s) and the lag of a round (round_budget_s, at least one step)."""
        cfg = self.config
        step_s = self._step_time_s
        if step_s <= 0:
            return 1, 1
        spacing = max(1, min(cfg.max_idle_round_steps, int(cfg.idle_round_period_s / step_s)))
        lag = max(1, min(cfg.max_round_lag_steps, math.ceil(cfg.round_budget_s / step_s)))
        return spacing, lag

    def _wait_paused(self) -> None:
        while self._paused and not self._closed:
            time.sleep(self.config.paused_poll_s)
            if time.perf_counter() >= self._next_status_t:
                self._refresh_status(RankState.PAUSED)
            self._boundary()
            if self._link is not None and self._link.errors:
                self._surface_errors(self._link)
        self._refresh_status(RankState.RUNNING)

    def _carry_out(self, verdicts: list[tuple[int, Verdict]]) -> None:
        decided_at_s = time.time()
        for seq, verdict in verdicts:
            with self._lock:
                filed = self._inbox.pop(seq)
            self._last_decided = seq
            cmd = filed.command
            body = cmd.body
            kind = "set" if isinstance(body, SetConfig) else body.kind.value
            status, reason = AckStatus.APPLIED, ""
            if verdict is Verdict.REJECT_SELF:
                status, reason = AckStatus.REJECTED, f"rank {self.rank} refused: {filed.refusal}"
            elif verdict is Verdict.REJECT_OTHER:
                status, reason = AckStatus.REJECTED, "refused by another rank"
            else:
                try:
                    self._apply(body, filed.values)
                except Exception as exc:  # a user apply hook failed: report, keep training
                    status, reason = AckStatus.REJECTED, f"rank {self.rank} failed to apply: {exc}"
            self.applied.append(
                {
                    "seq": seq,
                    "command_id": cmd.command_id,
                    "kind": kind,
                    "status": status.value,
                    "step": self.step_count,
                    "reason": reason,
                    "values": dict(filed.values),
                }
            )
            ack = Ack(
                command_id=cmd.command_id,
                job=self.config.job,
                run_id=self.config.run_id,
                seq=seq,
                rank=self.rank,
                incarnation=self.incarnation,
                status=status,
                reason=reason,
                step=self.step_count,
                decided_at_s=decided_at_s,
                received_at_s=filed.received_at_s,
            )
            if self._link is not None:
                self._link.publish(subjects.acks(self.config.job), wire.encode(ack))
        self._next_status_t = 0.0

    def _apply(self, body: SetConfig | Action, values: dict[str, KnobValue]) -> None:
        if isinstance(body, SetConfig):
            self._board.apply(values)
        elif body.kind is ActionKind.PAUSE:
            self._paused = True
        elif body.kind is ActionKind.RESUME:
            self._paused = False

    # ---- training thread: reports ---------------------------------------------------------------

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
