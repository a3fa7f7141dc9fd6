"""The weaver's Prometheus series bookkeeping (weaver/metrics.py): gauges read from a real weaver
state's status, counters and latencies fed through the observe calls, series gone with their job,
bounded labels, and the loopback-only bind."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit import factories as f
from torchloom.messages import (
    DeviceHealth,
    Issuer,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StatusReply,
    StepMetrics,
    SubmitRequest,
)
from weaver import admission, liveness
from weaver.config import WeaverConfig
from weaver.health_policy import HealthKind, HealthPolicy
from weaver.metrics import MAX_RULES_PER_JOB, METRIC_NAMES, WeaverMetrics, check_bind
from weaver.model import WeaverState

NOW = 1_000.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Setup:
    """A weaver state fed real heartbeats, and the metrics reading it the way `Weaver` wires them."""

    def __init__(self) -> None:
        self.state = WeaverState()
        self.refusals = admission.Refusals()
        self.now = NOW
        self.metrics = WeaverMetrics(
            self.status,
            self.refusals.total,
            lambda: {n: len(j.pending) for n, j in self.state.jobs.items()},
        )

    def status(self) -> StatusReply:
        return liveness.status(self.state, "", self.now, HealthPolicy(dead_after_s=5.0))

    def beat(self, rank: int, **fields: object) -> None:
        liveness.observe_heartbeat(self.state, f.heartbeat(rank, **fields), self.now)  # type: ignore[arg-type]

    def samples(self) -> Samples:
        text = self.metrics.exposition().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def req(job: str = f.JOB, kind: str = "cli") -> SubmitRequest:
    return SubmitRequest(job=job, body=SetConfig(values={"lr": 0.1}), issuer=Issuer(kind=kind))


def outcome(status: OutcomeStatus, *, job: str = f.JOB, kind: str = "cli", took_s: float = 0.3) -> Outcome:
    return Outcome(
        command_id="c1",
        job=job,
        status=status,
        issuer=Issuer(kind=kind),
        submitted_at_s=NOW,
        completed_at_s=NOW + took_s,
    )


def test_rank_and_device_gauges_of_both_ranks() -> None:
    s = Setup()
    gpu = DeviceHealth(
        kind="cuda",
        device="cuda:1",
        index=1,
        utilization_pct=87.0,
        memory_used_bytes=3 << 30,
        memory_total_bytes=16 << 30,
        temperature_c=71.0,
        xids=(79, 48),
    )
    s.beat(0, step=12, step_time_s=0.25)
    s.beat(1, step=11, step_time_s=0.5, device=gpu)
    s.now += 2.0
    s.metrics.observe_step_metrics(
        StepMetrics(job=f.JOB, run_id=f.RUN, rank=1, step=11, values={"loss": 0.75})
    )
    got = s.samples()
    assert at(got, "torchloom_rank_step", job=f.JOB, rank="0") == 12
    assert at(got, "torchloom_rank_step", job=f.JOB, rank="1") == 11
    assert at(got, "torchloom_rank_step_time_seconds", job=f.JOB, rank="1") == 0.5
    assert at(got, "torchloom_rank_heartbeat_age_seconds", job=f.JOB, rank="0") == pytest.approx(2.0)
    assert at(got, "torchloom_rank_alive", job=f.JOB, rank="0") == 1
    assert at(got, "torchloom_rank_loss", job=f.JOB, rank="1") == 0.75
    assert ("torchloom_rank_loss", frozenset({("job", f.JOB), ("rank", "0")})) not in got
    for kind in HealthKind:
        want = 1.0 if kind is HealthKind.HEALTHY else 0.0
        assert at(got, "torchloom_rank_health", job=f.JOB, rank="0", health=kind.value) == want
    dev = {"job": f.JOB, "rank": "1", "device": "cuda:1"}
    assert at(got, "torchloom_device_utilization_percent", **dev) == 87.0
    assert at(got, "torchloom_device_memory_used_bytes", **dev) == 3 << 30
    assert at(got, "torchloom_device_memory_total_bytes", **dev) == 16 << 30
    assert at(got, "torchloom_device_temperature_celsius", **dev) == 71.0
    assert at(got, "torchloom_device_xid_count", **dev) == 2
    assert at(got, "torchloom_job_world_size", job=f.JOB) == 2
    assert at(got, "torchloom_jobs") == 1
    # A dead rank: alive 0 and its health kind says so.
    s.now += 10.0
    got = s.samples()
    assert at(got, "torchloom_rank_alive", job=f.JOB, rank="0") == 0
    assert at(got, "torchloom_rank_health", job=f.JOB, rank="0", health="dead") == 1


def test_loss_goes_with_its_run() -> None:
    s = Setup()
    s.beat(0)
    s.metrics.observe_step_metrics(StepMetrics(job=f.JOB, run_id=f.RUN, rank=0, step=1, values={"loss": 2.0}))
    assert at(s.samples(), "torchloom_rank_loss", job=f.JOB, rank="0") == 2.0
    s.beat(0, run="r2")  # a new run of the job: the old run's loss is not this rank's any more
    assert "torchloom_rank_loss" not in names(s.samples())


def test_commands_counted_by_issuer_and_status_with_latency() -> None:
    s = Setup()
    s.beat(0)
    s.beat(1)
    s.metrics.observe_submit(req(kind="cli"))
    s.metrics.observe_submit(req(job="", kind="ui"))  # "" names the only job
    s.metrics.observe_submit(req(kind="made-up-kind"))
    s.metrics.observe_outcome(outcome(OutcomeStatus.APPLIED, took_s=0.3))
    s.metrics.observe_outcome(outcome(OutcomeStatus.REJECTED, kind="rule", took_s=2.0))
    s.metrics.observe_outcome(outcome(OutcomeStatus.TIMEOUT, took_s=60.0))
    got = s.samples()
    submitted = "torchloom_commands_submitted_total"
    assert at(got, submitted, job=f.JOB, issuer="cli") == 1
    assert at(got, submitted, job=f.JOB, issuer="ui") == 1
    assert at(got, submitted, job=f.JOB, issuer="other") == 1
    outcomes = "torchloom_command_outcomes_total"
    assert at(got, outcomes, job=f.JOB, issuer="cli", status="applied") == 1
    assert at(got, outcomes, job=f.JOB, issuer="rule", status="rejected") == 1
    assert at(got, outcomes, job=f.JOB, issuer="cli", status="timeout") == 1
    # Only final outcomes have a latency: the timeout was the submitter's, not the command's.
    assert at(got, "torchloom_command_latency_seconds_count", job=f.JOB) == 2
    assert at(got, "torchloom_command_latency_seconds_sum", job=f.JOB) == pytest.approx(2.3)
    assert at(got, "torchloom_command_latency_seconds_bucket", job=f.JOB, le="0.5") == 1
    assert at(got, "torchloom_command_latency_seconds_bucket", job=f.JOB, le="2.5") == 2


def test_unknown_job_names_never_become_series() -> None:
    s = Setup()
    s.beat(0)
    for i in range(50):
        s.metrics.observe_submit(req(job=f"nosuch{i}"))
        s.metrics.observe_outcome(outcome(OutcomeStatus.REJECTED, job=f"nosuch{i}"))
    got = s.samples()
    assert at(got, "torchloom_commands_submitted_total", job=admission.WEAVER_JOB, issuer="cli") == 50
    jobs = {dict(labels).get("job") for name, labels in got if name.startswith("torchloom_command")}
    assert jobs == {admission.WEAVER_JOB}


def test_evicted_job_loses_every_series() -> None:
    s = Setup()
    s.beat(0)
    s.beat(0, job="other")
    s.metrics.observe_step_metrics(StepMetrics(job=f.JOB, run_id=f.RUN, rank=0, step=1, values={"loss": 1.0}))
    for job in (f.JOB, "other"):
        s.metrics.observe_submit(req(job=job))
        s.metrics.observe_outcome(outcome(OutcomeStatus.APPLIED, job=job))
        s.metrics.rule_fired(job, "lr-decay")
    assert s.metrics.series_jobs() == {f.JOB, "other"}
    # Only `f.JOB` goes quiet past the eviction age; `other` keeps beating.
    s.now += 120.0
    s.beat(0, job="other")
    gone = admission.evict_dead_jobs(s.state, s.now, 5.0, admission.Limits(job_evict_after_s=60.0))
    assert gone == (f.JOB,)
    s.metrics.forget_jobs(gone)
    got = s.samples()
    assert s.metrics.series_jobs() == {"other"}
    assert {dict(labels).get("job") for _, labels in got} - {None} == {"other"}
    assert at(got, "torchloom_rule_firings_total", job="other", rule="lr-decay") == 1


def test_rule_names_are_bounded_per_job() -> None:
    s = Setup()
    s.beat(0)
    for i in range(MAX_RULES_PER_JOB + 10):
        s.metrics.rule_fired(f.JOB, f"rule{i}")
    got = s.samples()
    rules = {dict(labels)["rule"] for name, labels in got if name == "torchloom_rule_firings_total"}
    assert len(rules) == MAX_RULES_PER_JOB + 1
    assert at(got, "torchloom_rule_firings_total", job=f.JOB, rule="other") == 10


def test_refusals_by_kind() -> None:
    s = Setup()
    for _ in range(3):
        s.refusals.note("heartbeat", admission.WEAVER_JOB, "", "bad", NOW)
    s.refusals.note("ack", admission.WEAVER_JOB, "", "bad", NOW)
    got = s.samples()
    assert at(got, "torchloom_refusals_total", kind="heartbeat") == 3
    assert at(got, "torchloom_refusals_total", kind="ack") == 1


def test_every_exported_name_is_declared() -> None:
    s = Setup()
    s.beat(0, device=DeviceHealth(kind="cpu", device="cpu"))
    s.metrics.observe_step_metrics(StepMetrics(job=f.JOB, run_id=f.RUN, rank=0, step=1, values={"loss": 1.0}))
    s.metrics.observe_submit(req())
    s.metrics.observe_outcome(outcome(OutcomeStatus.APPLIED))
    s.metrics.rule_fired(f.JOB, "r")
    s.refusals.note("ack", admission.WEAVER_JOB, "", "bad", NOW)
    exported = names(s.samples()) - {n for n in names(s.samples()) if n.endswith("_created")}
    assert exported == METRIC_NAMES


def test_two_weavers_never_share_series() -> None:
    a, b = Setup(), Setup()
    a.beat(0)
    b.beat(0)
    a.metrics.observe_submit(req())
    assert "torchloom_commands_submitted_total" not in names(b.samples())


def test_bind_is_loopback_unless_allowed() -> None:
    check_bind("127.0.0.1", 0, allow_remote=False)
    check_bind("::1", 9100, allow_remote=False)
    check_bind("0.0.0.0", 9100, allow_remote=True)
    with pytest.raises(ValueError, match=r"metrics_host='0.0.0.0' rejected.*metrics_allow_remote"):
        check_bind("0.0.0.0", 9100, allow_remote=False)
    with pytest.raises(ValueError, match=r"metrics_port=70000 rejected: must be in \[0, 65535\]"):
        check_bind("127.0.0.1", 70000, allow_remote=False)
    with pytest.raises(ValueError, match=r"metrics_host='10\.0\.0\.5' rejected"):
        WeaverConfig(metrics_port=9100, metrics_host="10.0.0.5")
    assert (
        WeaverConfig(metrics_port=9100, metrics_host="10.0.0.5", metrics_allow_remote=True).metrics_port
        == 9100
    )
    assert WeaverConfig().metrics_port is None  # off unless asked


def test_a_scrape_copies_the_state_so_its_text_can_be_made_off_the_event_loop() -> None:
    s = Setup()
    s.beat(0, step=3)
    s.metrics.observe_step_metrics(StepMetrics(job=f.JOB, run_id=f.RUN, rank=0, step=3, values={"loss": 2.5}))
    scrape = s.metrics.scrape()
    before = s.metrics.render(scrape)
    s.beat(0, step=9)  # the weaver moves on while the text is made (in a thread)
    s.beat(1, step=9)
    s.metrics.observe_step_metrics(StepMetrics(job=f.JOB, run_id=f.RUN, rank=0, step=9, values={"loss": 1.0}))
    assert s.metrics.render(scrape) == before  # the text reads the scrape alone
    text = before.decode()
    assert f'torchloom_rank_step{{job="{f.JOB}",rank="0"}} 3.0' in text
    assert f'torchloom_rank_loss{{job="{f.JOB}",rank="0"}} 2.5' in text and 'rank="1"' not in text
    assert at(s.samples(), "torchloom_rank_step", job=f.JOB, rank="1") == 9.0  # a new scrape sees it
