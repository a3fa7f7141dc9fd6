"""The weaver's Prometheus metrics: per job, rank and device gauges, command counters and latencies,
and the HTTP endpoint (`/metrics`, loopback unless a remote bind is allowed) Prometheus scrapes.

Each weaver owns a `WeaverMetrics` with its own `CollectorRegistry` (never the process-global one, so
two weavers in one process never share series). Rank and device gauges are read at scrape time from
the weaver's status snapshot, the view `torchloom status` and the UI show, so a rank's series go when
its job or run does; the counters and histograms are fed by the weaver's observe paths and forgotten
with their job on eviction (`forget_jobs`). Labels are only job, rank and device, plus small closed
sets (issuer kind, outcome status, health kind, refusal kind, rule name), so the number of series is
bounded by the weaver's own limits on jobs and ranks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from torchloom import naming
from torchloom.messages import (
    Issuer,
    JobStatus,
    Outcome,
    OutcomeStatus,
    StatusReply,
    StepMetrics,
    SubmitRequest,
)
from weaver.admission import WEAVER_JOB
from weaver.grpc_api import is_loopback
from weaver.health_policy import HealthKind

log = logging.getLogger(__name__)

__all__ = [
    "ISSUER_KINDS",
    "LATENCY_BUCKETS_S",
    "METRIC_NAMES",
    "MetricsServer",
    "WeaverMetrics",
    "check_bind",
]

# Issuer kinds counted under their own name; any other kind a client claims counts as "other", so a
# client cannot grow the series without bound.
ISSUER_KINDS = frozenset({"cli", "ui", "rule", "replay", "agent", "api", "sdk", naming.SEARCH_ISSUER})
OTHER = "other"
# Submit -> outcome: a command waits for a step boundary on every rank, so tens of ms to minutes.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_RULES_PER_JOB = 64  # rule names past this count as "other"

# Every metric name the weaver exports (as scraped: counters with _total, histograms with their
# _bucket/_sum/_count), for the Grafana dashboard's test and the README.
_RANK_GAUGES = {
    "torchloom_rank_step": "The rank's last reported optimizer step.",
    "torchloom_rank_step_time_seconds": "The rank's last reported step time.",
    "torchloom_rank_loss": "The rank's last reported loss (StepMetrics value 'loss').",
    "torchloom_rank_heartbeat_age_seconds": "Seconds since the rank's last heartbeat.",
    "torchloom_rank_alive": "1 while the rank's heartbeats are fresh, else 0.",
}
_DEVICE_GAUGES = {
    "torchloom_device_utilization_percent": "Device (GPU) utilization, or CPU load on a CPU rank.",
    "torchloom_device_memory_used_bytes": "Device memory in use (the host's on a CPU rank).",
    "torchloom_device_memory_total_bytes": "Device memory in total (the host's on a CPU rank).",
    "torchloom_device_temperature_celsius": "Device temperature (0 where unknown).",
    "torchloom_device_xid_count": "XID errors the rank's device reported in its last heartbeat.",
    "torchloom_device_healthy": "1 while the rank's device reports healthy, else 0.",
}
METRIC_NAMES = frozenset(
    {
        *_RANK_GAUGES,
        *_DEVICE_GAUGES,
        "torchloom_rank_health",
        "torchloom_job_world_size",
        "torchloom_job_commands_in_flight",
        "torchloom_jobs",
        "torchloom_refusals_total",
        "torchloom_commands_submitted_total",
        "torchloom_command_outcomes_total",
        "torchloom_rule_firings_total",
        *(f"torchloom_command_latency_seconds{s}" for s in ("_bucket", "_sum", "_count")),
    }
)


def issuer_label(issuer: Issuer | None) -> str:
    """The issuer kind as a label: one of `ISSUER_KINDS`, else "other"."""
    kind = issuer.kind if issuer is not None else ""
    return kind if kind in ISSUER_KINDS else OTHER


def check_bind(host: str, port: int, *, allow_remote: bool) -> None:
    """Raise ValueError unless `host:port` is a bind the metrics endpoint may use."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"metrics_port={port!r} rejected: must be in [0, 65535] (0 picks a free port)")
    if not allow_remote and not is_loopback(host):
        raise ValueError(
            f"metrics_host={host!r} rejected: the metrics endpoint binds loopback (127.0.0.1) unless a "
            "remote bind is allowed explicitly (metrics_allow_remote, --metrics-allow-remote)"
        )


class WeaverMetrics:
    """The metrics of one weaver.

    Args:
        snapshot: the weaver's status of every job (`Weaver.status`), read at each scrape.
        refusals: refusal totals by kind (`admission.Refusals.total`), read at each scrape.
        in_flight: commands in flight by job, read at each scrape.
    """

    def __init__(
        self,
        snapshot: Callable[[], StatusReply],
        refusals: Mapping[str, int],
        in_flight: Callable[[], Mapping[str, int]],
    ) -> None:
        # The counters and histograms (thread-safe) apart from the gauges read off the weaver's
        # state, so a scrape takes that state on the event loop and formats the text off it.
        self._counters = CollectorRegistry(auto_describe=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = snapshot
        self._refusals = refusals
        self._in_flight = in_flight
        self._loss: dict[tuple[str, int], tuple[str, float]] = {}  # (job, rank) -> (run id, loss)
        self._labels: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        self._rules: dict[str, set[str]] = {}
        self.serving = 0  # open `MetricsServer`s: step metrics are decoded for the loss only then
        self.submitted = Counter(
            "torchloom_commands_submitted",
            "Submit requests (a repeat of a command id counts again), by issuer kind.",
            ["job", "issuer"],
            registry=self._counters,
        )
        self.outcomes = Counter(
            "torchloom_command_outcomes",
            "Decided commands by status (applied, rejected, timeout: the submitter's deadline passed).",
            ["job", "issuer", "status"],
            registry=self._counters,
        )
        self.latency = Histogram(
            "torchloom_command_latency_seconds",
            "Seconds from a command's submit to its final outcome (applied or rejected).",
            ["job"],
            buckets=LATENCY_BUCKETS_S,
            registry=self._counters,
        )
        self.rule_firings = Counter(
            "torchloom_rule_firings",
            "Times a rule of the rules engine fired, by job and rule.",
            ["job", "rule"],
            registry=self._counters,
        )
        self.registry.register(_Joined(self._counters, self.scrape))

    # ---- the observe paths ----------------------------------------------------------------------

    def _job_label(self, job: str) -> str:
        """`job` when the weaver knows it, else the weaver's own name: a submit may name any job,
        and a made-up name must not become a series."""
        return job if job in self._known_jobs() else WEAVER_JOB

    def _known_jobs(self) -> set[str]:
        return set(self._in_flight())

    def _inc(self, metric: Counter, labels: tuple[str, ...]) -> None:
        metric.labels(*labels).inc()
        self._labels.setdefault(labels[0], set()).add((metric, labels))

    def observe_submit(self, req: SubmitRequest) -> None:
        """Count a submit request."""
        known = self._known_jobs()
        job = req.job if req.job in known else (next(iter(known)) if not req.job and len(known) == 1 else "")
        self._inc(self.submitted, (job or WEAVER_JOB, issuer_label(req.issuer)))

    def observe_outcome(self, outcome: Outcome) -> None:
        """Count a decision (final, or a submitter's timeout) and observe its latency when final."""
        issuer = outcome.issuer or (outcome.command.issuer if outcome.command is not None else None)
        job = self._job_label(outcome.job)
        self._inc(self.outcomes, (job, issuer_label(issuer), outcome.status.value))
        final = outcome.status in (OutcomeStatus.APPLIED, OutcomeStatus.REJECTED)
        if final and outcome.submitted_at_s > 0 and outcome.completed_at_s >= outcome.submitted_at_s:
            self.latency.labels(job).observe(outcome.completed_at_s - outcome.submitted_at_s)
            self._labels.setdefault(job, set()).add((self.latency, (job,)))

    def observe_step_metrics(self, sm: StepMetrics) -> None:
        """Keep the rank's last loss (a StepMetrics without one changes nothing)."""
        loss = sm.values.get("loss")
        if loss is not None:
            self._loss[(sm.job, sm.rank)] = (sm.run_id, float(loss))

    def rule_fired(self, job: str, rule: str) -> None:
        """Count one firing of `rule` for `job` (for the rules engine); past `MAX_RULES_PER_JOB`
        distinct rules of a job, further names count as "other"."""
        job = self._job_label(job)
        rules = self._rules.setdefault(job, set())
        if rule not in rules and len(rules) >= MAX_RULES_PER_JOB:
            rule = OTHER
        rules.add(rule)
        self._inc(self.rule_firings, (job, rule))

    def forget_jobs(self, jobs: Iterable[str]) -> None:
        """Remove every series of `jobs` (evicted by the weaver)."""
        for job in jobs:
            for metric, labels in self._labels.pop(job, set()):
                with contextlib.suppress(KeyError):
                    metric.remove(*labels)
            self._rules.pop(job, None)
            for key in [k for k in self._loss if k[0] == job]:
                del self._loss[key]

    def series_jobs(self) -> set[str]:
        """Jobs that have counter or histogram series now (for tests and debugging)."""
        return {job for job, labels in self._labels.items() if labels}

    # ---- scraping -------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric, as `/metrics` serves it."""
        return self.render(self.scrape())

    def scrape(self) -> Scrape:
        """What a scrape reads of the weaver's state, copied (on the event loop, between callbacks)."""
        reply = self._snapshot()
        current = {(j.job, r.rank): j.run_id for j in reply.jobs for r in j.ranks}
        for key in [k for k, (run, _) in self._loss.items() if current.get(k) != run]:
            del self._loss[key]  # its job, run or rank is gone
        return Scrape(
            reply=reply,
            loss=dict(self._loss),
            in_flight=dict(self._in_flight()),
            refusals=tuple(sorted(self._refusals.items())),
        )

    def render(self, scrape: Scrape) -> bytes:
        """The text exposition of `scrape` and the counters. Reads no weaver state, so it may run
        in a thread: at 1,000 ranks the text alone (17,000 series) costs about 0.2 s of CPU."""
        return generate_latest(_Joined(self._counters, lambda: scrape))

    def state_families(self, scrape: Scrape | None = None) -> Iterator[Metric]:
        """The gauges read from the weaver's snapshot (`scrape`, else one taken now), and the
        refusal counter."""
        return _state_families(scrape if scrape is not None else self.scrape())


def _rank_families(
    jobs: Iterable[JobStatus], loss: Mapping[tuple[str, int], tuple[str, float]]
) -> Iterator[Metric]:
    fams = {name: GaugeMetricFamily(name, doc, labels=["job", "rank"]) for name, doc in _RANK_GAUGES.items()}
    health = GaugeMetricFamily(
        "torchloom_rank_health",
        "1 for the rank's health kind (the weaver's classification), 0 for the others.",
        labels=["job", "rank", "health"],
    )
    for j in jobs:
        for r in j.ranks:
            labels = [j.job, str(r.rank)]
            fams["torchloom_rank_step"].add_metric(labels, r.step)
            fams["torchloom_rank_step_time_seconds"].add_metric(labels, r.step_time_s)
            fams["torchloom_rank_heartbeat_age_seconds"].add_metric(labels, r.last_heartbeat_s)
            fams["torchloom_rank_alive"].add_metric(labels, 1.0 if r.alive else 0.0)
            if (j.job, r.rank) in loss:
                fams["torchloom_rank_loss"].add_metric(labels, loss[(j.job, r.rank)][1])
            for kind in HealthKind:
                health.add_metric([*labels, kind.value], 1.0 if r.health == kind.value else 0.0)
    yield from fams.values()
    yield health


def _device_families(jobs: Iterable[JobStatus]) -> Iterator[Metric]:
    labels_of = ["job", "rank", "device"]
    fams = {name: GaugeMetricFamily(name, doc, labels=labels_of) for name, doc in _DEVICE_GAUGES.items()}
    for j in jobs:
        for r in j.ranks:
            d = r.device
            if d is None:
                continue
            labels = [j.job, str(r.rank), d.device or f"{d.kind}:{d.index}"]
            cpu = d.kind == "cpu"
            fams["torchloom_device_utilization_percent"].add_metric(
                labels, d.cpu_load_pct if cpu else d.utilization_pct
            )
            fams["torchloom_device_memory_used_bytes"].add_metric(labels, d.memory_used_bytes)
            fams["torchloom_device_memory_total_bytes"].add_metric(labels, d.memory_total_bytes)
            fams["torchloom_device_temperature_celsius"].add_metric(labels, d.temperature_c)
            fams["torchloom_device_xid_count"].add_metric(labels, len(d.xids))
            fams["torchloom_device_healthy"].add_metric(labels, 1.0 if d.healthy else 0.0)
    yield from fams.values()


def _state_families(scrape: Scrape) -> Iterator[Metric]:
    reply = scrape.reply
    yield from _rank_families(reply.jobs, scrape.loss)
    yield from _device_families(reply.jobs)
    in_flight = scrape.in_flight
    world = GaugeMetricFamily("torchloom_job_world_size", "The job's world size.", labels=["job"])
    flight = GaugeMetricFamily(
        "torchloom_job_commands_in_flight", "Commands published and not decided yet.", labels=["job"]
    )
    for j in reply.jobs:
        world.add_metric([j.job], j.world_size)
        flight.add_metric([j.job], in_flight.get(j.job, 0))
    yield world
    yield flight
    yield GaugeMetricFamily("torchloom_jobs", "Jobs the weaver knows.", value=len(reply.jobs))
    refused = CounterMetricFamily(
        "torchloom_refusals", "Messages and requests the weaver refused, by kind.", labels=["kind"]
    )
    for kind, count in scrape.refusals:
        refused.add_metric([kind], count)
    yield refused


@dataclass(frozen=True, slots=True)
class Scrape:
    """The weaver's state as one scrape reads it (`WeaverMetrics.scrape`): copies only."""

    reply: StatusReply
    loss: Mapping[tuple[str, int], tuple[str, float]]
    in_flight: Mapping[str, int]
    refusals: tuple[tuple[str, int], ...]


class _Joined(Collector):
    """The counters, then the state gauges of the scrape `take` returns at each collect."""

    def __init__(self, counters: CollectorRegistry, take: Callable[[], Scrape]) -> None:
        self._counters = counters
        self._take = take

    def collect(self) -> Iterable[Metric]:
        return [*self._counters.collect(), *_state_families(self._take())]


_MAX_REQUEST_BYTES = 8 * 1024
_READ_TIMEOUT_S = 10.0


class MetricsServer:
    """`GET /metrics` over HTTP on the weaver's event loop, so a scrape reads the weaver's state
    between its callbacks, never concurrently with them. Use as `async with MetricsServer(...)`.

    Args:
        metrics: what to serve.
        host, port: where to listen; port 0 picks a free one (see `address`).
        allow_remote: bind a non-loopback host (Prometheus on another machine); off by default,
            like every local server of torchloom.

    Raises:
        ValueError: a non-loopback host without `allow_remote`, or a port out of range.
    """

    def __init__(self, metrics: WeaverMetrics, host: str, port: int, *, allow_remote: bool = False) -> None:
        check_bind(host, port, allow_remote=allow_remote)
        self._metrics = metrics
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """`host:port` it listens on (the bound port when 0 was asked)."""
        return f"{self._host}:{self._port}"

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}/metrics"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._metrics.serving += 1
        log.info("weaver metrics on %s", self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            self._metrics.serving -= 1
            server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        status, ctype, answer = self._answer(head)
        if answer is None:
            # The state is copied here, on the loop, between callbacks; the text (most of a scrape's
            # cost) is made in a thread, so a scrape of 1,000 ranks does not stall heartbeats.
            answer = await asyncio.to_thread(self._metrics.render, self._metrics.scrape())
        body = answer
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await writer.drain()
        writer.close()

    def _answer(self, head: bytes) -> tuple[int, str, bytes | None]:
        """Status, content type and body of the answer to `head`; None: the metrics (`render`)."""
        text = "text/plain; charset=utf-8"
        if len(head) > _MAX_REQUEST_BYTES:
            return 400, text, b"request too large\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return 400, text, b"bad request line\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return 404, text, b"not found: the metrics are at /metrics\n"
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET /metrics\n"
        return 200, CONTENT_TYPE_LATEST, b"" if method == b"HEAD" else None
