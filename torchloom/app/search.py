"""`torchloom search`: branch search inside one running job. From a start checkpoint, each candidate
value of one knob is tried in place (rollback to the start, set it, train N steps, eval), then the job
rolls back to the start once more and continues with the best value.

Every step is an ordinary command (validated, journaled, signed, acked by every rank) issued with
issuer kind `naming.SEARCH_ISSUER`; the concluding rollback carries the search's record under
`naming.SEARCH_RESULT`, which the weaver journals as a `search_result` event (every candidate, its
metric, the winner). Pure: `parse_spec`, `resolve_values`, `pick_best`, `metric_of`, `record`.
I/O: `run_search` (over the weaver's gRPC service) and `command` (the CLI verb).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from torchloom import defaults, discovery, knobs, naming
from torchloom.app import actions as cli_actions
from torchloom.app.lookup import weaver_address
from torchloom.client import ControlClient, submit_until
from torchloom.errors import TorchloomError
from torchloom.messages import (
    Action,
    ActionKind,
    Body,
    Issuer,
    JobStatus,
    KnobValue,
    Outcome,
    OutcomeStatus,
    SetConfig,
    SubmitRequest,
)

MAX_CANDIDATES = 16
POLL_S = 0.1
EXIT_FAILED = 2  # a command was refused, an eval failed, or no candidate gave a finite metric
EXIT_TIMEOUT = 3  # a command or the training did not finish in time
SPEC_FORM = "KNOB=V1,V2,... where each V is a number (e.g. lr=1e-3,3e-3) or xF, F times the value in effect"


class SearchFailed(TorchloomError):
    """The search ended without a winner; `exit_code` says how (EXIT_FAILED or EXIT_TIMEOUT)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report: Report | None = None  # what was found before the failure, once a branch was tried


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One value to try: `value` as typed, or `factor` times the value in effect at the start."""

    text: str
    value: float | None = None
    factor: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    knob: str
    candidates: tuple[Candidate, ...]


def parse_spec(text: str) -> Spec:
    """Parse `KNOB=V1,V2,...` (see SPEC_FORM).

    Raises:
        ValueError: naming what is wrong and the expected form.
    """
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{text!r} rejected: expected {SPEC_FORM}")
    knobs.split_key(key)  # raises ValueError naming the form of a knob key
    words = [w.strip() for w in rest.split(",")]
    if len(words) < 2 or len(words) > MAX_CANDIDATES or not all(words):
        raise ValueError(
            f"{text!r} rejected: expected 2 to {MAX_CANDIDATES} comma-separated candidates: {SPEC_FORM}"
        )
    out: list[Candidate] = []
    for word in words:
        number = _number(word[1:] if word.startswith("x") else word)
        if number is None:
            raise ValueError(f"candidate {word!r} of {key} rejected: expected a number or xF: {SPEC_FORM}")
        if word.startswith("x"):
            if number <= 0:
                raise ValueError(f"candidate {word!r} of {key} rejected: the factor F of xF must be > 0")
            out.append(Candidate(text=word, factor=number))
        else:
            out.append(Candidate(text=word, value=number))
    return Spec(knob=key, candidates=tuple(out))


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def resolve_values(spec: Spec, current: KnobValue | None) -> tuple[float, ...]:
    """Each candidate's value: as typed, or its factor times `current` (the value in effect).

    Raises:
        ValueError: a factor without a numeric value in effect, or two candidates of the same value.
    """
    values: list[float] = []
    for c in spec.candidates:
        if c.factor is not None:
            if isinstance(current, bool) or not isinstance(current, int | float):
                raise ValueError(
                    f"candidate {c.text} of {spec.knob} needs the value of {spec.knob} in effect, which the "
                    f"job does not report as a number ({current!r}): give absolute values instead"
                )
            values.append(float(current) * c.factor)
        else:
            assert c.value is not None
            values.append(c.value)
    if len(set(values)) != len(values):
        shown = ", ".join(f"{c.text}={v:g}" for c, v in zip(spec.candidates, values, strict=True))
        raise ValueError(f"candidates of {spec.knob} rejected: two have the same value ({shown})")
    return tuple(values)


def pick_best(metrics: Sequence[float], *, maximize: bool = False) -> int | None:
    """The index of the best metric (lowest, or highest with `maximize`); a tie goes to the candidate
    listed first. NaN and infinite metrics never win; None when no metric is finite."""
    finite = [(m, i) for i, m in enumerate(metrics) if math.isfinite(m)]
    if not finite:
        return None
    best = max(m for m, _ in finite) if maximize else min(m for m, _ in finite)
    return min(i for m, i in finite if m == best)


def metric_of(outcome: Outcome, metric: str) -> float:
    """The mean over ranks of `eval.<metric>` in an applied eval's acks (each rank evaluates).

    Raises:
        SearchFailed: some rank did not report that metric (the message lists the ones it did).
    """
    key = f"eval.{metric}"
    values: list[float] = []
    for r in sorted(outcome.results, key=lambda r: r.rank):
        if key not in r.detail:
            known = ", ".join(sorted(k.removeprefix("eval.") for k in r.detail if k.startswith("eval.")))
            raise SearchFailed(
                f"rank {r.rank}'s eval function reported no metric {metric!r} "
                f"(it reported: {known or 'none'}): pass --metric NAME"
            )
        values.append(float(r.detail[key]))
    if not values:
        raise SearchFailed("the eval was applied by no rank")
    return math.fsum(values) / len(values)


@dataclass(slots=True, kw_only=True)
class Trial:
    """One candidate's branch: where it started, the steps it trained and its metric."""

    value: float
    branch: str = ""
    set_step: int = 0
    eval_step: int = 0
    metric: float = math.nan

    def json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "branch": self.branch,
            "set_step": self.set_step,
            "eval_step": self.eval_step,
            "steps": self.eval_step - self.set_step,
            "metric": self.metric if math.isfinite(self.metric) else None,
        }


@dataclass(slots=True, kw_only=True)
class Report:
    """What the search found: the CLI prints it and the concluding rollback carries it."""

    search: str
    job: str
    knob: str
    metric: str
    maximize: bool
    steps: int
    start: str = ""
    baseline: float = math.nan
    trials: list[Trial] = field(default_factory=list)
    winner: int | None = None
    error: str = ""

    def json(self) -> dict[str, Any]:
        won = self.trials[self.winner] if self.winner is not None else None
        if won is not None:
            summary = f"{self.knob}={won.value:g} wins ({self.metric} {won.metric:.6g})"
        else:
            summary = f"no winner: {self.error}" if self.error else "no winner"
        return {
            "search": self.search,
            "job": self.job,
            "knob": self.knob,
            "metric": self.metric,
            "goal": "max" if self.maximize else "min",
            "steps": self.steps,
            "start": self.start,
            "baseline": self.baseline if math.isfinite(self.baseline) else None,
            "candidates": [t.value for t in self.trials],
            "metrics": [t.metric if math.isfinite(t.metric) else None for t in self.trials],
            "trials": [t.json() for t in self.trials],
            "winner": won.value if won is not None else None,
            "error": self.error,
            "summary": summary,
        }


def record(report: Report) -> str:
    """The JSON the concluding rollback carries (`naming.SEARCH_RESULT`), within the weaver's bound."""
    return json.dumps(report.json(), sort_keys=True, allow_nan=False)


def format_report(report: Report) -> str:
    """The human form: one line per candidate, the winner marked."""
    goal = "max" if report.maximize else "min"
    head = f"search {report.search} on job {report.job}: {report.knob}, {report.steps} steps each"
    lines = [f"{head}, {goal} {report.metric}, from {report.start or '-'}"]
    for i, t in enumerate(report.trials):
        mark = "*" if i == report.winner else " "
        lines.append(
            f" {mark} {report.knob}={t.value:<12g} {report.metric}={t.metric:<12.6g} "
            f"steps {t.set_step}->{t.eval_step} on {t.branch}"
        )
    if report.winner is not None:
        lines.append(
            f"continuing from {report.start} with {report.knob}={report.trials[report.winner].value:g}"
        )
    return "\n".join(lines)


# ---- I/O ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    grpc: str | None
    job: str
    spec: Spec
    steps: int
    metric: str = "loss"
    maximize: bool = False
    from_checkpoint: str = ""
    timeout_s: float = defaults.COMMAND_TIMEOUT_S


class _Driver:
    """Submits the search's commands one at a time, each under its own id, retried safely."""

    def __init__(self, plan: Plan, job: str, issuer: Issuer) -> None:
        self.plan = plan
        self.job = job
        self.issuer = issuer

    async def send(self, body: Body, what: str) -> Outcome:
        request = SubmitRequest(body=body, job=self.job, issuer=self.issuer, timeout_s=self.plan.timeout_s)
        result = await submit_until(
            request, lambda: discovery.resolve_grpc(self.plan.grpc), deadline_s=self.plan.timeout_s
        )
        outcome = result.outcome
        if outcome is None:
            raise SearchFailed(
                f"{what}: no answer from the weaver ({result.error}); command {result.command_id} may be in "
                "flight", exit_code=EXIT_TIMEOUT,
            )  # fmt: skip
        if outcome.status is OutcomeStatus.TIMEOUT:
            raise SearchFailed(
                f"{what}: timed out ({outcome.reason}); command {outcome.command_id} stays in flight",
                exit_code=EXIT_TIMEOUT,
            )
        if outcome.status is not OutcomeStatus.APPLIED:
            raise SearchFailed(f"{what} refused: {outcome.reason}")
        return outcome

    async def wait_steps(self, client: ControlClient, branch: str, target: int) -> None:
        """Until every rank reports `target` steps on `branch`; fails when no rank advances for the
        command timeout (a paused, stopped or hung job)."""
        last_progress, best = time.monotonic(), -1
        while True:
            async with asyncio.timeout(self.plan.timeout_s):
                reply = await client.status(self.job)
            ranks = [r for j in reply.jobs if j.job == self.job for r in j.ranks]
            on_branch = [r.step for r in ranks if r.branch == branch]
            if ranks and len(on_branch) == len(ranks) and min(on_branch) >= target:
                return
            progress = min(on_branch) if len(on_branch) == len(ranks) and ranks else -1
            if progress > best:
                best, last_progress = progress, time.monotonic()
            elif time.monotonic() - last_progress > self.plan.timeout_s:
                raise SearchFailed(
                    f"the job made no progress towards step {target} on branch {branch} in "
                    f"{self.plan.timeout_s:g}s (is it paused, stopped or finished?)",
                    exit_code=EXIT_TIMEOUT,
                )
            await asyncio.sleep(POLL_S)


def _current(job: JobStatus, knob: str) -> KnobValue | None:
    for r in sorted(job.ranks, key=lambda r: r.rank):
        for key in (knob, knob.split("@", 1)[0]):
            if key in r.knobs:
                return r.knobs[key]
    return None


def _rollback(start: str, report: Report | None = None) -> Action:
    args = {"checkpoint": start}
    if report is not None:
        args[naming.SEARCH_RESULT] = record(report)
    return Action(kind=ActionKind.ROLLBACK, args=args)


async def run_search(plan: Plan, *, say: Callable[[str], None], issuer: Issuer | None = None) -> Report:
    """Carry out one search (see the module docstring) and return its report.

    Nothing is changed before the first eval shows the job can evaluate the metric. After the start
    checkpoint exists, a failure rolls the job back to it (the rollback carries the record with
    the error, so the journal shows the failed search) and raises.

    Raises:
        SearchFailed: a command was refused or timed out, an eval lacked the metric, the training did
            not advance, or no candidate gave a finite metric.
        JobNotFound, WeaverUnavailable, ValueError: before anything was sent.
    """
    job = await cli_actions.fetch_job(plan.grpc, plan.job)
    values = resolve_values(plan.spec, _current(job, plan.spec.knob))
    who = issuer or cli_actions.cli_issuer()
    driver = _Driver(plan, job.job, Issuer(kind=naming.SEARCH_ISSUER, identity=who.identity))
    report = Report(
        search=uuid.uuid4().hex[:8],
        job=job.job,
        knob=plan.spec.knob,
        metric=plan.metric,
        maximize=plan.maximize,
        steps=plan.steps,
    )
    if plan.from_checkpoint:
        found = [c for c in job.checkpoints if plan.from_checkpoint in (c.id, c.tag)]
        if not found:
            known = ", ".join(c.tag or c.id for c in job.checkpoints) or "none"
            raise SearchFailed(f"checkpoint {plan.from_checkpoint!r} does not exist (checkpoints: {known})")
    # The first eval checks that the job can evaluate the metric before anything changes.
    try:
        baseline = await driver.send(Action(kind=ActionKind.EVAL), "the eval before the search")
        report.baseline = metric_of(baseline, plan.metric)
    except SearchFailed as exc:
        raise SearchFailed(f"{exc}; nothing was changed", exit_code=exc.exit_code) from None
    say(f"search {report.search}: {plan.metric} before the search {report.baseline:.6g}")
    if plan.from_checkpoint:
        report.start = plan.from_checkpoint
    else:
        taken = await driver.send(
            Action(kind=ActionKind.CHECKPOINT, args={"tag": f"search-{report.search}"}),
            "the start checkpoint",
        )
        report.start = taken.results[0].detail.get("checkpoint_id", f"search-{report.search}")
    try:
        async with ControlClient(weaver_address(plan.grpc)) as client:
            for value in values:
                trial = Trial(value=value)
                report.trials.append(trial)
                what = f"candidate {plan.spec.knob}={value:g}"
                back = await driver.send(_rollback(report.start), f"{what}: the rollback to {report.start}")
                trial.branch = back.results[0].detail.get("branch", back.results[0].branch)
                put = await driver.send(SetConfig(values={plan.spec.knob: value}), f"{what}: the set")
                trial.set_step = put.results[0].step
                await driver.wait_steps(client, trial.branch, trial.set_step + plan.steps)
                evaluated = await driver.send(Action(kind=ActionKind.EVAL), f"{what}: the eval")
                trial.eval_step = evaluated.results[0].step
                trial.metric = metric_of(evaluated, plan.metric)
                say(
                    f"  {what}: {plan.metric} {trial.metric:.6g} "
                    f"after {trial.eval_step - trial.set_step} steps"
                )
        report.winner = pick_best([t.metric for t in report.trials], maximize=plan.maximize)
        if report.winner is None:
            raise SearchFailed(f"no candidate gave a finite {plan.metric}")
    except SearchFailed as exc:
        report.error = str(exc)
        await _give_up(driver, report)
        exc.report = report
        raise
    await driver.send(_rollback(report.start, report), f"the rollback to {report.start} after the search")
    won = report.trials[report.winner]
    await driver.send(SetConfig(values={plan.spec.knob: won.value}), f"the set of the winner {won.value:g}")
    return report


async def _give_up(driver: _Driver, report: Report) -> None:
    """Back to the start checkpoint after a failure, carrying the record with its error."""
    try:
        await driver.send(
            _rollback(report.start, report), f"the rollback to {report.start} after the failure"
        )
    except SearchFailed as exc:
        report.error += f"; the rollback to {report.start} failed too: {exc}"
        return
    report.error += f"; the job was rolled back to {report.start}"


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], command: Callable[[], argparse.ArgumentParser]
) -> None:
    """Add `search` to the CLI; `command` makes the --grpc/--job/--timeout/--json parent."""
    p = sub.add_parser(
        "search",
        parents=[command()],
        help="try values of one knob from a checkpoint, each for N steps, and continue with the best",
        description="From a checkpoint (taken now, or --from), each candidate is tried in place: roll back "
        "to it, set the value, train --steps steps, run the eval action. Then the job rolls back once more "
        "and continues with the candidate whose eval metric is best. " + SPEC_FORM + ". Every step is an "
        "ordinary command; the journal shows each branch and a search_result event. Exit status: 0 a winner "
        "is set; 2 a command was refused, an eval failed or no metric was finite (the job is rolled back "
        "to the start); 3 a command or the training did not finish in time; 4 no weaver.",
    )
    p.add_argument("spec", metavar="KNOB=V1,V2,...", help="e.g. lr=x0.5,x1,x2 or lr=1e-3,3e-3,1e-2")
    p.add_argument("--steps", type=_positive_int, required=True, metavar="N", help="steps per candidate")
    p.add_argument(
        "--metric",
        default="loss",
        metavar="NAME",
        help="the eval function's metric to compare (default loss)",
    )
    p.add_argument("--maximize", action="store_true", help="the highest metric wins (default: the lowest)")
    p.add_argument(
        "--from", dest="from_checkpoint", default="", metavar="CKPT", help="start checkpoint (tag or id)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} rejected: expected an integer >= 1 (e.g. 50)")
    return value


def command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """`torchloom search`: run it, print the report (or its JSON), return the exit status."""
    plan = Plan(
        grpc=args.grpc,
        job=args.job,
        spec=parse_spec(args.spec),
        steps=args.steps,
        metric=args.metric,
        maximize=args.maximize,
        from_checkpoint=args.from_checkpoint,
        timeout_s=args.timeout,
    )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = asyncio.run(run_search(plan, say=say))
    except SearchFailed as exc:
        if exc.report is not None:
            print(json.dumps(exc.report.json()) if args.json else format_report(exc.report), file=out)
        print(f"torchloom search: {exc.report.error if exc.report else exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(json.dumps(report.json()) if args.json else format_report(report), file=out, flush=True)
    return 0
