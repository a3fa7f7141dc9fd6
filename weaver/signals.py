"""Model health signals of one job, derived from the step metrics its ranks report: loss spikes over
the loss's EMA, divergence, plateaus, non-finite losses or gradients, throughput drops, update-to-weight
ratios over a bound (measured on request, threadlet.update_ratio) and step counts (for periodic rules).

Pure: `sample_of(metrics)` reads the values a rank reports; `observe(track, sample)` updates the job's
bounded `Track` (a mutator of that one object) and `detect(track, condition)` says whether a
condition holds now, with the window of samples that shows it. Nothing here reads a clock.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from enum import StrEnum

from torchloom import naming
from torchloom.messages import StepMetrics

# The metric names a rank reports (threadlet.reports): cumulative counts of steps with a non-finite
# loss / gradient norm, so a sampled report never hides one.
LOSS = "loss"
GRAD_NORM = "grad_norm"
STEP_TIME = "step_time_s"
NONFINITE_LOSS = "nonfinite_loss_steps"
NONFINITE_GRAD = "nonfinite_grad_steps"
# The update-to-weight ratio of the latest measured step and how many were measured (a rank measures
# one step every N when asked, and reports the latest with every metrics report until the next).
UPDATE_RATIO = "update_ratio"
UPDATE_RATIO_COUNT = "update_ratio_count"
UPDATE_RATIO_STEP = "update_ratio_step"  # the step the measured optimizer step started from
UPDATE_RATIO_LOSS = "update_ratio_loss"  # the loss of that step (before the update)

WINDOW = 64  # samples kept per job: what a firing journals as its signal window
MAX_CONSECUTIVE = 16  # update-to-weight ratio measurements kept per job (a condition's `consecutive`)
_EMA_ALPHA = 0.1  # weight of a new loss in the loss EMA
_SLOW_ALPHA = 0.02  # weight of a new step time in the baseline the throughput drop compares with
_WARMUP = 5  # samples before EMA-based signals may fire
PLATEAU_TOLERANCE = 1e-3  # relative improvement of the loss EMA that counts as progress


class Signal(StrEnum):
    """What a rule's `when` may name."""

    NONFINITE = "nonfinite"  # a non-finite loss or gradient norm on any rank
    LOSS_SPIKE = "loss_spike"  # loss over `factor` x its EMA
    DIVERGENCE = "divergence"  # loss EMA over `factor` x the best EMA so far
    PLATEAU = "plateau"  # the loss EMA did not improve (by PLATEAU_TOLERANCE) in `steps` steps
    THROUGHPUT_DROP = "throughput_drop"  # step time over `factor` x its slow baseline
    EVERY_STEPS = "every_steps"  # every `steps` steps (periodic checkpoints)
    UPDATE_RATIO = "update_ratio"  # the latest `consecutive` measured update-to-weight ratios over `above`


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One rank's step metrics as the signals read them (None where not reported)."""

    rank: int
    step: int
    branch: str
    loss: float | None = None
    grad_norm: float | None = None
    step_time_s: float | None = None
    nonfinite_loss: int = 0
    nonfinite_grad: int = 0
    update_ratio: float | None = None
    update_ratio_count: int = 0
    update_ratio_step: int | None = None
    update_ratio_loss: float | None = None
    held_at_start: bool = False  # the rank holds at step 0 for its policy's start commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """A signal with its thresholds (see `Signal` for what each reads)."""

    signal: Signal
    factor: float = 0.0
    steps: int = 0
    above: float = 0.0
    consecutive: int = 1  # update_ratio: how many latest measurements must all be over `above`
    loss_rose: bool = False  # update_ratio: and a loss reported since is over the measured step's


@dataclass(frozen=True, slots=True, kw_only=True)
class Detected:
    """A condition that holds: at which step, the value against its threshold, the window of
    (step, loss) samples that shows it, and the last step known good (before the trouble)."""

    signal: Signal
    step: int
    branch: str
    value: float
    threshold: float
    last_good_step: int
    window: tuple[tuple[int, float], ...]


@dataclass(slots=True, kw_only=True)
class Track:
    """The per-job state the signals are derived from; bounded by `WINDOW` samples.

    The loss and step time follow the lowest rank that reports them (ranks see different batches;
    one rank is a consistent series); non-finite counts are followed for every rank.
    """

    samples: collections.deque[Sample] = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    lead_rank: int | None = None
    branch: str = ""
    loss_ema: float = math.nan
    ema_before: float = math.nan  # the EMA before the latest loss (what a spike compares with)
    best_ema: float = math.nan
    best_step: int = 0
    seen: int = 0
    step_time_base: float = math.nan
    step_time_ema: float = math.nan
    nonfinite_counts: dict[int, tuple[int, int]] = field(default_factory=dict)
    nonfinite_new: bool = False
    last_good_step: int = 0
    step: int = 0
    update_ratio: float = math.nan  # the lead rank's latest measured ratio
    update_ratio_count: int = 0  # its measurement count when last seen
    update_ratio_new: bool = False  # the latest report brought a new measurement
    # The lead rank's latest measurements on this branch as (step measured, ratio, that step's loss
    # or NaN), newest last: a halved lr keeps them (the next measurement tells), a rollback's branch
    # starts without them.
    update_ratios: collections.deque[tuple[int, float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_CONSECUTIVE)
    )


def _count(raw: float | None) -> int:
    return int(raw) if raw is not None and math.isfinite(raw) and raw > 0 else 0


def sample_of(sm: StepMetrics) -> Sample:
    """The signal inputs of one metrics report."""
    values = sm.values
    return Sample(
        rank=sm.rank,
        step=sm.step,
        branch=sm.branch,
        loss=values.get(LOSS),
        grad_norm=values.get(GRAD_NORM),
        step_time_s=values.get(STEP_TIME),
        nonfinite_loss=_count(values.get(NONFINITE_LOSS)),
        nonfinite_grad=_count(values.get(NONFINITE_GRAD)),
        update_ratio=values.get(UPDATE_RATIO),
        update_ratio_count=_count(values.get(UPDATE_RATIO_COUNT)),
        update_ratio_step=_step(values.get(UPDATE_RATIO_STEP)),
        update_ratio_loss=values.get(UPDATE_RATIO_LOSS),
        held_at_start=values.get(naming.HELD_AT_START) == 1.0,
    )


def _step(raw: float | None) -> int | None:
    return int(raw) if raw is not None and math.isfinite(raw) and raw >= 0 else None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _bad(x: float | None) -> bool:
    return x is not None and not math.isfinite(x)


def _reset_series(track: Track) -> None:
    track.samples.clear()
    track.loss_ema = track.ema_before = track.best_ema = math.nan
    track.step_time_base = track.step_time_ema = math.nan
    track.seen = 0
    track.update_ratios.clear()  # measured on other weights, maybe at another lr


def observe(track: Track, sample: Sample) -> bool:
    """Fold one report into the job's track (mutates `track` only); True when it joined the loss
    and throughput series (it is the lead rank's), so conditions on them are worth checking again.

    A report of another branch, or of an earlier step (a rollback), starts the loss and throughput
    series afresh: the EMA of a branch that diverged says nothing of its successor.
    """
    before = track.nonfinite_counts.get(sample.rank, (0, 0))
    now_counts = (sample.nonfinite_loss, sample.nonfinite_grad)
    track.nonfinite_counts[sample.rank] = now_counts
    # A restarted process counts from 0 again: only an increase is news.
    track.nonfinite_new = now_counts[0] > before[0] or now_counts[1] > before[1]
    track.nonfinite_new |= _bad(sample.loss) or _bad(sample.grad_norm)
    if track.lead_rank is None or sample.rank < track.lead_rank:
        track.lead_rank = sample.rank
    if sample.rank != track.lead_rank:
        return False
    if sample.branch != track.branch or sample.step < track.step:
        _reset_series(track)
        track.branch = sample.branch
    # A measurement is new when its count moved (either way: a restarted process counts from 1).
    track.update_ratio_new = (
        sample.update_ratio is not None
        and sample.update_ratio_count > 0
        and sample.update_ratio_count != track.update_ratio_count
    )
    if track.update_ratio_new:
        assert sample.update_ratio is not None
        track.update_ratio = sample.update_ratio
        track.update_ratio_count = sample.update_ratio_count
        measured = sample.update_ratio_step if sample.update_ratio_step is not None else sample.step
        loss_then = sample.update_ratio_loss if _finite(sample.update_ratio_loss) else math.nan
        assert loss_then is not None
        track.update_ratios.append((min(measured, sample.step), sample.update_ratio, loss_then))
    track.step = sample.step
    track.samples.append(sample)
    if not track.nonfinite_new and not _bad(sample.loss) and not _bad(sample.grad_norm):
        track.last_good_step = sample.step
    loss = sample.loss
    if loss is not None and math.isfinite(loss):
        track.seen += 1
        track.ema_before = track.loss_ema
        ema = track.loss_ema
        track.loss_ema = loss if math.isnan(ema) else ema + _EMA_ALPHA * (loss - ema)
        # Only an improvement beyond the tolerance counts as progress (see Signal.PLATEAU).
        if math.isnan(track.best_ema) or track.loss_ema < track.best_ema * (1.0 - PLATEAU_TOLERANCE):
            track.best_ema = track.loss_ema
            track.best_step = sample.step
    t = sample.step_time_s
    if t is not None and math.isfinite(t) and t > 0:
        track.step_time_base = t if math.isnan(track.step_time_base) else track.step_time_base
        track.step_time_ema = t if math.isnan(track.step_time_ema) else track.step_time_ema
        track.step_time_ema += _EMA_ALPHA * 5 * (t - track.step_time_ema)
        # The baseline follows a speed-up quickly and a slow-down hardly at all, so a lasting drop
        # stays visible against it.
        rate = 10 * _SLOW_ALPHA if t < track.step_time_base else _SLOW_ALPHA / 10
        track.step_time_base += rate * (t - track.step_time_base)
    return True


def _window(track: Track) -> tuple[tuple[int, float], ...]:
    return tuple((s.step, math.nan if s.loss is None else s.loss) for s in track.samples)


def detect(track: Track, cond: Condition, *, since_step: int = 0) -> Detected | None:
    """Whether `cond` holds after the latest report (pure).

    Args:
        since_step: for `every_steps` and `plateau`, the step the condition last fired at (or 0):
            they hold again only `steps` steps later; for `update_ratio` with `loss_rose`, a
            measurement it fired on before that step does not fire again.
    """
    latest = track.samples[-1] if track.samples else None
    step = latest.step if latest is not None else track.step

    def hit(value: float | None, threshold: float, trouble_step: int | None = None) -> Detected:
        good = track.last_good_step
        return Detected(
            signal=cond.signal,
            step=step,
            branch=track.branch,
            value=math.nan if value is None else value,
            threshold=threshold,
            last_good_step=good if trouble_step is None else min(good, trouble_step),
            window=_window(track),
        )

    sig = cond.signal
    if sig is Signal.NONFINITE:
        return hit(math.nan, 0.0) if track.nonfinite_new else None
    if latest is None:
        return None
    if sig is Signal.UPDATE_RATIO:
        # With `consecutive` > 1 a sustained excess, not one step's: Adam's first steps move every
        # weight by about lr. The trouble began at the first of them: the last good weights are
        # those that optimizer step started from.
        latest_ratios = list(track.update_ratios)[-cond.consecutive :]
        over = len(latest_ratios) == cond.consecutive and all(r > cond.above for _, r, _ in latest_ratios)
        if not cond.loss_rose:
            high = over and track.update_ratio_new
        else:
            # Confirmed by the loss: a report since the measured step (any, until the next
            # measurement; once) whose loss is over that step's. A big step that helps (a small
            # init far from the solution) lowers the loss; a step that wrecks the weights raises it.
            measured_step, _, loss_then = latest_ratios[-1] if latest_ratios else (0, 0.0, math.nan)
            loss = latest.loss
            high = (
                over
                and since_step <= measured_step
                and step > measured_step
                and math.isfinite(loss_then)
                and loss is not None
                and math.isfinite(loss)
                and loss > loss_then
            )
        return hit(track.update_ratio, cond.above, latest_ratios[0][0]) if high else None
    if sig is Signal.EVERY_STEPS:
        due = since_step + cond.steps if since_step else cond.steps
        return hit(float(step), float(due)) if step >= due else None
    warm = track.seen >= _WARMUP
    if sig is Signal.LOSS_SPIKE:
        limit = cond.factor * track.ema_before
        loss = latest.loss
        spiked = warm and _finite(loss) and track.ema_before > 0 and loss is not None and loss > limit
        return hit(loss, limit) if spiked else None
    if sig is Signal.DIVERGENCE:
        limit = cond.factor * track.best_ema
        return hit(track.loss_ema, limit) if warm and track.best_ema > 0 and track.loss_ema > limit else None
    if sig is Signal.PLATEAU:
        start = max(track.best_step, since_step)
        stale = warm and step - start >= cond.steps
        return hit(float(step - start), float(cond.steps)) if stale else None
    if sig is Signal.THROUGHPUT_DROP:
        limit = cond.factor * track.step_time_base
        slow = warm and track.step_time_ema > limit
        return hit(track.step_time_ema, limit) if slow else None
    raise AssertionError(f"unhandled signal {sig}")
