"""The training-thread side of the threadlet: the public `Threadlet` facade, step boundaries, the step
agreement over a dedicated gloo group, deciding filed commands, replay mode and acks. Carrying out
actions lives in `threadlet.actions`, status and metrics reports in `threadlet.reports`."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import torch
import torch.distributed as dist

from threadlet import agreement, health, nvml_fake, replay
from threadlet.actions import ActionsMixin
from threadlet.agreement import Verdict
from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import Applier, Getter, KnobBoard, TrainingKnobs, Validator, knob_type
from threadlet.reports import ReportsMixin
from torchloom import naming, replay_file, subjects, wire
from torchloom.errors import CommandRejected
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    Command,
    KnobSpec,
    KnobType,
    KnobValue,
    RankState,
    SetConfig,
)

log = logging.getLogger("threadlet")

EvalFn = Callable[[], Mapping[str, float]]
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


class Threadlet(ActionsMixin, ReportsMixin):
    """One rank's agent. Create it with `threadlet.attach`; call `step()` once per training step.

    A rollback moves `step_count` back to the checkpoint's step, so training loops should iterate
    with `for step in tl.range(total_steps):` (or read `tl.step_count`) instead of their own counter;
    `range` also ends after a `stop` action.

    Attributes:
        applied: one dict per decided command on this rank, in seq order, with keys seq,
            command_id, kind ("set" or the action), status ("applied"/"rejected"), step and branch
            (where it was decided), reason, values (typed values of a set; {} for actions) and
            detail (the ack detail).
        step_count: completed training steps on the current branch; the step every report names.
        tick: `step()` calls since start; never rewinds.
        branch: the current branch ("main", then "b<seq>" after each rollback).
    """

    def __init__(
        self,
        config: ThreadletConfig,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        sampler: Any = None,
        eval_fn: EvalFn | None = None,
    ) -> None:
        self.config = config
        info = rank_info()
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.incarnation = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.applied: list[dict[str, Any]] = []
        self.step_count = 0
        self.tick = 0
        self.branch = naming.MAIN_BRANCH
        self._model = model
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._sampler = sampler
        self._eval_fn = eval_fn
        self._board = KnobBoard(optimizer, scheduler)
        self._lock = threading.Lock()
        self._inbox: dict[int, _Filed] = {}
        self._last_decided = 0
        self._paused = False
        self._stop = False
        self._closed = False
        self._work: Any = None
        self._round_buf: torch.Tensor | None = None
        self._offer = (0, agreement.NONE_REFUSED)
        # Round scheduling counts ticks, not steps: a rollback rewinds steps on every rank alike,
        # but a round in flight must still be read a fixed number of boundaries later.
        self._next_round_tick = 0
        self._due_tick = 0
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
        self._probe: health.DeviceProbe | None = None
        self._fake_nvml: nvml_fake.FakeNvml | None = None
        self._replay: replay.Schedule | None = None
        if config.replay_path is not None:
            job, entries = replay_file.load(config.replay_path)
            if job and job != config.job:
                log.warning("threadlet: replaying commands of job %r as job %r", job, config.job)
            self._replay = replay.Schedule(entries)
        self._pending_overrides: dict[str, Any] = {}  # set before the local-mode return: step() reads it
        # A sampler's knobs (mix, batch_size) exist before a resume restores or overrides them.
        if sampler is not None and callable(getattr(sampler, "register_knobs", None)):
            sampler.register_knobs(self)
        if config.local and self._replay is None:
            return
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            from datetime import timedelta

            # Every rank calls attach at the same point, so this collective group creation matches.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.agreement_timeout_s))
        # One fake device per local rank, so "xid:79@30/1" fails local rank 1's device only.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        fake_devices = max(local_world, self.local_rank + 1)
        if config.fake_nvml:
            self._fake_nvml = nvml_fake.from_spec(config.fake_nvml, device_count=fake_devices)
        elif config.fault_injection_allowed:
            self._fake_nvml = nvml_fake.FakeNvml(fake_devices)  # empty: fault_inject scripts it
        self.resumed_from: str = ""  # the checkpoint this process started from ("" for a fresh start)
        self._resume_at_start()
        if config.local:
            return
        self._probe = health.make_probe(self.local_rank, device=_device_of(model), nvml=self._fake_nvml)
        on_command = None if self._replay is not None else self._file
        self._link = Link(config, rank=self.rank, on_command=on_command, probe=self._probe)
        self._refresh_status(RankState.RUNNING)
        self._link.start()

    # ---- public API -----------------------------------------------------------------------------

    def step(self, loss: float | None = None, tokens: float | None = None, **metrics: float) -> None:
        """Mark a step boundary: decide and apply agreed commands, report metrics when due.

        Returns quickly; blocks only while the job is paused or an action (checkpoint, rollback,
        eval) runs. Never raises because of the bus.
        """
        now = time.perf_counter()
        dt = now - self._last_t
        self._last_t = now
        self.step_count += 1
        self.tick += 1
        self._step_time_s = (
            dt if self.tick == 1 else self._step_time_s + _STEP_TIME_EMA * (dt - self._step_time_s)
        )
        if self._fake_nvml is not None:
            self._fake_nvml.set_step(self.step_count)
        if self._pending_overrides:
            self._apply_overrides()
        if self._closed:
            return
        if self._replay is not None:
            self._replay_boundary()
        elif self._link is not None:
            self._boundary()
        link = self._link
        if link is None:
            return
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

    def range(self, total_steps: int) -> Iterator[int]:
        """Iterate training steps: yields `step_count` (the step about to run) until it reaches
        `total_steps` or a `stop` action was decided. Follows rollbacks: after one, the next value
        is the checkpoint's step. Call `step()` once per iteration."""
        if total_steps < 0:
            raise ValueError(f"total_steps={total_steps} rejected: must be >= 0")
        while not self._stop and self.step_count < total_steps:
            yield self.step_count

    @property
    def training(self) -> TrainingKnobs:
        """Training-loop knobs (grad_clip_norm, grad_accum_steps): `tl.training.enable(...)` makes
        them steerable; read their current values here every step."""
        if self._pending_overrides:  # a resume's overrides apply once the loop enabled the knob
            self._apply_overrides()
        return self._board.training

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step (the `grad_accum_steps` knob, default 1). The first
        read makes the knob steerable; read it once per optimizer step."""
        knobs = self._board.training
        value = knobs.grad_accum_steps  # enables the knob, so a pending override can land now
        if self._pending_overrides:
            self._apply_overrides()
            value = knobs.grad_accum_steps
        return value

    def clip_grad_(
        self, parameters: torch.Tensor | Iterable[torch.Tensor], norm_type: float = 2.0
    ) -> float | None:
        """Clip gradients in place to the current `grad_clip_norm` knob (0, the default, disables
        clipping); the first call makes the knob steerable.

        Args:
            parameters: as for `torch.nn.utils.clip_grad_norm_`.
            norm_type: the p of the p-norm.

        Returns:
            The total gradient norm before clipping, or None while clipping is disabled.
        """
        knobs = self._board.training
        if "grad_clip_norm" not in knobs.enabled:
            knobs.enable(grad_clip_norm=knobs.grad_clip_norm)
        if self._pending_overrides:
            self._apply_overrides()
        return knobs.clip_grad_(parameters, norm_type=norm_type)

    @property
    def should_stop(self) -> bool:
        """True once a `stop` action was decided (after its checkpoint): leave the training loop."""
        return self._stop

    def on_eval(self, fn: EvalFn) -> None:
        """Register the function the `eval` action calls on every rank at the same step; it returns
        metric name -> float, reported as `eval.<name>` in the ack detail."""
        self._eval_fn = fn

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
        validate: Validator | None = None,
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
            validate: optional structural check of a typed value (e.g. the `mix` syntax): raises
                CommandRejected or ValueError naming the expected form and changes nothing. Every
                rank runs it when a command arrives (on the bus thread, so it must only read
                immutable state), so a bad value is refused by all ranks and applied by none.

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
        self._board.register(spec, get, apply, validate)
        self._next_status_t = 0.0

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Finish the last agreement round, send a FINISHED heartbeat (bounded), stop the bus
        thread and close the device probe. Idempotent. Destroys nothing of the user's
        (`threadlet.finish` does the rest)."""
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
        if self._probe is not None:
            try:
                self._probe.close()
            except Exception as exc:
                log.debug("device probe close: %r", exc)
        self._model = self._optimizer = self._scheduler = self._sampler = None
        self._eval_fn = None
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
        filed = self._prepare(cmd, received_at_s)
        with self._lock:
            if cmd.seq > self._last_decided:
                self._inbox.setdefault(cmd.seq, filed)

    def _prepare(self, cmd: Command, received_at_s: float) -> _Filed:
        refusal: str | None = None
        values: dict[str, KnobValue] = {}
        body = cmd.body
        if isinstance(body, SetConfig):
            try:
                # Types, bounds and the knobs' validate hooks (e.g. mix structure): a bad value is
                # refused here by every rank, so none applies it.
                values = self._board.validate(body.values)
            except CommandRejected as exc:
                refusal = exc.reason
        else:
            refusal = self._action_refusal(body)
        return _Filed(cmd, received_at_s, refusal, values)

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
        # gloo has `lag` whole steps to finish it and the wait is almost always free. Launch tick,
        # lag and pause state are agreed, so every rank reads every round at the same boundary.
        if self._work is not None and (self._paused or self.tick >= self._due_tick):
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
            self._next_round_tick = self.tick + (0 if least_idle < 0 else -neg_spacing)
        # A round costs the step some CPU and wake-ups (gloo runs it beside the training step),
        # so an idle job spaces rounds about idle_round_period_s apart.
        if self._work is None and (self._paused or self.tick >= self._next_round_tick):
            self._offer = self._local_offer()
            idle = -1 if self._inbox else 0
            spacing, lag = self._proposals()
            self._round_buf = torch.tensor((*self._offer, idle, -spacing, -lag), dtype=torch.int64)
            self._work = dist.all_reduce(
                self._round_buf, op=dist.ReduceOp.MIN, group=self.group, async_op=True
            )
            self._due_tick = self.tick + self._lag
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

    def _replay_boundary(self) -> None:
        assert self._replay is not None
        due = self._replay.due(self.branch, self.step_count)
        if not due:
            return
        now = time.time()
        batch = [(self._prepare(e.command(self.config.job, self.config.run_id), now), e.seq) for e in due]
        # Every rank replays the same entries at the same position; a local refusal is this
        # rank's problem only, so it is reported rather than agreed.
        self._decide_batch(
            [(f, Verdict.APPLY if f.refusal is None else Verdict.REJECT_SELF) for f, _ in batch]
        )

    def _carry_out(self, verdicts: list[tuple[int, Verdict]]) -> None:
        batch: list[tuple[_Filed, Verdict]] = []
        for seq, verdict in verdicts:
            with self._lock:
                batch.append((self._inbox.pop(seq), verdict))
        self._decide_batch(batch)

    def _decide_batch(self, batch: list[tuple[_Filed, Verdict]]) -> None:
        # Every command of a batch is decided at the position of the boundary, even after a
        # rollback in the batch moved it: a replay finds them all at that one position.
        decided_at_s = time.time()
        step, branch = self.step_count, self.branch
        for filed, verdict in batch:
            cmd = filed.command
            seq = cmd.seq
            self._last_decided = max(self._last_decided, seq)
            body = cmd.body
            kind = "set" if isinstance(body, SetConfig) else body.kind.value
            status, reason = AckStatus.APPLIED, ""
            detail: dict[str, str] = {}
            if verdict is Verdict.REJECT_SELF:
                status, reason = AckStatus.REJECTED, f"rank {self.rank} refused: {filed.refusal}"
            elif verdict is Verdict.REJECT_OTHER:
                status, reason = AckStatus.REJECTED, "refused by another rank"
            else:
                try:
                    detail = self._apply(seq, body, filed.values)
                except Exception as exc:  # a user hook or the filesystem failed: report, keep training
                    log.warning("threadlet rank %d: command %d (%s) failed: %r", self.rank, seq, kind, exc)
                    status, reason = AckStatus.REJECTED, f"rank {self.rank} failed to apply: {exc}"
            self.applied.append(
                {
                    "seq": seq,
                    "command_id": cmd.command_id,
                    "kind": kind,
                    "status": status.value,
                    "step": step,
                    "branch": branch,
                    "reason": reason,
                    "values": dict(filed.values),
                    "args": dict(body.args) if isinstance(body, Action) else {},
                    "detail": detail,
                }
            )
            if self._link is None or self._replay is not None:
                continue
            ack = Ack(
                command_id=cmd.command_id,
                job=self.config.job,
                run_id=self.config.run_id,
                seq=seq,
                rank=self.rank,
                incarnation=self.incarnation,
                status=status,
                reason=reason,
                step=step,
                decided_at_s=decided_at_s,
                received_at_s=filed.received_at_s,
                detail=detail,
                branch=branch,
                refused_by_peer=verdict is Verdict.REJECT_OTHER,
            )
            self._link.publish(subjects.acks(self.config.job), wire.encode(ack))
        self._next_status_t = 0.0


def _device_of(model: Any) -> Any:
    """The training device of `model` (its first parameter's), or None."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    try:
        first = next(iter(params()))
    except (StopIteration, TypeError):
        return None
    return getattr(first, "device", None)
