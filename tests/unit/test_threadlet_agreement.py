"""The step agreement: the pure decision (a table of rounds, a property test over simulated ranks), the
MIN encoding of an offer, and the `Agreement` component of several ranks over an in-process collective."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import set_config
from threadlet.agreement import (
    NONE_REFUSED,
    Agreement,
    Offer,
    Verdict,
    decide,
    decode,
    encode,
    local_offer,
)
from threadlet.config import ThreadletConfig
from threadlet.state import Filed, TrainingState
from torchloom.messages import Command

A, S, X = Verdict.APPLY, Verdict.REJECT_SELF, Verdict.REJECT_OTHER
N = NONE_REFUSED


@pytest.mark.parametrize(
    ("last", "refusals", "want"),
    [
        (0, {}, (0, N)),
        (0, {1: False, 2: False}, (2, N)),
        (0, {1: False, 3: False}, (1, N)),  # 2 missing: only the contiguous prefix is ready
        (4, {5: False, 6: True, 7: True}, (7, 6)),
        (0, {2: True}, (0, N)),  # a refusal beyond a gap is not offered yet
    ],
)
def test_local_offer(last: int, refusals: dict[int, bool], want: tuple[int, int]) -> None:
    assert local_offer(last, refusals) == want


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ((0, 0, N, 0, N), []),
        ((0, 3, N, 3, N), [(1, A), (2, A), (3, A)]),
        ((0, 3, N, 2, N), [(1, A), (2, A)]),  # another rank has only seen up to 2
        ((0, 3, 2, 3, 2), [(1, A), (2, S)]),  # we refuse 2: 3 waits for the next round
        ((0, 3, N, 3, 2), [(1, A), (2, X)]),  # another rank refuses 2
        ((0, 3, 3, 3, 2), [(1, A), (2, X)]),  # both refuse, the other one earlier
        ((5, 6, N, 6, 9), [(6, A)]),  # another rank's refusal lies beyond the agreed range
        ((5, 5, N, 5, N), []),
    ],
)
def test_decide_table(args: tuple[int, int, int, int, int], want: list[tuple[int, Verdict]]) -> None:
    assert decide(*args) == want


@pytest.mark.parametrize(
    "args",
    [
        (0, 2, N, 3, N),  # agreed_ready above our own ready
        (4, 5, N, 3, N),  # agreed_ready below last_decided
        (0, 3, 2, 3, 3),  # agreed_refused above our own refused_first
        (4, 6, N, 6, 4),  # agreed_refused already decided
    ],
)
def test_decide_rejects_impossible_rounds(args: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="impossible"):
        decide(*args)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[list[int]], list[set[int]]]:
    ranks = draw(st.integers(1, 4))
    commands = draw(st.integers(0, 8))
    # arrival[r][seq-1]: the round at which rank r has filed command seq (any order across seqs).
    arrival = [[draw(st.integers(0, 6)) for _ in range(commands)] for _ in range(ranks)]
    refuses = [draw(st.sets(st.integers(1, max(commands, 1)))) for _ in range(ranks)]
    return ranks, commands, arrival, refuses


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_every_rank_decides_the_same_commands_in_order(
    scenario: tuple[int, int, list[list[int]], list[set[int]]],
) -> None:
    ranks, commands, arrival, refuses = scenario
    last = [0] * ranks
    decided: list[list[tuple[int, int, bool]]] = [[] for _ in range(ranks)]  # (round, seq, applied)
    verdicts: list[dict[int, Verdict]] = [{} for _ in range(ranks)]
    for rnd in range(7 + commands + 1):  # enough rounds: one rejection per round at worst
        offers = []
        for r in range(ranks):
            filed = {
                seq: seq in refuses[r]
                for seq in range(last[r] + 1, commands + 1)
                if arrival[r][seq - 1] <= rnd
            }
            offers.append(local_offer(last[r], filed))
        agreed_ready = min(o[0] for o in offers)
        agreed_refused = min(o[1] for o in offers)
        for r in range(ranks):
            for seq, verdict in decide(last[r], *offers[r], agreed_ready, agreed_refused):
                assert seq == last[r] + 1
                last[r] = seq
                decided[r].append((rnd, seq, verdict is Verdict.APPLY))
                verdicts[r][seq] = verdict
    # Every command decided, once, in order, in the same round with the same outcome everywhere.
    for r in range(ranks):
        assert [seq for _, seq, _ in decided[r]] == list(range(1, commands + 1))
        assert decided[r] == decided[0]
    for seq in range(1, commands + 1):
        refused_somewhere = any(seq in refuses[r] for r in range(ranks))
        for r in range(ranks):
            if not refused_somewhere:
                assert verdicts[r][seq] is Verdict.APPLY
            elif seq in refuses[r]:
                assert verdicts[r][seq] is Verdict.REJECT_SELF
            else:
                assert verdicts[r][seq] is Verdict.REJECT_OTHER


offers = st.builds(
    Offer,
    ready=st.integers(0, 2**40),
    refused_first=st.integers(1, NONE_REFUSED),
    busy=st.booleans(),
    spacing=st.integers(1, 1000),
    lag=st.integers(1, 8),
)


@given(st.lists(offers, min_size=1, max_size=5))
def test_min_of_encoded_offers_is_the_agreed_round(ranks: list[Offer]) -> None:
    agreed = decode([min(column) for column in zip(*(encode(o) for o in ranks), strict=True)])
    assert agreed == Offer(
        ready=min(o.ready for o in ranks),
        refused_first=min(o.refused_first for o in ranks),
        busy=any(o.busy for o in ranks),
        spacing=max(o.spacing for o in ranks),
        lag=max(o.lag for o in ranks),
    )


def test_decode_names_the_expected_width() -> None:
    with pytest.raises(ValueError, match="expected 5"):
        decode([1, 2, 3])


class _Collective:
    """An in-process stand-in for the all-reduce: round k's offers of every rank, combined by MIN."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.rounds: list[list[Offer]] = []

    def transport(self) -> _Member:
        return _Member(self)


class _Member:
    """One rank's AgreementTransport over a `_Collective`."""

    def __init__(self, collective: _Collective) -> None:
        self._c = collective
        self._started = 0
        self._finished = 0

    def start(self, offer: Offer) -> None:
        if len(self._c.rounds) == self._started:
            self._c.rounds.append([])
        self._c.rounds[self._started].append(offer)
        self._started += 1

    def finish(self) -> Offer:
        offers = self._c.rounds[self._finished]
        assert len(offers) == self._c.ranks, "a rank read a round not every rank started"
        self._finished += 1
        return decode([min(column) for column in zip(*(encode(o) for o in offers), strict=True)])


def _refusing(refused: set[int]) -> Callable[[Command, float], Filed]:
    def prepare(cmd: Command, received_at_s: float) -> Filed:
        return Filed(cmd, received_at_s, "refused here" if cmd.seq in refused else None)

    return prepare


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.sampled_from([0.001, 0.01, 0.3]))
def test_agreement_components_decide_alike_over_a_collective(
    scenario: tuple[int, int, list[list[int]], list[set[int]]], step_time_s: float
) -> None:
    """Ranks file commands at different ticks; every rank decides each one at the same tick with the
    same outcome, whatever the step time makes of the agreed round spacing and lag."""
    ranks, commands, arrival, refuses = scenario
    cfg = ThreadletConfig(max_idle_round_steps=8)
    collective = _Collective(ranks)
    states = [TrainingState(step_time_s=step_time_s) for _ in range(ranks)]
    members = [
        Agreement(cfg, states[r], prepare=_refusing(refuses[r]), transport=collective.transport())
        for r in range(ranks)
    ]
    decided: list[list[tuple[int, int, Verdict]]] = [[] for _ in range(ranks)]
    for tick in range(1, 80):
        for r in range(ranks):
            st_r = states[r]
            st_r.tick = tick
            for seq in range(1, commands + 1):
                if arrival[r][seq - 1] == tick // 4:
                    members[r].file(set_config(seq, lr=0.1), 0.0)
            for filed, verdict in members[r].read_round():
                st_r.last_decided = filed.command.seq
                decided[r].append((tick, filed.command.seq, verdict))
            members[r].start_round()
    for r in range(ranks):
        assert [seq for _, seq, _ in decided[r]] == list(range(1, commands + 1))
        assert [(t, seq, v is Verdict.APPLY) for t, seq, v in decided[r]] == [
            (t, seq, v is Verdict.APPLY) for t, seq, v in decided[0]
        ]
        assert not members[r].inbox
        members[r].close()
    assert len(collective.rounds) == members[0].rounds


def test_a_lone_rank_decides_at_the_boundary_after_filing() -> None:
    state = TrainingState()
    alone = Agreement(ThreadletConfig(), state, prepare=_refusing({2}), transport=None)
    assert alone.read_round() == ()
    for seq in (1, 2, 3):
        alone.file(set_config(seq, lr=0.1), 0.0)
    alone.file(set_config(1, lr=0.2), 0.0)  # a duplicate seq is dropped
    first = [(f.command.seq, v) for f, v in alone.read_round()]
    assert first == [(1, Verdict.APPLY), (2, Verdict.REJECT_SELF)]  # 3 waits for the next round
    state.last_decided = 2
    alone.start_round()  # no rounds without a transport
    assert [(f.command.seq, v) for f, v in alone.read_round()] == [(3, Verdict.APPLY)]
    assert alone.rounds == 0
