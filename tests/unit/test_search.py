"""The pure parts of `torchloom search`: candidate parsing, values from factors, picking the best
(ties, NaN, infinities), the eval metric read from acks; the eval action's detail; and the weaver's
side: the record a concluding rollback carries, checked at submit and journaled as `search_result`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from threadlet.actions import eval_detail
from torchloom import naming
from torchloom.app import search
from torchloom.errors import CommandRejected
from torchloom.messages import (
    AckStatus,
    Action,
    ActionKind,
    Body,
    Command,
    Issuer,
    Outcome,
    OutcomeStatus,
    RankResult,
    SetConfig,
)
from weaver import outcomes
from weaver import registry as rg


def test_parse_spec_numbers_and_factors() -> None:
    spec = search.parse_spec("lr=x0.5, x1,x2")
    assert spec.knob == "lr" and [c.factor for c in spec.candidates] == [0.5, 1.0, 2.0]
    spec = search.parse_spec("lr@head=1e-3,3e-3")
    assert spec.knob == "lr@head" and [c.value for c in spec.candidates] == [1e-3, 3e-3]
    mixed = search.parse_spec("weight_decay=0,x2")
    assert mixed.candidates[0].value == 0.0 and mixed.candidates[1].factor == 2.0


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("lr", "expected KNOB=V1,V2"),
        ("=1,2", "expected KNOB=V1,V2"),
        ("lr=1e-3", "2 to 16 comma-separated candidates"),
        ("lr=1e-3,,2e-3", "2 to 16 comma-separated candidates"),
        ("lr=" + ",".join(["1"] * 17), "2 to 16"),
        ("lr=1e-3,fast", "candidate 'fast' of lr rejected: expected a number or xF"),
        ("lr=1e-3,nan", "candidate 'nan' of lr rejected"),
        ("lr=x0,x1", "the factor F of xF must be > 0"),
        ("lr=x-1,x1", "the factor F of xF must be > 0"),
    ],
)
def test_parse_spec_refuses_with_the_form(text: str, said: str) -> None:
    with pytest.raises(ValueError) as info:
        search.parse_spec(text)
    assert said in str(info.value)


def test_resolve_values() -> None:
    spec = search.parse_spec("lr=x0.5,x2,1e-3")
    assert search.resolve_values(spec, 0.01) == (0.005, 0.02, 0.001)
    with pytest.raises(ValueError, match="needs the value of lr in effect"):
        search.resolve_values(spec, None)
    with pytest.raises(ValueError, match="two have the same value"):
        search.resolve_values(search.parse_spec("lr=x1,0.01"), 0.01)


def test_pick_best_lowest_highest_ties_and_non_finite() -> None:
    assert search.pick_best([0.3, 0.1, 0.2]) == 1
    assert search.pick_best([0.3, 0.1, 0.2], maximize=True) == 0
    assert search.pick_best([0.2, 0.1, 0.1]) == 1  # a tie goes to the one listed first
    assert search.pick_best([math.nan, 0.5, math.inf]) == 1
    assert search.pick_best([math.nan, -math.inf, 0.5]) == 2  # -inf is not a finite metric either
    assert search.pick_best([math.inf, math.nan, 2.0], maximize=True) == 2
    assert search.pick_best([math.nan, math.inf]) is None


def _eval_outcome(*details: dict[str, str]) -> Outcome:
    results = tuple(
        RankResult(rank=r, status=AckStatus.APPLIED, step=7, detail=d) for r, d in enumerate(details)
    )
    return Outcome(command_id="c", job="j", status=OutcomeStatus.APPLIED, results=results)


def test_metric_of_is_the_mean_over_ranks() -> None:
    assert search.metric_of(_eval_outcome({"eval.loss": "0.5"}, {"eval.loss": "0.25"}), "loss") == 0.375
    assert math.isnan(search.metric_of(_eval_outcome({"eval.loss": "nan"}), "loss"))
    with pytest.raises(search.SearchFailed, match=r"no metric 'acc' \(it reported: loss\): pass --metric"):
        search.metric_of(_eval_outcome({"eval.loss": "0.5"}), "acc")


def test_eval_detail_reads_back_as_numbers_and_refuses_other_results() -> None:
    detail = eval_detail({"loss": torch.tensor(0.1), "acc": 1, "bad": math.inf})
    assert {k: float(v) for k, v in detail.items()} == {"eval.loss": pytest.approx(0.1), "eval.acc": 1.0,
                                                        "eval.bad": math.inf}  # fmt: skip
    with pytest.raises(ValueError, match="expected a non-empty mapping of metric name -> number"):
        eval_detail(0.25)
    with pytest.raises(ValueError, match="expected a non-empty mapping"):
        eval_detail({})
    with pytest.raises(ValueError, match=r"eval metric loss='low' rejected: expected a number"):
        eval_detail({"loss": "low"})


def _command(seq: int, body: Body) -> Command:
    return Command(
        command_id=f"c{seq}", job="j", run_id="r", seq=seq, issuer=Issuer(), issued_at_s=1.0, body=body
    )


def _report() -> search.Report:
    report = search.Report(search="abc", job="j", knob="lr", metric="loss", maximize=False, steps=5)
    report.start = "ckpt-2"
    report.trials = [search.Trial(value=0.1, metric=0.5), search.Trial(value=1.0, metric=math.nan)]
    report.winner = 0
    return report


def test_the_record_rides_the_rollback_and_becomes_the_search_result_event() -> None:
    reg = rg.Registry()
    rg.apply_outcome(
        reg,
        Outcome(
            command_id="k",
            job="j",
            status=OutcomeStatus.APPLIED,
            command=_command(2, Action(kind=ActionKind.CHECKPOINT)),
            results=(
                RankResult(rank=0, status=AckStatus.APPLIED, step=3, detail={"checkpoint_id": "ckpt-2"}),
            ),
        ),
    )
    facts = rg.JobFacts(job="j", world_size=1)
    action = search._rollback("ckpt-2", _report())
    checked = rg.validate_action(reg, facts, action)
    assert checked.args["checkpoint_id"] == "ckpt-2"
    bad = {"checkpoint": "ckpt-2", naming.SEARCH_RESULT: "nope"}
    with pytest.raises(CommandRejected, match="search_result 'nope' rejected: expected a JSON object"):
        rg.validate_action(reg, facts, Action(kind=ActionKind.ROLLBACK, args=bad))
    outcome = Outcome(command_id="c9", job="j", status=OutcomeStatus.APPLIED, command=_command(9, checked))
    event = outcomes.search_event(outcome, 5.0)
    assert event is not None and event.kind == naming.SEARCH_RESULT and event.command_id == "c9"
    assert event.message == "search abc: lr=0.1 wins (loss 0.5)"
    attrs = event.attrs
    assert attrs["rollback_status"] == "applied" and attrs["knob"] == "lr" and attrs["error"] == ""
    assert json.loads(attrs["candidates"]) == [0.1, 1.0] and json.loads(attrs["metrics"]) == [0.5, None]
    assert json.loads(attrs["winner"]) == 0.1
    plain_cmd = _command(10, SetConfig(values={"lr": 1.0}))
    plain = Outcome(command_id="c10", job="j", status=OutcomeStatus.APPLIED, command=plain_cmd)
    assert outcomes.search_event(plain, 5.0) is None


def test_a_failed_search_names_its_error_and_has_no_winner() -> None:
    report = _report()
    report.winner, report.error = None, "candidate lr=1: the set refused: no"
    body = report.json()
    assert body["winner"] is None and body["summary"] == "no winner: candidate lr=1: the set refused: no"
    assert len(search.record(report)) < rg.MAX_SEARCH_RECORD_CHARS
