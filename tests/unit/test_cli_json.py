"""Unit tests of the CLI's output shapes, built from messages by pure functions."""

from __future__ import annotations

import json
import subprocess
import sys

from torchloom.app import cli, submit_cmd
from torchloom.messages import (
    AckStatus,
    JobEvent,
    JobStatus,
    Outcome,
    OutcomeStatus,
    RankResult,
    RankState,
    RankStatus,
    StatusReply,
    StepMetrics,
)


def _outcome(status: OutcomeStatus, reason: str = "") -> Outcome:
    return Outcome(
        command_id="c1",
        job="demo",
        status=status,
        reason=reason,
        results=(
            RankResult(rank=1, status=AckStatus.APPLIED, step=61),
            RankResult(rank=0, status=AckStatus.APPLIED, step=61),
        ),
    )


def test_outcome_json_shape() -> None:
    got = submit_cmd.outcome_json(_outcome(OutcomeStatus.APPLIED))
    assert got == {
        "command_id": "c1",
        "status": "applied",
        "reason": None,
        "applied": [{"rank": 0, "step": 61}, {"rank": 1, "step": 61}],
    }
    json.dumps(got)


def test_rejected_outcome_keeps_reason_and_only_applied_ranks() -> None:
    outcome = Outcome(
        command_id="c2",
        job="demo",
        status=OutcomeStatus.REJECTED,
        reason="lr=-1 rejected: must be in (0, 10]",
        results=(RankResult(rank=0, status=AckStatus.REJECTED, step=3, reason="no"),),
    )
    got = submit_cmd.outcome_json(outcome)
    assert got["status"] == "rejected"
    assert got["reason"] == "lr=-1 rejected: must be in (0, 10]"
    assert got["applied"] == []
    assert submit_cmd.exit_code(outcome) == submit_cmd.EXIT_REJECTED


def test_exit_codes() -> None:
    assert submit_cmd.exit_code(_outcome(OutcomeStatus.APPLIED)) == 0
    assert submit_cmd.exit_code(_outcome(OutcomeStatus.TIMEOUT)) == submit_cmd.EXIT_TIMEOUT
    assert submit_cmd.exit_code(_outcome(OutcomeStatus.PENDING)) == submit_cmd.EXIT_TIMEOUT


def test_status_json_shape() -> None:
    reply = StatusReply(
        jobs=(
            JobStatus(
                job="demo",
                run_id="r1",
                world_size=2,
                ranks=(
                    RankStatus(rank=1, step=9, knobs={"lr": 0.1, "betas": (0.9, 0.99)}, last_heartbeat_s=5.0),
                    RankStatus(rank=0, step=10, state=RankState.PAUSED, knobs={"lr": float("nan")}),
                ),
            ),
        )
    )
    got = cli.status_json(reply)
    text = json.dumps(got, allow_nan=False)  # strict JSON: NaN must not leak
    assert json.loads(text) == got
    job = got["jobs"][0]
    assert (job["job"], job["world_size"], job["run_id"]) == ("demo", 2, "r1")
    assert [r["rank"] for r in job["ranks"]] == [0, 1]
    assert job["ranks"][1]["knobs"] == {"betas": [0.9, 0.99], "lr": 0.1}
    assert job["ranks"][1]["last_heartbeat_s"] == 5.0
    assert job["ranks"][0]["state"] == "paused"
    assert (job["ranks"][0]["health"], job["ranks"][0]["health_reason"]) == ("healthy", None)
    assert {"rank", "step", "knobs", "last_heartbeat_s"} <= set(job["ranks"][0])


def test_human_forms_mention_every_rank() -> None:
    text = submit_cmd.format_outcome(_outcome(OutcomeStatus.APPLIED))
    assert "rank 0: applied at step 61" in text and "rank 1: applied at step 61" in text
    table = cli.format_status(
        StatusReply(
            jobs=(
                JobStatus(job="demo", world_size=1, ranks=(RankStatus(rank=0, step=7, knobs={"lr": 0.5}),)),
            )
        ),
        now_s=100.0,
    )
    assert "demo" in table and "lr=0.5" in table
    # A stopped rank still says "running"; its health is what the weaver concludes, with why.
    stalled = cli.format_status(
        StatusReply(
            jobs=(
                JobStatus(
                    job="demo",
                    world_size=2,
                    ranks=(
                        RankStatus(
                            rank=0, step=7, health="waiting", health_reason="waiting on rank 1 (dead)"
                        ),
                        RankStatus(
                            rank=1, step=7, alive=False, health="dead", health_reason="no heartbeat for 0.8 s"
                        ),
                    ),
                ),
            )
        ),
        now_s=100.0,
    )
    assert (
        "  rank 0 waiting: waiting on rank 1 (dead)" in stalled
        and "  rank 1 dead: no heartbeat for 0.8 s" in stalled
    )
    assert [line.split()[4] for line in stalled.splitlines()[2:4]] == ["waiting", "dead"]
    assert "no jobs" in cli.format_status(StatusReply())


def test_watch_lines_and_metrics_rate_limit() -> None:
    m0 = StepMetrics(job="demo", run_id="r", rank=0, step=1, values={"loss": 1.5})
    m1 = StepMetrics(job="demo", run_id="r", rank=1, step=1, values={"loss": 1.5})
    ev = JobEvent(job="demo", kind="rank_joined", message="rank 0")
    assert cli.format_watch_event(m0) == "metrics demo rank 0 step 1 loss=1.5"
    assert "rank_joined: rank 0" in cli.format_watch_event(ev)
    limiter = cli.MetricsLimiter(interval_s=1.0)
    assert limiter.allow(m0, 10.0)
    assert not limiter.allow(m0, 10.5)
    assert limiter.allow(m1, 10.5)  # per rank
    assert limiter.allow(ev, 10.5)  # events are never dropped
    assert limiter.allow(m0, 11.0)


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`torchloom journal | head -3`: the pipe closes under the printing command; the CLI exits
    141 (SIGPIPE's status) without a traceback, and its exit flush does not fail either."""
    script = (
        "import sys\n"
        "from torchloom.app import cli\n"
        "def many(args):\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "cli._run_command = many\n"
        "sys.exit(cli.main(['status']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
