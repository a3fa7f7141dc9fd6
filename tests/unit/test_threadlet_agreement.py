"""The pure step agreement: a table of rounds and a property test over simulated ranks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadlet.agreement import NONE_REFUSED, Verdict, decide, local_offer

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
