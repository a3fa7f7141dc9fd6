"""The step agreement: which commands every rank decides at a step boundary, as a pure function.

Each rank contributes `(ready, refused_first)`; an all-reduce with MIN gives the agreed pair, and
`decide` turns it into the same ordered verdicts on every rank (docs/design.md, "Commands").
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

# "This rank refuses nothing": the identity of MIN for an int64 all-reduce.
NONE_REFUSED = 2**63 - 1


class Verdict(StrEnum):
    APPLY = "apply"
    REJECT_SELF = "reject_self"  # this rank refused it
    REJECT_OTHER = "reject_other"  # another rank refused it


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
