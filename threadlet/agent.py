"""The `Threadlet`: one rank's public, synchronous front. It declares its components up front and
delegates to them: the shared `TrainingState`, the `Agreement` (inbox and rounds), the `ActionRunner`
(carries out decided commands), the `Reporter` (heartbeat status, metrics, acks) and the `Link` (the
bus thread). Local mode builds the same components, with no link and no agreement group."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from types import TracebackType
from typing import Any, NoReturn, Self

import torch
import torch.distributed as dist

from threadlet import ddp_hook, health, nvml_fake, orphan, replay
from threadlet.actions import ActionRunner, EvalFn
from threadlet.agreement import Agreement, Batch, GlooTransport, Verdict
from threadlet.config import ThreadletConfig
from threadlet.link import Link
from threadlet.optim_knobs import Applier, Getter, KnobBoard, TrainingKnobs, Validator, knob_type
from threadlet.reports import Outbox, Reporter
from threadlet.state import Decided, Filed, RankContext, TrainingState, mark_superseded
from threadlet.update_ratio import SPEC as UPDATE_RATIO_SPEC
from threadlet.update_ratio import UpdateRatio
from torchloom import naming, replay_file
from torchloom.messages import KnobSpec, KnobType, RankState

__all__ = ["EvalFn", "Threadlet"]

log = logging.getLogger("threadlet")

_STEP_TIME_EMA = 0.1  # weight of the newest step in the step-time mean
# A set lr that no scheduler given to the threadlet follows is compared with the optimizer's at most
# this often (at each step of a slower loop): a change by something else is reported that late.
_LR_CHECK_PERIOD_S = 0.05


class Threadlet:
    """One rank's agent. Create it with `threadlet.attach`; call `step()` once per training step.

    A rollback moves `step_count` back to the checkpoint's step, so training loops should iterate
    with `for step in tl.range(total_steps):` (or read `tl.step_count`) instead of their own counter;
    `range` also ends after a `stop` action.

    Stop: once a `stop` is decided (and its checkpoint taken), the next `step()` closes the
    threadlet, destroys the threadlet's process group and raises `SystemExit(0)` on every rank at
    the same step, so any loop ends and torchrun exits 0. A script that ends its loop itself says so
    by iterating `tl.range`, reading `tl.should_stop`, calling `tl.handles_stop()` or passing
    `handles_stop=True`; then `step()` never exits.

    Attributes:
        config: the resolved configuration.
        applied: one frozen `Decided` record per command decided on this rank, in seq order (seq,
            command_id, kind, status, step and branch where it was decided, reason, values, args,
            detail); `Decided.to_json()` gives the JSON form.
        resumed_from: the checkpoint this process started from ("" for a fresh start, and always in
            local mode).
        group: the dedicated gloo group of the step agreement and checkpoints (None with one rank
            or no bus).
        agreement_path: how the step agreement travels: "piggyback" (inside DDP's gradient
            all-reduce), "side" (beside a user's DDP comm hook, in the same backward), "gloo" (its
            own rounds on `group`) or "local" (one rank, no rounds).
    """

    def __init__(
        self,
        config: ThreadletConfig,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        sampler: Any = None,
        loader: Any = None,
        eval_fn: EvalFn | None = None,
        handles_stop: bool = False,
    ) -> None:
        self.config = config
        self._ctx = RankContext.detect()
        self._state = TrainingState(loop_handles_stop=handles_stop)
        self.applied: list[Decided] = []
        self._last_lr_set: Decided | None = None  # the latest applied set of lr (for notices)
        self.resumed_from = ""
        self._closed = False
        self._last_t = time.perf_counter()
        self._replay = _load_replay(config)
        # Local mode only counts steps; with a bus or a replay the rank takes part in a run: it
        # resumes, joins the agreement group and may have a fake device.
        in_run = not config.local or self._replay is not None
        self.group = _agreement_group(config, self._ctx) if in_run else None
        self._fake_nvml = _fake_device(config, self._ctx.local_rank) if in_run else None
        self._board = KnobBoard(optimizer, scheduler)
        self._runner = ActionRunner(
            config,
            self._ctx,
            self._state,
            self._board,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler=sampler,
            loader=loader,
            eval_fn=eval_fn,
            group=self.group,
            fake_nvml=self._fake_nvml,
            replaying=self._replay is not None,
        )
        self._agreement = Agreement(
            config,
            self._state,
            prepare=self._runner.prepare,
            transport=GlooTransport(self.group) if self.group is not None else None,
        )
        self.agreement_path = "local" if self.group is None else "gloo"
        self.use_ddp(model)
        self._probe: health.DeviceProbe | None = None
        self._link: Link | None = None
        # The reports' hand-over: the Reporter swaps raw values in, the link thread builds from them.
        outbox = Outbox(config, self._ctx, lr_groups=self._board.groups, state=self._state)
        if not config.local:
            self._probe = health.make_probe(
                self._ctx.local_rank, device=_device_of(model), nvml=self._fake_nvml
            )
            on_command = None if self._replay is not None else self._agreement.file
            self._link = Link(
                config,
                rank=self._ctx.rank,
                on_command=on_command,
                probe=self._probe,
                incarnation=self._ctx.incarnation,
                reports=outbox,
            )
        # The update-to-weight ratio on request (the `report_update_ratio` knob, 0 = off).
        self._update_ratio = UpdateRatio(optimizer, self._board.groups) if optimizer is not None else None
        if self._update_ratio is not None:
            self._board.register(UPDATE_RATIO_SPEC, self._update_ratio.value, self._update_ratio.apply)
        self._reporter = Reporter(
            config,
            self._ctx,
            self._state,
            self._board,
            self._link,
            self._update_ratio,
            outbox=outbox,
            optimizer=optimizer,
        )
        self._next_lr_check_t = 0.0
        try:
            # A sampler's knobs (mix, batch_size) exist before a resume restores or overrides them.
            if sampler is not None and callable(getattr(sampler, "register_knobs", None)):
                sampler.register_knobs(self)
            if in_run:
                self.resumed_from = self._runner.resume_at_start()
        except BaseException:
            self._close_bus()
            raise
        if self._link is not None:
            self._reporter.refresh_status(RankState.RUNNING)
            self._link.start()
        # A rank of a steered torchrun job ends if its agent dies, instead of training on orphaned.
        self._orphan_watch = None if config.local else orphan.watch_if_supervised(os.environ, rank=self.rank)
        if not self.resumed_from and self._state.step_count == 0:
            # Step 0, before the first optimizer step: what a run decided here (a policy's start
            # commands) a replay applies here too.
            if self._replay is not None:
                self._replay_boundary()
            elif self._link is not None and config.start_hold_s > 0:
                self._hold_at_start()
        self._arm_update_ratio()

    # ---- identity and position ------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._ctx.rank

    @property
    def world_size(self) -> int:
        return self._ctx.world_size

    @property
    def local_rank(self) -> int:
        return self._ctx.local_rank

    @property
    def incarnation(self) -> str:
        """A fresh uuid4 hex per process start."""
        return self._ctx.incarnation

    @property
    def host(self) -> str:
        return self._ctx.host

    @property
    def pid(self) -> int:
        return self._ctx.pid

    @property
    def step_count(self) -> int:
        """Completed training steps on the current branch; the step every report names."""
        return self._state.step_count

    @property
    def tick(self) -> int:
        """`step()` calls since start; never rewinds."""
        return self._state.tick

    @property
    def branch(self) -> str:
        """The current branch ("main", then "b<seq>" after each rollback)."""
        return self._state.branch

    @property
    def rounds(self) -> int:
        """Agreement rounds started (a cost/latency statistic)."""
        return self._agreement.rounds

    def use_ddp(self, model: Any) -> str:
        """Carry the step agreement inside the gradient all-reduce of the DistributedDataParallel that
        is (or wraps) `model`, from the next round on; `attach(model=...)` already does this.

        A collective: call it on every rank at the same point, before the next backward. Without a
        DDP over the whole world, with a hook of the user's not wrapped by
        `threadlet.wrap_comm_hook`, or with `agreement="gloo"`, the gloo rounds stay.

        Returns:
            The agreement path now in use (see `agreement_path`).
        """
        if self.group is None or self.config.agreement != "auto" or self.agreement_path != "gloo":
            return self.agreement_path
        self.agreement_path = ddp_hook.connect(self._agreement, model, self.group)
        return self.agreement_path

    # ---- the training loop ----------------------------------------------------------------------

    def step(self, loss: float | None = None, tokens: float | None = None, **metrics: float) -> None:
        """Mark a step boundary: decide and apply agreed commands, report metrics when due.

        Returns quickly; blocks only while the job is paused or an action (checkpoint, rollback,
        eval) runs. Never raises because of the bus.
        """
        st = self._state
        if st.exit_at_next_step:
            self._exit_after_stop()
        now = time.perf_counter()
        dt = now - self._last_t
        self._last_t = now
        st.step_count += 1
        st.tick += 1
        st.step_time_s = dt if st.tick == 1 else st.step_time_s + _STEP_TIME_EMA * (dt - st.step_time_s)
        if self._fake_nvml is not None:
            self._fake_nvml.set_step(st.step_count)
        reporter = self._reporter
        # A loss given as a Python number is checked every step (a tensor only when metrics are
        # due, in `Reporter.send_metrics`: reading it every step would sync the device).
        if isinstance(loss, float) and not math.isfinite(loss):
            reporter.nonfinite_loss_steps += 1
        ratio = self._update_ratio
        if ratio is not None and ratio.loss_due:
            ratio.note_loss(loss)  # the loss of the step just measured
        runner = self._runner
        if runner.pending_overrides:
            runner.apply_overrides()
        if self._closed:
            return
        last_lr_set = self._last_lr_set
        if last_lr_set is not None and now >= self._next_lr_check_t:
            # Whether something else changed a set lr: looked at on a clock, not at every step.
            self._next_lr_check_t = now + _LR_CHECK_PERIOD_S
            for message in self._board.lr_overwritten():
                reporter.notice(last_lr_set, naming.LR_OVERWRITTEN, message)
        if self._replay is not None:
            self._replay_boundary()
        elif self._link is not None:
            self._boundary()
        link = self._link
        if link is None:
            return
        if st.paused:
            self._wait_paused()
            self._last_t = time.perf_counter()  # a pause is not step time
            now = self._last_t
        if ratio is not None and st.tick >= ratio.next_tick:
            ratio.arm(st.tick, st.step_count)  # measure the next optimizer step (see _arm_update_ratio)
        if now >= reporter.next_report_t:
            reporter.report(now, loss, tokens, metrics)
        if link.errors:
            reporter.surface_errors()

    def range(self, total_steps: int) -> Iterator[int]:
        """Iterate training steps: yields `step_count` (the step about to run) until it reaches
        `total_steps` or a `stop` action was decided. Follows rollbacks: after one, the next value
        is the checkpoint's step. Call `step()` once per iteration."""
        if total_steps < 0:
            raise ValueError(f"total_steps={total_steps} rejected: must be >= 0")
        st = self._state
        st.loop_handles_stop = True
        while not st.stop and st.step_count < total_steps:
            yield st.step_count

    @property
    def training(self) -> TrainingKnobs:
        """Training-loop knobs (grad_clip_norm, grad_accum_steps): `tl.training.enable(...)` makes
        them steerable; read their current values here every step."""
        if self._runner.pending_overrides:  # a resume's overrides apply once the loop enabled the knob
            self._runner.apply_overrides()
        return self._board.training

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step (the `grad_accum_steps` knob, default 1). The first
        read makes the knob steerable; read it once per optimizer step."""
        knobs = self._board.training
        value = knobs.grad_accum_steps  # enables the knob, so a pending override can land now
        if self._runner.pending_overrides:
            self._runner.apply_overrides()
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
        if self._runner.pending_overrides:
            self._runner.apply_overrides()
        norm = knobs.clip_grad_(parameters, norm_type=norm_type)
        if norm is not None:
            self._reporter.note_grad_norm(norm)
        return norm

    @property
    def should_stop(self) -> bool:
        """True once a `stop` action was decided (after its checkpoint): leave the training loop.
        Reading it declares that the loop handles stop (see `handles_stop`)."""
        st = self._state
        st.loop_handles_stop = True
        return st.stop

    def handles_stop(self) -> None:
        """Declare that the script ends its loop on a stop itself (reading `should_stop`), so
        `step()` never ends the process. Declare it before training: the ack of a stop decided
        earlier already promised the exit at the next step."""
        self._state.loop_handles_stop = True

    @property
    def paused(self) -> bool:
        return self._state.paused

    def on_eval(self, fn: EvalFn) -> None:
        """Register the function the `eval` action calls on every rank at the same step; it returns
        metric name -> float, reported as `eval.<name>` in the ack detail."""
        self._runner.eval_fn = fn

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
        self._reporter.status_due()

    def close(self) -> None:
        """Finish the last agreement round, send a FINISHED heartbeat (bounded), stop the bus
        thread and close the device probe. Idempotent. Destroys nothing of the user's
        (`threadlet.finish` does the rest)."""
        if self._closed:
            return
        self._closed = True
        if self._orphan_watch is not None:
            self._orphan_watch.stop()
        self._agreement.close()
        self._reporter.refresh_status(RankState.FINISHED)  # the link sends it as it closes
        self._close_bus()
        if self._update_ratio is not None:
            self._update_ratio.release()
        self._runner.release()
        self._board.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- step boundaries ------------------------------------------------------------------------

    def _boundary(self) -> None:
        # Read the round due now and carry out its verdicts before offering again, so the next
        # offer starts after what was just decided (and a pause just decided takes effect).
        batch = self._agreement.read_round()
        if batch:
            self._decide(batch, ack=True)
        self._agreement.start_round()

    def _arm_update_ratio(self) -> None:
        st, ratio = self._state, self._update_ratio
        if ratio is not None and st.tick >= ratio.next_tick:
            # Measure the next optimizer step, the one from this step on (off: never reached).
            ratio.arm(st.tick, st.step_count)

    def _hold_at_start(self) -> None:
        """Hold a fresh run at step 0, paused, before its first optimizer step, until a resume is
        decided (the weaver's autopilot sends its policy's start commands, then resume: decided here,
        at step 0, on every rank) or `start_hold_s` of rounds passed. Rounds are collective, one per
        poll, so every rank leaves the hold at the same round either way."""
        st, reporter, cfg = self._state, self._reporter, self.config
        polls = max(1, math.ceil(cfg.start_hold_s / cfg.paused_poll_s))
        held = {naming.HELD_AT_START: 1.0}
        st.paused = True
        reporter.refresh_status(RankState.PAUSED)
        for _ in range(polls):
            now = time.perf_counter()
            if now >= reporter.next_metrics_t:
                reporter.send_metrics(now, None, None, held)  # again and again: a weaver may restart
            if now >= reporter.next_status_t:
                reporter.refresh_status(RankState.PAUSED)
            time.sleep(cfg.paused_poll_s)
            self._boundary()
            if not st.paused or self._closed:
                break
        else:
            log.warning(
                "threadlet rank %d: no resume within start_hold_s=%g s; training starts without the "
                "policy's start commands",
                self.rank,
                cfg.start_hold_s,
            )
            st.paused = False
        reporter.refresh_status(RankState.RUNNING)
        self._last_t = time.perf_counter()  # the hold is not step time

    def _wait_paused(self) -> None:
        st, reporter = self._state, self._reporter
        while st.paused and not self._closed:
            time.sleep(self.config.paused_poll_s)
            if time.perf_counter() >= reporter.next_status_t:
                reporter.refresh_status(RankState.PAUSED)
            self._boundary()
            if self._link is not None and self._link.errors:
                reporter.surface_errors()
        reporter.refresh_status(RankState.RUNNING)

    def _replay_boundary(self) -> None:
        assert self._replay is not None
        st = self._state
        due = self._replay.due(st.branch, st.step_count)
        if not due:
            return
        now = time.time()
        filed = [self._runner.prepare(e.command(self.config.job, self.config.run_id), now) for e in due]
        # Every rank replays the same entries at the same position; a local refusal is this
        # rank's problem only, so it is reported rather than agreed.
        self._decide(
            [(f, Verdict.APPLY if f.refusal is None else Verdict.REJECT_SELF) for f in filed], ack=False
        )

    def _decide(self, batch: Batch, *, ack: bool) -> None:
        # Every command of a batch is decided at the position of the boundary, even after a
        # rollback in the batch moved it: a replay finds them all at that one position.
        decided_at_s = time.time()
        step, branch = self._state.step_count, self._state.branch
        done: list[Decided] = []
        held: set[int] = set()  # sets a later set of this batch may replace: acked once it ran
        for i, (filed, verdict) in enumerate(batch):
            decided = self._runner.carry_out(filed, verdict, step=step, branch=branch)
            done.append(decided)
            if decided.applied and decided.kind == "set" and _set_again(decided, batch[i + 1 :]):
                held.add(i)
            elif ack:
                self._ack(filed, verdict, decided, decided_at_s)
        if held:
            done = mark_superseded(done)  # a value replaced at this same boundary: no step used it
        for i, decided in enumerate(done):
            self.applied.append(decided)
            if decided.applied and any(k.split("@", 1)[0] == "lr" for k in decided.values):
                self._last_lr_set = decided
            if ack and i in held:
                self._ack(*batch[i], decided, decided_at_s)
        self._reporter.status_due()

    def _ack(self, filed: Filed, verdict: Verdict, decided: Decided, decided_at_s: float) -> None:
        self._reporter.ack(
            decided,
            received_at_s=filed.received_at_s,
            decided_at_s=decided_at_s,
            refused_by_peer=verdict is Verdict.REJECT_OTHER,
        )

    def _exit_after_stop(self) -> NoReturn:
        """End this rank cleanly after a decided stop: close, leave the agreement group together
        with the other ranks (all decided the stop at the same step) and raise SystemExit(0), so
        the script's `with` and `finally` blocks still run. The default process group is the
        script's: destroyed at interpreter exit unless the script did it first."""
        st = self._state
        log.info("threadlet rank %d: stop decided, ending the process at step %d", self.rank, st.step_count)
        group = self.group
        self.close()
        if group is not None:
            with contextlib.suppress(Exception):  # bounded by the group's timeout
                dist.barrier(group=group)
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
            self.group = None
        atexit.register(_destroy_default_group)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        raise SystemExit(0)

    def _close_bus(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._probe is not None:
            try:
                self._probe.close()
            except Exception as exc:
                log.debug("device probe close: %r", exc)


def _set_again(decided: Decided, rest: Batch) -> bool:
    """Whether a command agreed later in the same batch sets one of `decided`'s knobs again (any
    group: `mark_superseded` then says exactly which keys it replaced, once it ran)."""
    names = {key.split("@", 1)[0] for key in decided.values}
    return any(
        verdict is Verdict.APPLY and any(key.split("@", 1)[0] in names for key in filed.values)
        for filed, verdict in rest
    )


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _load_replay(config: ThreadletConfig) -> replay.Schedule | None:
    if config.replay_path is None:
        return None
    job, entries = replay_file.load(config.replay_path)
    if job and job != config.job:
        log.warning("threadlet: replaying commands of job %r as job %r", job, config.job)
    return replay.Schedule(entries)


def _agreement_group(config: ThreadletConfig, ctx: RankContext) -> Any:
    """A dedicated gloo group for the agreement (None with one rank or no torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized() and ctx.world_size > 1):
        return None
    # Every rank calls attach at the same point, so this collective group creation matches.
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=config.agreement_timeout_s))


def _fake_device(config: ThreadletConfig, local_rank: int) -> nvml_fake.FakeNvml | None:
    """One fake device per local rank, so "xid:79@30/1" fails local rank 1's device only."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    devices = max(local_world, local_rank + 1)
    if config.fake_nvml:
        return nvml_fake.from_spec(config.fake_nvml, device_count=devices)
    if config.fault_injection_allowed:
        return nvml_fake.FakeNvml(devices)  # empty: fault_inject scripts it
    return None


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
