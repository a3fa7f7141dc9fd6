"""Rounds carried by DDP's backward, without processes: the thermometer code whose SUM over ranks
decodes to the MIN of their offers, and `Agreement`s of several ranks over an in-process stand-in
for the gradient all-reduce that skips the no_sync micro-steps and stops during a pause (where the
gloo rounds take over)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import set_config
from tests.unit.test_threadlet_agreement import _Collective, _refusing
from threadlet.agreement import NONE_REFUSED, PIGGYBACK_PATIENCE_TICKS, Agreement, OfferNow, Verdict
from threadlet.config import ThreadletConfig
from threadlet.ddp_hook import (
    WIDTH,
    WINDOW,
    PiggybackTransport,
    clamp,
    decode_counts,
    encode_counts,
    exact_ranks,
)
from threadlet.state import TrainingState

offers = st.tuples(st.integers(0, 40), st.one_of(st.just(NONE_REFUSED), st.integers(1, 40)))


@given(st.integers(0, 1000), st.lists(offers, min_size=1, max_size=6))
def test_summed_codes_decode_to_the_min_of_the_clamped_offers(
    last: int, ranks: list[tuple[int, int]]
) -> None:
    clamped = []
    total = torch.zeros(WIDTH, dtype=torch.float32)  # the gradient dtype carries the counts
    for d, refused in ranks:
        ready, refused_first = clamp(
            last + d, NONE_REFUSED if refused == NONE_REFUSED else last + refused, last
        )
        assert ready - last <= WINDOW and (refused_first == NONE_REFUSED or refused_first <= ready)
        clamped.append((ready, refused_first))
        code = torch.empty(WIDTH, dtype=torch.float64)
        encode_counts(ready, refused_first, last, code)
        total += code.to(torch.float32)
    agreed = decode_counts(total.tolist(), len(ranks), last)
    assert agreed == (min(r for r, _ in clamped), min(f for _, f in clamped))


def test_decode_counts_rejects_impossible_sums() -> None:
    with pytest.raises(ValueError, match=f"expected {WIDTH}"):
        decode_counts([0.0], 2, 0)
    with pytest.raises(ValueError, match=r"expected counts in \[0, 2\]"):
        decode_counts([3.0] * WIDTH, 2, 0)


def test_exact_ranks_per_dtype() -> None:
    assert exact_ranks(torch.float32) == 2**24
    assert exact_ranks(torch.bfloat16) == 256
    assert exact_ranks(torch.int64) == 0


class _Backward:
    """An in-process stand-in for DDP's synchronized backward: every rank's code, made as the
    backward carries it, summed."""

    def __init__(self, ranks: int) -> None:
        self.members = [_Rider(ranks) for _ in range(ranks)]

    def run(self) -> None:
        total = torch.zeros(WIDTH, dtype=torch.float32)
        for m in self.members:
            total += m.ride().to(torch.float32)
        for m in self.members:
            m.carried(total)


class _Rider:
    """One rank's Piggyback over a `_Backward`: the same contract as ddp_hook.PiggybackTransport."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.code = torch.zeros(WIDTH, dtype=torch.float64)
        self.staged = False
        self.fired = False
        self.sums: list[float] = []
        self.last = 0
        self.offer: OfferNow | None = None
        self.carried_offer = (0, NONE_REFUSED)

    def start(self, last_decided: int, offer: OfferNow) -> None:
        self.staged, self.fired, self.last, self.offer = True, False, last_decided, offer

    def ride(self) -> torch.Tensor:
        self.code.zero_()
        if self.staged:
            assert self.offer is not None
            ready, refused_first = clamp(*self.offer(), self.last)
            encode_counts(ready, refused_first, self.last, self.code)
            self.carried_offer = (ready, refused_first)
        return self.code

    def carried(self, total: torch.Tensor) -> None:
        if self.staged:
            self.fired, self.sums = True, total.tolist()

    def done(self) -> bool:
        return self.fired

    def offered(self) -> tuple[int, int]:
        return self.carried_offer

    def finish(self) -> tuple[int, int]:
        self.staged = self.fired = False
        return decode_counts(self.sums, self.world, self.last)

    def cancel(self) -> None:
        self.staged = self.fired = False
        self.code.zero_()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 30),
    st.integers(1, 4),
    st.data(),
)
def test_piggybacked_agreements_decide_alike(
    ranks: int, commands: int, accum: int, data: st.DataObject
) -> None:
    """Ranks file commands at different ticks; the backward runs every `accum`-th boundary (a loop
    calling step() per micro-batch), a pause stops it (gloo rounds meanwhile): every rank decides
    each command once, in order, at the same tick with the same verdict."""
    arrival = [[data.draw(st.integers(1, 60)) for _ in range(commands)] for _ in range(ranks)]
    refuses = [data.draw(st.sets(st.integers(1, max(commands, 1)), max_size=3)) for _ in range(ranks)]
    paused_from = data.draw(st.integers(1, 100))
    cfg = ThreadletConfig(max_idle_round_steps=8)
    gloo = _Collective(ranks)
    backward = _Backward(ranks)
    states = [TrainingState(step_time_s=0.001) for _ in range(ranks)]
    members = [
        Agreement(
            cfg, states[r], prepare=_refusing(refuses[r]), transport=gloo.transport(),
            piggyback=backward.members[r],
        )
        for r in range(ranks)
    ]  # fmt: skip
    decided: list[list[tuple[int, int, Verdict]]] = [[] for _ in range(ranks)]
    for tick in range(1, 260):
        paused = paused_from <= tick < paused_from + 6
        if not paused and tick % accum == 0:
            backward.run()
        for r in range(ranks):
            st_r = states[r]
            st_r.tick, st_r.paused = tick, paused
            for seq in range(1, commands + 1):
                if arrival[r][seq - 1] == tick:
                    members[r].file(set_config(seq, lr=0.1), 0.0)
            for filed, verdict in members[r].read_round():
                st_r.last_decided = filed.command.seq
                decided[r].append((tick, filed.command.seq, verdict))
            members[r].start_round()
    refused_anywhere = set().union(*refuses)
    for r in range(ranks):
        assert [seq for _, seq, _ in decided[r]] == list(range(1, commands + 1))
        assert [(t, s, v is Verdict.APPLY) for t, s, v in decided[r]] == [
            (t, s, v is Verdict.APPLY) for t, s, v in decided[0]
        ]
        assert [v is Verdict.APPLY for _, _, v in decided[r]] == [
            s not in refused_anywhere for s in range(1, commands + 1)
        ]
        members[r].close()


def test_a_round_no_backward_carries_falls_back_to_gloo() -> None:
    """A loop that stops backpropagating through DDP: after the patience, a gloo round decides."""
    gloo, backward = _Collective(2), _Backward(2)
    states = [TrainingState(step_time_s=0.001) for _ in range(2)]
    members = [
        Agreement(ThreadletConfig(), states[r], prepare=_refusing(set()), transport=gloo.transport(),
                  piggyback=backward.members[r])
        for r in range(2)
    ]  # fmt: skip
    decided_at: list[int] = []
    for tick in range(1, PIGGYBACK_PATIENCE_TICKS + 20):
        for r, m in enumerate(members):
            states[r].tick = tick
            if tick == 2:
                m.file(set_config(1, lr=0.1), 0.0)
            for filed, _ in m.read_round():
                states[r].last_decided = filed.command.seq
                decided_at.append(tick)
            m.start_round()
    assert len(decided_at) == 2 and decided_at[0] == decided_at[1]
    assert PIGGYBACK_PATIENCE_TICKS < decided_at[0] < PIGGYBACK_PATIENCE_TICKS + 20
    assert len(gloo.rounds) >= 1


class _FailedWork:
    """The work of a gradient all-reduce whose peer died (gloo: connection closed by peer)."""

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        fut.set_exception(RuntimeError("Connection closed by peer"))  # type: ignore[arg-type]  # torch types it as T
        return fut


def test_a_failed_all_reduce_fails_the_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead peer fails the gradient all-reduce: the bucket's future must fail too, as with DDP's
    default hook, so the rank raises and torchrun re-rendezvouses instead of training on alone."""
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **kw: _FailedWork())
    transport = PiggybackTransport(2)
    transport.start(0, lambda: (1, NONE_REFUSED))
    fut = transport.ride(torch.ones(4), group=None)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        fut.wait()
