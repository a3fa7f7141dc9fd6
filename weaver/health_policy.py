"""The weaver's pure health decisions: classify each rank from a snapshot and `now`, then turn the
classification into reconfiguration actions, like torchft's `quorum_compute(now, state, opt)`.

Nothing here does I/O. The service feeds `classify` with `RankView`s built from heartbeats, gives the
result to `decide`, carries out the returned actions and stores `snapshot.after(actions, health)` so
the same decision is not issued twice. `classify` is the one computation of a rank's health: status,
`torchloom devices` and the web UI read its result, and health events announce its transitions.

Blame: ranks in a collective stall together. When one rank goes silent (dead, or frozen by SIGSTOP)
or its step stops while its heartbeats go on, its peers block at the same step in their next
collective. `classify` names the stalled rank the cause (dead, hung) with its `waiters`, and the
peers WAITING on it, never hung nor stragglers themselves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from torchloom.messages import DeviceHealth, Heartbeat, RankState
from torchloom.policy import PolicyMode, parse_mode

# A live rank whose current step has lasted this many times its usual step time is stalled; next to a
# stalled peer's step it is waiting on that peer.
WAIT_FACTOR = 1.5

# Four missed 0.2 s heartbeats: a kill -9 is noticed in 0.6-0.9 s (bench/recovery.py), and on a loaded
# 2-core machine no live rank went silent that long (the heartbeat thread does not wait for torch).
DEFAULT_DEAD_AFTER_S = 0.8


class HealthKind(StrEnum):
    """A rank's classification; the order below is the precedence when several apply."""

    DEAD = "dead"  # no heartbeat within dead_after_s
    UNHEALTHY = "unhealthy"  # its device reports unhealthy
    HUNG = "hung"  # heartbeats, but the step has not moved for hung_after_s while running
    WAITING = "waiting"  # stalled at the step of a dead or hung peer: blocked on it, not at fault
    STRAGGLER = "straggler"  # step time above straggler_factor x the job's median
    HEALTHY = "healthy"


class Phase(StrEnum):
    """Where a job's recovery stands; the service moves it back to IDLE when the recovery is done."""

    IDLE = "idle"
    CHECKPOINTING = "checkpointing"  # checkpoint ordered, restart follows once it is written
    RESTARTING = "restarting"
    PAUSED = "paused"
    STOPPING = "stopping"  # the run is ending on its launcher's signal: nothing more is ordered


@dataclass(frozen=True, slots=True, kw_only=True)
class RankView:
    """What the weaver knows of one rank at decision time.

    Attributes:
        rank: global rank.
        last_heartbeat_at: weaver clock (s) when its last heartbeat arrived.
        step: its last reported step.
        last_step_change_at: weaver clock (s) when `step` last changed.
        step_time_s: its last reported step time (0: unknown).
        state: running, paused or finished.
        device: its last device health, if reported.
        stalled_at: weaver clock (s) when it was last found stalled (a cause or waiting; 0: never).
            Its step time includes the stall for a while after, so it is no straggler until then.
        excused_at: weaver clock (s) when it was last found dead or waiting: its step stood still
            for a reason `classify` already reported, so its hung clock starts there, not at its
            last step change (a rank back from SIGSTOP, or done waiting, is not hung at once).
    """

    rank: int
    last_heartbeat_at: float
    step: int = 0
    last_step_change_at: float = 0.0
    step_time_s: float = 0.0
    state: RankState = RankState.RUNNING
    device: DeviceHealth | None = None
    stalled_at: float = 0.0
    excused_at: float = 0.0

    @classmethod
    def from_heartbeat(
        cls,
        hb: Heartbeat,
        *,
        received_at: float,
        last_step_change_at: float,
        stalled_at: float = 0.0,
        excused_at: float = 0.0,
    ) -> RankView:
        """Build the view of `hb`'s rank; the clocks are the weaver's, not the rank's."""
        return cls(
            rank=hb.rank,
            last_heartbeat_at=received_at,
            step=hb.step,
            last_step_change_at=last_step_change_at,
            step_time_s=hb.step_time_s,
            state=hb.state,
            device=hb.device,
            stalled_at=stalled_at,
            excused_at=excused_at,
        )

    def hung_s(self, now: float) -> float:
        """How long its step has stood still with nothing else to explain it (see `excused_at`)."""
        return now - max(self.last_step_change_at, self.excused_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankHealth:
    """The classification of one rank.

    Attributes:
        for_s: how long the condition has lasted (dead: since the last heartbeat; hung, waiting:
            since the last step change; straggler: the step time); 0 when healthy or unhealthy.
        device: the rank's device id (for excluding it from a restart).
        device_healthy: its last device report was healthy (False also for a dead rank whose
            device failed before it went silent, as after XID 79).
        waiting_on: for WAITING, the stalled ranks it waits on.
        waiters: for a stalled rank (dead, hung, or unhealthy and stuck), the peers waiting on it.
        finished: the rank stopped on purpose (HEALTHY, and no longer alive).
    """

    rank: int
    kind: HealthKind
    reason: str = ""
    for_s: float = 0.0
    device: str = ""
    device_healthy: bool = True
    waiting_on: tuple[int, ...] = ()
    waiters: tuple[int, ...] = ()
    finished: bool = False

    @property
    def key(self) -> str:
        """Identity of the condition, for alert dedup: `"hung:3"`."""
        return f"{self.kind}:{self.rank}"

    @property
    def alive(self) -> bool:
        """Heartbeats still come and the rank has not finished (what status calls alive)."""
        return self.kind is not HealthKind.DEAD and not self.finished

    @property
    def stalled(self) -> bool:
        """A cause (others wait on it) or waiting: its step time now includes a stall."""
        return bool(self.waiters or self.waiting_on)


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} rejected: must be a finite number > 0")


def _check_thresholds(
    dead_after_s: float, hung_after_s: float, straggler_factor: float, min_samples: int
) -> None:
    _check_positive("dead_after_s", dead_after_s)
    _check_positive("hung_after_s", hung_after_s)
    if not math.isfinite(straggler_factor) or straggler_factor <= 1:
        raise ValueError(f"straggler_factor={straggler_factor!r} rejected: must be a finite number > 1")
    if min_samples < 1:
        raise ValueError(f"min_samples={min_samples!r} rejected: must be >= 1")


# The conditions that stall peers: a rank in one of them is blamed for the peers waiting on it.
STALLING = frozenset({HealthKind.DEAD, HealthKind.UNHEALTHY, HealthKind.HUNG})


def _waits_on(w: RankView, cause: RankView, silent: bool, dead_after_s: float) -> bool:
    """Whether stalled `w` is blocked by `cause`, stalled too (silent: no heartbeat for dead_after_s).

    Ranks in lockstep stall at the same step, or one apart (a rank counted the step its stalled
    peer never finished). A live cause's heartbeats carry its step as it stands, so that is the
    test. A silent cause's last step is stale: it stepped on for up to a heartbeat interval before
    it froze, so `w` may be several steps past it, but no further than it got by then: `w` stopped
    within `dead_after_s` (or its own stall time) of the cause's last heartbeat, not later.
    """
    if not silent:
        return abs(w.step - cause.step) <= 1
    grace = max(dead_after_s, WAIT_FACTOR * w.step_time_s)
    return w.step >= cause.step - 1 and w.last_step_change_at <= cause.last_heartbeat_at + grace


@dataclass(frozen=True, slots=True)
class _Blame:
    """Who stalls whom: the causes (by rank, with their own kind), the causes of each waiting rank
    and the waiters of each cause. Ranks stalled alike share one tuple (see `_blame`), so a large
    stall costs a tuple per kind of waiter, not per rank."""

    causes: dict[int, HealthKind]
    waiting_on: dict[int, tuple[int, ...]]
    by_cause: dict[int, tuple[int, ...]]

    def waiters(self, rank: int) -> tuple[int, ...]:
        return self.by_cause.get(rank, ())


def is_stalled(v: RankView, now: float) -> bool:
    """Whether running, live `v` stands still: its current step has lasted over `WAIT_FACTOR` times its
    usual step time, and a heartbeat since the step last changed showed it still. The weaver sees a
    step change only when a heartbeat brings it, so with steps shorter than the heartbeat interval a
    healthy rank's step looks still for up to an interval (0.1 s steps, 0.2 s heartbeats: half of
    the ranks at any time); so no rank is stalled before one heartbeat interval without progress."""
    return (
        v.last_heartbeat_at > v.last_step_change_at
        and now - v.last_step_change_at > WAIT_FACTOR * v.step_time_s
    )


class _SilentIndex:
    """The silent ranks by last step, each step's in order of their last heartbeat, for `_waits_on`'s
    test of a silent cause: a stalled rank waits on those at most one step past it (a prefix of the
    steps) whose last heartbeat is late enough (a suffix of each step's ranks), found by bisection,
    so a stalled rank costs O(steps x log silent), not O(silent)."""

    def __init__(self, silent: Sequence[RankView], dead_after_s: float) -> None:
        by_step: dict[int, list[RankView]] = {}
        for v in silent:
            by_step.setdefault(v.step, []).append(v)
        self.steps = sorted(by_step)
        self.ranks = [sorted(by_step[step], key=lambda v: v.last_heartbeat_at) for step in self.steps]
        self.heard = [[v.last_heartbeat_at for v in rs] for rs in self.ranks]
        self.dead_after_s = dead_after_s

    def key(self, w: RankView) -> tuple[int, ...]:
        """Where each step's suffix of silent ranks `w` waits on starts (one entry per step `w` may
        wait on): the ranks it waits on are `ranks_of(key)`, so waiters with one key share them."""
        out = []
        heard_since = w.last_step_change_at - max(self.dead_after_s, WAIT_FACTOR * w.step_time_s)
        for k in range(bisect.bisect_right(self.steps, w.step + 1)):
            ranks, heard = self.ranks[k], self.heard[k]
            i = bisect.bisect_left(heard, heard_since)
            # The float subtraction may put the cut one off the test itself: move it onto the test.
            while i > 0 and _waits_on(w, ranks[i - 1], True, self.dead_after_s):
                i -= 1
            while i < len(ranks) and not _waits_on(w, ranks[i], True, self.dead_after_s):
                i += 1
            out.append(i)
        return tuple(out)

    def ranks_of(self, key: tuple[int, ...]) -> list[int]:
        return [v.rank for k, start in enumerate(key) for v in self.ranks[k][start:]]


def _blame(ranks: Sequence[RankView], now: float, dead_after_s: float, hung_after_s: float) -> _Blame:
    """Find the ranks that stall others, and the live ranks stalled next to them.

    A cause is a silent rank (dead or frozen), or a live rank stuck past `hung_after_s` that is not
    itself next to a silent one and that a stalled peer got one step past (the peer finished the
    step and blocks in the next collective; the cause never finished it). Live ranks stuck at one
    step, all alike, give no cause: nothing tells the rank that hangs from the ranks that wait.
    A stalled rank (`is_stalled`) next to a cause (`_waits_on`) waits on it.

    When many ranks go quiet at once, the silent causes are indexed (`_SilentIndex`) and the live
    causes grouped by step, so each stalled rank is matched in O(log silent); stalled ranks that
    wait on the same causes (in lockstep, nearly all) share one tuple of them, and causes waited on
    by the same ranks one tuple of waiters: no O(stalled x silent) work or memory unless the
    answer itself is that large.
    """
    silent = [
        v for v in ranks if v.state is not RankState.FINISHED and now - v.last_heartbeat_at > dead_after_s
    ]
    live = [v for v in ranks if v.state is RankState.RUNNING and now - v.last_heartbeat_at <= dead_after_s]
    stalled = [v for v in live if is_stalled(v, now)]
    causes = {v.rank: HealthKind.DEAD for v in silent}
    index = _SilentIndex(silent, dead_after_s)
    keys = {v.rank: index.key(v) for v in stalled}
    stalled_steps = {v.step for v in stalled}
    live_causes: dict[int, list[int]] = {}  # step -> live causes at it
    for v in stalled:
        waits_on_silent = any(start < len(index.ranks[k]) for k, start in enumerate(keys[v.rank]))
        if v.hung_s(now) <= hung_after_s or waits_on_silent:
            continue
        if v.step + 1 in stalled_steps:
            sick = v.device is not None and not v.device.healthy
            causes[v.rank] = HealthKind.UNHEALTHY if sick else HealthKind.HUNG
            live_causes.setdefault(v.step, []).append(v.rank)
    # Waiters grouped by what they wait on: the live causes within one step of theirs (keyed by
    # their step when there are any) and the silent ones of their index key.
    groups: dict[tuple[int | None, tuple[int, ...]], list[int]] = {}
    for w in stalled:
        if w.rank not in causes:
            near = w.step if any(s in live_causes for s in (w.step - 1, w.step, w.step + 1)) else None
            groups.setdefault((near, keys[w.rank]), []).append(w.rank)
    waiting_on: dict[int, tuple[int, ...]] = {}
    members: list[tuple[int, ...]] = []  # the groups that wait on something
    waited_by: dict[int, list[int]] = {}  # cause -> indices into `members`
    for (near, key), group in groups.items():
        on_live = (
            [] if near is None else [c for s in (near - 1, near, near + 1) for c in live_causes.get(s, ())]
        )
        on = tuple(sorted([*on_live, *index.ranks_of(key)]))
        if not on:
            continue
        members.append(tuple(sorted(group)))
        for rank in group:
            waiting_on[rank] = on
        for c in on:
            waited_by.setdefault(c, []).append(len(members) - 1)
    merged: dict[tuple[int, ...], tuple[int, ...]] = {}  # one merge per distinct list of groups
    by_cause: dict[int, tuple[int, ...]] = {}
    for c, which in waited_by.items():
        marker = tuple(which)
        if marker not in merged:
            merged[marker] = (
                members[which[0]] if len(which) == 1 else tuple(sorted(r for g in which for r in members[g]))
            )
        by_cause[c] = merged[marker]
    return _Blame(causes=causes, waiting_on=waiting_on, by_cause=by_cause)


def _ranks_text(ranks: Sequence[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"


def classify(
    ranks: Sequence[RankView],
    now: float,
    *,
    dead_after_s: float = 1.0,
    hung_after_s: float = 10.0,
    straggler_factor: float = 2.0,
    min_samples: int = 1,
) -> dict[int, RankHealth]:
    """Classify every rank: dead, unhealthy, hung, waiting, straggler or healthy (in that precedence).

    The one computation of rank health: status (`alive`, `health`), `torchloom devices`, the UI and
    the health events all read it. A finished rank is healthy whatever its heartbeats: it stopped
    on purpose. A paused rank is never hung, waiting nor a straggler. A rank stalled next to a
    stalled peer waits on it (see `_blame`): the peer carries the blame and lists it in `waiters`.
    A straggler's step time is compared with the median of the *other* running, live ranks' step
    times (with itself included, one slow rank of two could never exceed twice the median); a
    rank stalled within the last `hung_after_s` (`RankView.stalled_at`) is neither a straggler nor
    a sample, since its step time still includes the stall.

    Args:
        ranks: one view per rank.
        now: weaver clock (s), the same clock as the views' timestamps.
        dead_after_s: silence after which a rank is dead.
        hung_after_s: time without a step change after which a running rank is hung.
        straggler_factor: step time over this multiple of the peers' median makes a straggler.
        min_samples: peers with a known step time needed before anyone is called a straggler.

    Returns:
        The classification by rank.

    Raises:
        ValueError: a threshold is out of range, or a rank appears twice.
    """
    _check_thresholds(dead_after_s, hung_after_s, straggler_factor, min_samples)
    seen = [v.rank for v in ranks]
    if len(set(seen)) != len(seen):
        raise ValueError(f"ranks {sorted(seen)} rejected: each rank must appear once")
    blame = _blame(ranks, now, dead_after_s, hung_after_s)
    settling = {v.rank for v in ranks if v.rank in blame.causes or v.rank in blame.waiting_on}
    settling |= {v.rank for v in ranks if v.stalled_at > 0 and now - v.stalled_at <= hung_after_s}
    timed = {
        v.rank: v.step_time_s
        for v in ranks
        if v.state is RankState.RUNNING
        and v.step_time_s > 0
        and now - v.last_heartbeat_at <= dead_after_s
        and v.rank not in settling
    }
    # Sorted once: each rank's peer median is this list without its own value, found by bisection,
    # so a tick costs O(n log n) rather than a sort of n-1 peers for each of n ranks (at 3,000 ranks
    # that sort was most of the weaver's CPU; bench/weaver_scale.py).
    ordered = sorted(timed.values())

    def peer_median(rank: int) -> float:
        own = timed.get(rank)
        n = len(ordered) - (own is not None)
        if n < min_samples or n == 0:
            return 0.0
        skip = bisect.bisect_left(ordered, own) if own is not None else n

        def at(k: int) -> float:
            return ordered[k if k < skip else k + 1]

        return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2

    # Texts of the rank tuples the blame shares among ranks stalled alike (by identity: the blame
    # holds them), made once per tuple rather than once per rank.
    on_texts: dict[int, str] = {}
    waiters_texts: dict[int, str] = {}

    def waited_text(on: tuple[int, ...]) -> str:
        text = on_texts.get(id(on))
        if text is None:
            kinds = "/".join(sorted({blame.causes[c].value for c in on}))
            text = on_texts[id(on)] = f"{_ranks_text(on)} ({kinds})"
        return text

    def waiters_text(waiters: tuple[int, ...]) -> str:
        text = waiters_texts.get(id(waiters))
        if text is None:
            text = waiters_texts[id(waiters)] = f"; {_ranks_text(waiters)} waiting on it"
        return text

    def condition(v: RankView) -> tuple[HealthKind, str, float]:
        silent_s = now - v.last_heartbeat_at
        stuck_s = now - v.last_step_change_at
        if v.state is RankState.FINISHED:
            return HealthKind.HEALTHY, "finished", 0.0
        if silent_s > dead_after_s:
            last = ""
            if v.device is not None and not v.device.healthy:
                last = f"; its device last reported: {v.device.unhealthy_reason or 'unhealthy'}"
            return (
                HealthKind.DEAD,
                f"no heartbeat for {silent_s:.1f} s (limit {dead_after_s:g} s){last}",
                silent_s,
            )
        if v.device is not None and not v.device.healthy:
            what = v.device.unhealthy_reason or "device reports unhealthy"
            return HealthKind.UNHEALTHY, f"{v.device.device or 'device'}: {what}", 0.0
        if v.rank in blame.waiting_on:
            on = blame.waiting_on[v.rank]
            return HealthKind.WAITING, f"step {v.step} waiting {stuck_s:.1f} s on {waited_text(on)}", stuck_s
        if v.state is RankState.RUNNING and v.hung_s(now) > hung_after_s:
            return (
                HealthKind.HUNG,
                f"step {v.step} unchanged for {v.hung_s(now):.1f} s (limit {hung_after_s:g} s)",
                v.hung_s(now),
            )
        median = peer_median(v.rank)
        if v.rank in timed and median > 0 and timed[v.rank] > straggler_factor * median:
            mine = timed[v.rank]
            return (
                HealthKind.STRAGGLER,
                f"step time {mine:.3g} s is {mine / median:.1f}x the median {median:.3g} s of the other "
                f"ranks (limit {straggler_factor:g}x)",
                mine,
            )
        return HealthKind.HEALTHY, "", 0.0

    out: dict[int, RankHealth] = {}
    for v in ranks:
        kind, reason, for_s = condition(v)
        waiters = blame.waiters(v.rank) if kind in STALLING else ()
        if waiters:
            reason += waiters_text(waiters)
        out[v.rank] = RankHealth(
            rank=v.rank,
            kind=kind,
            reason=reason,
            for_s=for_s,
            device=v.device.device if v.device is not None else "",
            device_healthy=v.device is None or v.device.healthy,
            waiting_on=blame.waiting_on[v.rank] if kind is HealthKind.WAITING else (),
            waiters=waiters,
            finished=v.state is RankState.FINISHED,
        )
    return out


# ---- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPolicy:
    """How the weaver reacts to rank health.

    Attributes:
        mode: "reconfigure" (checkpoint, restart, rescale), "pause" (pause and alert) or "alert".
        dead_after_s, hung_after_s, straggler_factor, min_samples: `classify` thresholds.
        hung_restart_after_s: under "reconfigure", a rank hung this long (since its last step
            change) gets the job restarted; before that it only raises an alert.
    """

    mode: PolicyMode = PolicyMode.RECONFIGURE
    dead_after_s: float = DEFAULT_DEAD_AFTER_S
    hung_after_s: float = 10.0
    straggler_factor: float = 2.0
    min_samples: int = 1
    hung_restart_after_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode, name="mode"))
        _check_thresholds(self.dead_after_s, self.hung_after_s, self.straggler_factor, self.min_samples)
        _check_positive("hung_restart_after_s", self.hung_restart_after_s)
        if self.hung_restart_after_s < self.hung_after_s:
            raise ValueError(
                f"hung_restart_after_s={self.hung_restart_after_s:g} rejected: must be >= "
                f"hung_after_s={self.hung_after_s:g} (a rank is hung before it is restarted)"
            )

    def classify(self, ranks: Sequence[RankView], now: float) -> dict[int, RankHealth]:
        """`classify` with this policy's thresholds."""
        return classify(
            ranks,
            now,
            dead_after_s=self.dead_after_s,
            hung_after_s=self.hung_after_s,
            straggler_factor=self.straggler_factor,
            min_samples=self.min_samples,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSnapshot:
    """The job-level facts a decision needs, plus the recovery state that makes decisions idempotent.

    Attributes:
        job: job name.
        world_size: current number of ranks.
        step: the job's current step (the highest reported).
        latest_checkpoint_step: step of the newest complete checkpoint, None when there is none.
        grad_accum_steps: gradient accumulation steps per optimizer step (kept global batch = this
            x world size x micro batch).
        hot_spares: declared spare devices (ids) a restart may use instead of shrinking.
        phase: where a recovery stands; a recovery in progress is not re-issued.
        alerted: keys (`RankHealth.key`) of conditions already alerted.
    """

    job: str
    world_size: int
    step: int = 0
    latest_checkpoint_step: int | None = None
    grad_accum_steps: int = 1
    hot_spares: tuple[str, ...] = ()
    phase: Phase = Phase.IDLE
    alerted: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} rejected: must be >= 1")
        if self.step < 0:
            raise ValueError(f"step={self.step} rejected: must be >= 0")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} rejected: must be >= 1")
        ckpt = self.latest_checkpoint_step
        if ckpt is not None and not 0 <= ckpt <= self.step:
            raise ValueError(f"latest_checkpoint_step={ckpt} rejected: must be in [0, step={self.step}]")

    def after(self, actions: Sequence[Action], health: Mapping[int, RankHealth]) -> JobSnapshot:
        """The snapshot once `actions` are under way: new phase, alerted conditions remembered.

        Conditions that cleared are forgotten, so they alert again if they come back.
        """
        phase = self.phase
        if any(isinstance(a, CheckpointAt) for a in actions):
            phase = Phase.CHECKPOINTING
        elif any(isinstance(a, Restart) for a in actions):
            phase = Phase.RESTARTING
        elif any(isinstance(a, PauseJob) for a in actions):
            phase = Phase.PAUSED
        current = {h.key for h in health.values() if h.kind is not HealthKind.HEALTHY}
        # Job-level alerts ("no_healthy_device") have no rank condition: they clear with the last one.
        kept = {k for k in self.alerted if k in current or (current and not _is_rank_key(k))}
        raised = {a.key for a in actions if isinstance(a, Alert)}
        return replace(self, phase=phase, alerted=frozenset(kept | raised))


def _is_rank_key(key: str) -> bool:
    kind, _, rank = key.partition(":")
    return kind in {k.value for k in HealthKind} and rank.isdigit()


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """Tell the humans. `key` names the condition (`"dead:2"`); severity is "warning" or "critical"."""

    key: str
    severity: str
    message: str
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointAt:
    """Checkpoint the whole job at `step` (the next step boundary)."""

    step: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Restart:
    """Restart the rank group.

    Attributes:
        world_size: ranks after the restart.
        from_step: checkpoint step to resume from (None: no checkpoint, start from scratch).
        exclude_devices: devices not to use again.
        spares: hot spares taking their place.
        steps_lost: training steps redone (current step - checkpoint step).
    """

    world_size: int
    from_step: int | None
    exclude_devices: tuple[str, ...] = ()
    spares: tuple[str, ...] = ()
    steps_lost: int = 0
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetGradAccum:
    """Set `grad_accum_steps` on restart so the global batch stays the same."""

    old: int
    new: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseJob:
    """Pause every rank at the next step boundary."""

    reason: str


Action = Alert | CheckpointAt | Restart | SetGradAccum | PauseJob


def _ranks(health: Mapping[int, RankHealth], kind: HealthKind) -> list[RankHealth]:
    return sorted((h for h in health.values() if h.kind is kind), key=lambda h: h.rank)


def _restart(snap: JobSnapshot, bad: Sequence[RankHealth], from_step: int | None, why: str) -> list[Action]:
    """Plan a restart without `bad` ranks' devices: hot spares first, else shrink and rescale."""
    excluded = tuple(sorted({h.device for h in bad if h.device}))
    lost = max(snap.step - from_step, 0) if from_step is not None else snap.step
    if len(snap.hot_spares) >= len(bad):
        spares = snap.hot_spares[: len(bad)]
        plan = f"; hot spare(s) {', '.join(spares)} replace {', '.join(excluded)}" if bad else ""
        return [
            Restart(
                world_size=snap.world_size,
                from_step=from_step,
                exclude_devices=excluded,
                spares=spares,
                steps_lost=lost,
                reason=why + plan,
            )
        ]
    new_world = snap.world_size - len(bad)
    if new_world < 1:
        return [
            Alert(
                key="no_healthy_device",
                severity="critical",
                message=f"{why}; no healthy device left to restart on",
            )
        ]
    old, total = snap.grad_accum_steps, snap.grad_accum_steps * snap.world_size
    actions: list[Action] = []
    if total % new_world:
        note = (
            f"grad_accum_steps={old} cannot keep the global batch: {total} micro-batches "
            f"({old} x {snap.world_size} ranks) do not divide among {new_world} ranks, "
            "so the global batch changes"
        )
        actions.append(Alert(key=f"grad_accum:{new_world}", severity="warning", message=note))
        plan = f"; world {snap.world_size} -> {new_world}; {note}"
    else:
        new = total // new_world
        plan = f"; world {snap.world_size} -> {new_world}, grad_accum_steps {old} -> {new}"
        actions.append(
            SetGradAccum(
                old=old,
                new=new,
                reason=(
                    f"keep the global batch of {total} micro-batches on {new_world} ranks "
                    f"instead of {snap.world_size}"
                ),
            )
        )
    restart = Restart(
        world_size=new_world,
        from_step=from_step,
        exclude_devices=excluded,
        steps_lost=lost,
        reason=why + plan,
    )
    return [restart, *actions]


def decide(
    job_snapshot: JobSnapshot, health: Mapping[int, RankHealth], policy: HealthPolicy | str
) -> list[Action]:
    """Turn the rank classification into actions under `policy`.

    Decision table ("reconfigure"):
      * a dead rank, or a rank hung past `hung_restart_after_s`: restart the group from the latest
        checkpoint (steps lost = current step - checkpoint step), leaving out unhealthy devices;
      * an unhealthy device while every rank is alive: checkpoint at the next step, restart on the
        healthy devices (hot spares first, else world = healthy count) and rescale
        grad_accum_steps by old_world / new_world when that divides (else the alert says so);
      * hung (not yet past the grace period) or straggler: alert only.
    "pause": pause and alert for dead, unhealthy and hung; alert for stragglers. "alert": alert only.

    Idempotent: while a checkpoint or restart is under way (`phase`) nothing new is ordered, a
    paused job is not paused again, and a condition in `alerted` is not alerted again. A stopping
    run (`Phase.STOPPING`: its launcher got SIGTERM/SIGINT) gets nothing at all, not even alerts:
    its ranks going away is the stop, not a fault.

    Args:
        job_snapshot: job facts and recovery state.
        health: `classify`'s result.
        policy: a `HealthPolicy` or just its mode name.

    Returns:
        Actions in the order to carry them out: condition alerts first, then the recovery.
    """
    pol = policy if isinstance(policy, HealthPolicy) else HealthPolicy(mode=parse_mode(policy, name="policy"))
    actions = _decide(job_snapshot, health, pol)
    return [a for a in actions if not (isinstance(a, Alert) and a.key in job_snapshot.alerted)]


def _decide(snap: JobSnapshot, health: Mapping[int, RankHealth], pol: HealthPolicy) -> list[Action]:
    if snap.phase in (Phase.CHECKPOINTING, Phase.RESTARTING, Phase.STOPPING):
        return []
    dead = _ranks(health, HealthKind.DEAD)
    unhealthy = _ranks(health, HealthKind.UNHEALTHY)
    hung = _ranks(health, HealthKind.HUNG)
    stragglers = _ranks(health, HealthKind.STRAGGLER)

    alerts: list[Action] = [
        Alert(
            key=h.key,
            severity="warning" if h.kind is HealthKind.STRAGGLER else "critical",
            message=f"rank {h.rank} {h.kind}: {h.reason}",
            ranks=(h.rank,),
        )
        for h in [*dead, *unhealthy, *hung, *stragglers]
    ]

    serious = [*dead, *unhealthy, *hung]
    if pol.mode is PolicyMode.ALERT or not serious:
        return alerts
    if pol.mode is PolicyMode.PAUSE:
        if snap.phase is Phase.PAUSED:
            return alerts
        return [*alerts, PauseJob(reason="; ".join(f"rank {h.rank} {h.kind}" for h in serious))]

    overdue = [h for h in hung if h.for_s >= pol.hung_restart_after_s]
    if dead or overdue:
        ckpt = snap.latest_checkpoint_step
        since = f"checkpoint at step {ckpt}" if ckpt is not None else "scratch (no checkpoint)"
        why = (
            ", ".join(f"rank {h.rank} {h.kind}" for h in [*dead, *overdue])
            + f": restart from {since}, {snap.step - (ckpt or 0)} steps lost"
        )
        # A rank that died right after its device failed (XID 79) must not get that device back.
        bad = sorted([*unhealthy, *(h for h in dead if not h.device_healthy)], key=lambda h: h.rank)
        return [*alerts, *_restart(snap, bad, ckpt, why)]
    if unhealthy:
        nxt = snap.step + 1
        why = ", ".join(h.reason for h in unhealthy)
        actions = _restart(snap, unhealthy, nxt, f"unhealthy device: {why}")
        if any(isinstance(a, Restart) for a in actions):
            # Every rank is alive, so state is saved at the next boundary and no step is lost.
            actions.insert(0, CheckpointAt(step=nxt, reason=f"save state before leaving: {why}"))
        return [*alerts, *actions]
    return alerts  # hung within its grace period
