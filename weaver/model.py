"""The weaver's state: every job it has heard of, each job's current run, ranks and in-flight commands.

Plain mutable dataclasses and no decisions. The functions of `weaver.liveness`, `weaver.submits`,
`weaver.outcomes`, `weaver.health_plan` and `weaver.recovery` read and update them; each of those
modules says which of its functions are pure and which mutate the state passed in. Only
`weaver.service` holds a live `WeaverState`, on one event loop, so an update is never interleaved
with another. Times are unix seconds.

Pure: `job_event(job, kind, message, now, **attrs)` builds an event of the job's current run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchloom.messages import Ack, Command, Heartbeat, JobEvent, KnobSpec, Outcome
from weaver import health_policy as hp
from weaver import registry as rg


@dataclass(slots=True, kw_only=True)
class RankEntry:
    """What the weaver knows of one rank of the current run: its last heartbeat and when it came."""

    heartbeat: Heartbeat
    last_seen_s: float
    last_step_change_at: float = 0.0
    finished_reported: bool = False
    health: hp.HealthKind = hp.HealthKind.HEALTHY
    health_reason: str = ""
    stalled_at_s: float = 0.0  # last health check that found it stalled (see `RankView.stalled_at`)
    excused_at_s: float = 0.0  # last health check that found it dead or waiting (`RankView.excused_at`)

    @property
    def incarnation(self) -> str:
        return self.heartbeat.incarnation


@dataclass(slots=True, kw_only=True)
class Pending:
    """A published command waiting for one ack per rank."""

    command: Command
    world_size: int
    submitted_at_s: float
    published_at_s: float = 0.0
    acks: dict[int, Ack] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class JobState:
    """One job and its current run.

    Attributes:
        last_seq: the highest seq assigned (or seen) in this run.
        seq_known: last_seq has been checked against the commands stream, so a new seq is safe.
        last_stream_seq: stream sequence of the run's last message in the commands stream; a
            publish expects it (Nats-Expected-Last-Subject-Sequence) so two weavers never share a seq.
        retired_runs: earlier run ids of this job; their late heartbeats and acks are ignored.
        registry: checkpoints, branches and data sources of the run.
        phase, alerted: the health policy's recovery state (see `health_policy.JobSnapshot`).
        scaled_from: the previous attempt's world, while this attempt of the same run started with
            another world size and not all its ranks have reported yet (see `scale_event`).
        announced: what the journal already says of each rank of this run: the incarnation it
            last joined as, and whether that incarnation finished. A restarted weaver rebuilds it
            from the journal, so a rank's first heartbeat after the restart adds no second
            "rank_joined" (or "rank_finished") for what the journal holds once already.
    """

    job: str
    run_id: str
    world_size: int
    started_at_s: float
    ranks: dict[int, RankEntry] = field(default_factory=dict)
    knobs: tuple[KnobSpec, ...] = ()
    last_seq: int = 0
    seq_known: bool = False
    last_stream_seq: int = 0
    pending: dict[int, Pending] = field(default_factory=dict)
    retired_runs: set[str] = field(default_factory=set)
    registry: rg.Registry = field(default_factory=rg.Registry)
    phase: hp.Phase = hp.Phase.IDLE
    alerted: frozenset[str] = frozenset()
    scaled_from: PreviousWorld | None = None
    announced: dict[int, Announced] = field(default_factory=dict)


@dataclass(slots=True)
class Announced:
    """One rank as the journal tells it: the incarnation it joined as, and whether it finished."""

    incarnation: str
    finished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PreviousWorld:
    """The world of the attempt a new attempt replaced: its run id, size and each rank's host."""

    run_id: str
    world_size: int
    hosts: tuple[str, ...]  # by rank; "" where a rank never reported


@dataclass(slots=True)
class WeaverState:
    """Every job the weaver has heard of, by name, and the recent decisions by command id.

    Attributes:
        decided: final outcomes (and refusals) by command id, oldest first, so a repeated submit is
            answered with its decision instead of being sequenced again (see `weaver.dedupe`).
    """

    jobs: dict[str, JobState] = field(default_factory=dict)
    decided: dict[str, Outcome] = field(default_factory=dict)


def job_event(job: JobState, kind: str, message: str, now: float, **attrs: str) -> JobEvent:
    """An event `kind` of the job's current run, at `now`."""
    return JobEvent(job=job.job, run_id=job.run_id, kind=kind, message=message, time_s=now, attrs=attrs)
