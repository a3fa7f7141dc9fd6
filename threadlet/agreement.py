"""The step agreement: which filed commands every rank decides at a step boundary.

A round is offer -> collective -> verdict. Each rank offers `(ready, refused_first)` plus its round
proposals (`Offer`); an `AgreementTransport` combines the offers of all ranks by an element-wise
MIN (today `GlooTransport`, an async all-reduce over a dedicated gloo group); the pure `decide` turns
the agreed round into the same ordered verdicts on every rank (docs/design.md, "Commands"). The
`Agreement` component keeps the inbox of filed commands and schedules rounds in ticks. With DDP, a
`Piggyback` (threadlet/ddp_hook.py) carries a round in every synchronized backward instead, and the
gloo rounds remain for what has no backward: a pause, or a loop that stopped backpropagating.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import torch
import torch.distributed as dist

from threadlet.config import ThreadletConfig
from threadlet.state import Filed, TrainingState
from torchloom.messages import Command

log = logging.getLogger("threadlet")

# "This rank refuses nothing": the identity of MIN for an int64 all-reduce.
NONE_REFUSED = 2**63 - 1


class Verdict(StrEnum):
    APPLY = "apply"
    REJECT_SELF = "reject_self"  # this rank refused it
    REJECT_OTHER = "reject_other"  # another rank refused it


Batch = Sequence[tuple[Filed, Verdict]]
_NOTHING: Batch = ()


def local_offer(last_decided: int, refusals: Mapping[int, bool]) -> tuple[int, int]:
    """This rank's contribution to a round.

    Args:
        last_decided: the highest seq already decided (the same on every rank).
        refusals: seq to "this rank refuses it", for every command filed and not yet decided.

    Returns:
        `(ready, refused_first)`: the highest seq such that every seq in (last_decided, ready] is
        filed, and the first of those this rank refuses (NONE_REFUSED when none).
    """
    ready = last_decided
    refused_first = NONE_REFUSED
    while (ready + 1) in refusals:
        ready += 1
        if refusals[ready] and refused_first == NONE_REFUSED:
            refused_first = ready
    return ready, refused_first


def decide(
    last_decided: int, ready: int, refused_first: int, agreed_ready: int, agreed_refused: int
) -> list[tuple[int, Verdict]]:
    """Turn an agreed round into this rank's verdicts, in seq order.

    Every rank gets the same seqs with the same apply/reject outcome: commands up to the agreed
    ready seq are decided; the agreed refused one is rejected everywhere and those after it wait
    for the next round.

    Args:
        last_decided: highest seq decided before this round (equal on every rank).
        ready: this rank's `ready` offered in the round.
        refused_first: this rank's `refused_first` offered in the round.
        agreed_ready: MIN of `ready` over ranks.
        agreed_refused: MIN of `refused_first` over ranks.

    Returns:
        `(seq, verdict)` pairs for seq = last_decided + 1, ... in order.

    Raises:
        ValueError: when the agreed values cannot come from a MIN over this rank's offer.
    """
    if not (last_decided <= agreed_ready <= ready):
        raise ValueError(
            f"agreed_ready={agreed_ready} impossible: expected last_decided={last_decided} "
            f"<= agreed_ready <= ready={ready}"
        )
    if agreed_refused > refused_first or agreed_refused <= last_decided:
        raise ValueError(
            f"agreed_refused={agreed_refused} impossible: expected last_decided={last_decided} "
            f"< agreed_refused <= refused_first={refused_first}"
        )
    out: list[tuple[int, Verdict]] = []
    for seq in range(last_decided + 1, agreed_ready + 1):
        if seq < agreed_refused:
            out.append((seq, Verdict.APPLY))
            continue
        out.append((seq, Verdict.REJECT_SELF if seq == refused_first else Verdict.REJECT_OTHER))
        break
    return out


@dataclass(frozen=True, slots=True)
class Offer:
    """One rank's part of a round, and (combined over ranks) the agreed round.

    Combining takes the MIN of `ready` and `refused_first`, whether any rank is `busy`, and the MAX
    of `spacing` and `lag`; `encode` maps it to int64s whose element-wise MIN is exactly that.

    Attributes:
        ready, refused_first: as `local_offer` returns them.
        busy: this rank has commands filed and not decided (the next round follows at once).
        spacing: ticks between an idle job's rounds this rank proposes.
        lag: ticks a round may run beside training before it is read.
    """

    ready: int
    refused_first: int
    busy: bool
    spacing: int
    lag: int


OFFER_WIDTH = 5  # int64s per encoded offer


def encode(offer: Offer) -> tuple[int, int, int, int, int]:
    """The offer as int64s to combine by element-wise MIN (MAX fields negated)."""
    return (offer.ready, offer.refused_first, -1 if offer.busy else 0, -offer.spacing, -offer.lag)


def decode(values: Sequence[int]) -> Offer:
    """The agreed round from the element-wise MIN of every rank's `encode`.

    Raises:
        ValueError: not OFFER_WIDTH values.
    """
    if len(values) != OFFER_WIDTH:
        raise ValueError(f"agreement round of {len(values)} values rejected: expected {OFFER_WIDTH}")
    ready, refused, busy, neg_spacing, neg_lag = (int(v) for v in values)
    return Offer(ready, refused, busy < 0, -neg_spacing, -neg_lag)


class AgreementTransport(Protocol):
    """The collective of a round: `start` hands over this rank's offer (every rank starts the same
    rounds in the same order) and returns at once; `finish` blocks until the round is complete and
    returns the agreed offer. A round started is always finished before the next starts."""

    def start(self, offer: Offer) -> None: ...

    def finish(self) -> Offer: ...


class GlooTransport:
    """Rounds as an asynchronous MIN all-reduce of the encoded offer over a dedicated gloo group,
    running beside the training step until the round is read.

    Args:
        group: the process group every rank created for the agreement.
    """

    def __init__(self, group: Any) -> None:
        self._group = group
        self._buf: torch.Tensor | None = None
        self._work: Any = None

    def start(self, offer: Offer) -> None:
        assert self._work is None, "a round is already in flight"
        self._buf = torch.tensor(encode(offer), dtype=torch.int64)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MIN, group=self._group, async_op=True)

    def finish(self) -> Offer:
        work, buf = self._work, self._buf
        assert work is not None and buf is not None, "finish() without a round in flight"
        self._work = None
        work.wait()
        return decode(buf.tolist())


# This rank's `(ready, refused_first)` now (`local_offer` over the inbox), asked by a piggybacked
# round when the backward carries it.
OfferNow = Callable[[], tuple[int, int]]


class Piggyback(Protocol):
    """Rounds carried by the training's own collective (DDP's gradient all-reduce): `start` stages
    a round at a boundary, and the next synchronized backward asks `offer` for this rank's offer as
    it carries the round (so a command filed during the forward still rides this step); `done` says
    at each later boundary whether a backward carried it (the same answer on every rank), `offered`
    the `(ready, refused_first)` it carried (clamped to what a round can decide), `finish` the
    agreed one; `cancel` drops a round unread."""

    def start(self, last_decided: int, offer: OfferNow) -> None: ...

    def done(self) -> bool: ...

    def offered(self) -> tuple[int, int]: ...

    def finish(self) -> tuple[int, int]: ...

    def cancel(self) -> None: ...


# Boundaries a piggybacked round waits for a synchronized backward before a gloo round replaces it
# (a loop that calls step() per micro-batch under no_sync, or stopped backpropagating through DDP).
PIGGYBACK_PATIENCE_TICKS = 64

Prepare = Callable[[Command, float], Filed]

# The round in flight rides the backward (its offer is the transport's, made as it is carried).
_PIGGYBACKED = Offer(0, NONE_REFUSED, False, 1, 1)


class Agreement:
    """The inbox of filed commands and the rounds that decide them, in step with every other rank.

    `file` runs on the bus thread; everything else on the training thread. At each boundary the
    front calls `read_round` (verdicts of the round due now, to carry out) and then `start_round`
    (the next round, when due), so the offer reflects what was just carried out.

    Args:
        config: round scheduling (idle_round_period_s, round_budget_s and their bounds).
        state: the rank's training state (tick, paused, last_decided, step_time_s); read only.
        prepare: this rank's local check of a received command (thread-safe; no training state).
        transport: the collective of a round; None when this rank is alone: it agrees with itself
            and decides at the boundary after filing, without rounds.
        piggyback: rounds carried by DDP's backward (`use_piggyback` connects one later); while
            connected, every running step offers a round there and `transport` serves pauses.
    """

    def __init__(
        self,
        config: ThreadletConfig,
        state: TrainingState,
        *,
        prepare: Prepare,
        transport: AgreementTransport | None,
        piggyback: Piggyback | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._prepare = prepare
        self._transport = transport
        self._lock = threading.Lock()
        self.inbox: dict[int, Filed] = {}  # seq -> filed, not yet decided; guarded by _lock
        self._offered: Offer | None = None  # this rank's offer of the round in flight
        # Round scheduling counts ticks, not steps: a rollback rewinds steps on every rank alike,
        # but a round in flight must still be read a fixed number of boundaries later.
        self._next_round_tick = 0
        self._due_tick = 0
        self._lag = 1  # agreed in each round; the first round is read at the next boundary
        self.rounds = 0  # rounds started (a cost/latency statistic)
        self._piggyback = piggyback
        self._via_piggyback = False  # the round in flight rides the backward
        self._piggyback_tick = 0  # when it was staged
        self._gloo_next = False  # a piggybacked round timed out: the next round is a gloo one
        self._offer_now: OfferNow = self._local_offer  # bound once: staging a round allocates nothing

    def use_piggyback(self, piggyback: Piggyback) -> None:
        """Carry rounds in DDP's backward from the next round on (every rank calls it at the same
        boundary, so every rank switches at the same round)."""
        self._piggyback = piggyback

    # ---- bus thread -----------------------------------------------------------------------------

    def file(self, cmd: Command, received_at_s: float) -> None:
        """Check a received command locally and file it; duplicates and decided seqs are dropped."""
        if cmd.seq <= self._state.last_decided:
            return
        with self._lock:
            if cmd.seq in self.inbox:
                return
        filed = self._prepare(cmd, received_at_s)
        with self._lock:
            if cmd.seq > self._state.last_decided:
                self.inbox.setdefault(cmd.seq, filed)

    # ---- training thread ------------------------------------------------------------------------

    def read_round(self) -> Batch:
        """The commands decided at this boundary with their verdicts, in seq order, taken out of
        the inbox. Waits for the round in flight only when it is due (almost always complete)."""
        st = self._state
        if self._via_piggyback:
            return self._read_piggyback()
        if self._transport is None:
            if not self.inbox:  # the common case costs no lock
                return _NOTHING
            ready, refused = self._local_offer()
            if ready <= st.last_decided:
                return _NOTHING
            return self._take(decide(st.last_decided, ready, refused, ready, refused))
        # A round started at boundary k is read at boundary k + lag (at once while paused), so the
        # collective has `lag` whole steps to finish and the wait is almost always free. Start tick,
        # lag and pause state are agreed, so every rank reads every round at the same boundary.
        offered = self._offered
        if offered is None or not (st.paused or st.tick >= self._due_tick):
            return _NOTHING
        self._offered = None
        agreed = self._transport.finish()
        self._lag = agreed.lag
        # Some rank had commands filed: the next round at once until all are decided. Otherwise
        # it waits the agreed spacing (the largest any rank proposed).
        self._next_round_tick = st.tick + (agreed.spacing if not agreed.busy else 0)
        if agreed.ready <= st.last_decided:
            return _NOTHING
        return self._take(
            decide(st.last_decided, offered.ready, offered.refused_first, agreed.ready, agreed.refused_first)
        )

    def _read_piggyback(self) -> Batch:
        st, piggyback = self._state, self._piggyback
        assert piggyback is not None
        if not piggyback.done():
            # A pause has no backward, nor does a loop that stopped calling it: after the agreed
            # patience, on every rank at the same boundary, a gloo round takes over.
            if st.paused or st.tick - self._piggyback_tick >= PIGGYBACK_PATIENCE_TICKS:
                piggyback.cancel()
                self._offered, self._via_piggyback = None, False
                self._gloo_next, self._next_round_tick = True, st.tick
            return _NOTHING
        self._offered, self._via_piggyback = None, False
        ready, refused_first = piggyback.offered()
        if ready <= st.last_decided:
            # This rank offered nothing new: the MIN is nothing new either; no need to read it.
            piggyback.cancel()
            return _NOTHING
        agreed_ready, agreed_refused = piggyback.finish()
        if agreed_ready <= st.last_decided:
            return _NOTHING
        return self._take(decide(st.last_decided, ready, refused_first, agreed_ready, agreed_refused))

    def start_round(self) -> None:
        """Offer this rank's filed commands in a new round when one is due."""
        st = self._state
        if self._offered is not None:
            return
        piggyback = self._piggyback
        if piggyback is not None and not st.paused and not self._gloo_next:
            # Every synchronized backward carries a round; it asks for the offer as it carries it.
            piggyback.start(st.last_decided, self._offer_now)
            self._offered = _PIGGYBACKED
            self._via_piggyback, self._piggyback_tick = True, st.tick
            self.rounds += 1
            return
        self._gloo_next = False
        if self._transport is None:
            return
        # A round costs the step some CPU and wake-ups (it runs beside the training step), so an
        # idle job spaces rounds about idle_round_period_s apart.
        if not (st.paused or st.tick >= self._next_round_tick):
            return
        ready, refused = self._local_offer()
        spacing, lag = self._proposals()
        offer = Offer(ready, refused, bool(self.inbox), spacing, lag)
        self._transport.start(offer)
        self._offered = offer
        self._due_tick = st.tick + self._lag
        self.rounds += 1

    def close(self) -> None:
        """Finish the round in flight (every rank started the same rounds: the group ends quiescent)."""
        if self._offered is None:
            return
        if self._via_piggyback:
            assert self._piggyback is not None
            self._offered, self._via_piggyback = None, False
            self._piggyback.cancel()
            return
        if self._transport is None:
            return
        self._offered = None
        try:
            self._transport.finish()
        except Exception as exc:
            log.warning("threadlet: last agreement round failed: %s", exc)

    def _local_offer(self) -> tuple[int, int]:
        if not self.inbox:
            return self._state.last_decided, NONE_REFUSED
        with self._lock:
            refusals = {seq: f.refusal is not None for seq, f in self.inbox.items()}
        return local_offer(self._state.last_decided, refusals)

    def _take(self, verdicts: list[tuple[int, Verdict]]) -> Batch:
        with self._lock:
            return [(self.inbox.pop(seq), verdict) for seq, verdict in verdicts]

    def _proposals(self) -> tuple[int, int]:
        """This rank's proposals, in steps at its step time: the idle spacing between rounds
        (idle_round_period_s) and the lag of a round (round_budget_s, at least one step)."""
        cfg = self._config
        step_s = self._state.step_time_s
        if step_s <= 0:
            return 1, 1
        spacing = max(1, min(cfg.max_idle_round_steps, int(cfg.idle_round_period_s / step_s)))
        lag = max(1, min(cfg.max_round_lag_steps, math.ceil(cfg.round_budget_s / step_s)))
        return spacing, lag
