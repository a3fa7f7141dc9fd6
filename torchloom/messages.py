"""Plain, frozen Python forms of every protocol message; `torchloom.wire` converts them to bytes.

The rest of the code works with these and never sees generated protobuf classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

KnobValue = float | int | bool | str | tuple[float, ...]


class ActionKind(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    CHECKPOINT = "checkpoint"
    ROLLBACK = "rollback"
    STOP = "stop"
    EVAL = "eval"
    DATA_ADD = "data_add"
    FAULT_INJECT = "fault_inject"


class AckStatus(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"


class OutcomeStatus(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    REJECTED = "rejected"
    TIMEOUT = "timeout"


class RankState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


class KnobType(StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STR = "str"
    FLOAT_LIST = "float_list"


@dataclass(frozen=True, slots=True, kw_only=True)
class Issuer:
    kind: str = "cli"
    identity: str = ""
    # The identity a gRPC client claimed when its token authenticated it as another (journaled only).
    claimed_identity: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SetConfig:
    """Knob assignments; keys are `name` or `name@group`."""

    values: Mapping[str, KnobValue]


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    kind: ActionKind
    args: Mapping[str, str] = field(default_factory=dict)


Body = SetConfig | Action


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    command_id: str
    job: str
    run_id: str
    seq: int
    issuer: Issuer
    issued_at_s: float
    body: Body
    # Ed25519 by the weaver's key over the command with this field empty (torchloom.signing).
    signature: bytes = b""
    # Where the job's ranks ack it: subjects.ack_capture(ack_token, job); "" from an older weaver.
    ack_token: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    command_id: str
    job: str
    run_id: str
    seq: int
    rank: int
    incarnation: str
    status: AckStatus
    reason: str = ""
    step: int = 0
    decided_at_s: float = 0.0
    received_at_s: float = 0.0
    detail: Mapping[str, str] = field(default_factory=dict)
    branch: str = ""
    # This rank would have applied it; another rank refused, so the group did not (`reason` says so
    # in words; code reads this flag).
    refused_by_peer: bool = False
    # This rank refused a message on its command subject whose signature did not verify: nothing
    # was filed or applied (the weaver journals it; it never counts toward an outcome).
    unverified: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class KnobSpec:
    """A knob's schema (type, bounds, groups) and, when reported by a rank, its current value."""

    name: str
    type: KnobType
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    description: str = ""
    value: KnobValue | None = None
    groups: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceHealth:
    kind: str = "cpu"
    device: str = ""
    index: int = 0
    nvml_available: bool = False
    utilization_pct: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    temperature_c: float = 0.0
    power_w: float = 0.0
    ecc_volatile_uncorrected: int = 0
    ecc_volatile_corrected: int = 0
    remapped_rows_pending: int = 0
    remapped_rows_failed: int = 0
    clock_event_reasons: int = 0
    pcie_replay_count: int = 0
    xids: tuple[int, ...] = ()
    healthy: bool = True
    unhealthy_reason: str = ""
    cpu_load_pct: float = 0.0
    rss_bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    job: str
    run_id: str
    rank: int
    world_size: int
    local_rank: int = 0
    incarnation: str
    host: str = ""
    pid: int = 0
    step: int = 0
    state: RankState = RankState.RUNNING
    sent_at_s: float = 0.0
    step_time_s: float = 0.0
    last_seq: int = 0
    knobs: tuple[KnobSpec, ...] = ()
    device: DeviceHealth | None = None
    branch: str = ""
    tick: int = 0
    fault_injection_allowed: bool = False
    # `knobs` only when the schema changed or is due again; else its hash and the current values.
    knobs_hash: int = 0
    knob_values: Mapping[str, KnobValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepMetrics:
    job: str
    run_id: str
    rank: int
    step: int
    branch: str = ""
    time_s: float = 0.0
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    job: str
    run_id: str = ""
    kind: str
    message: str = ""
    time_s: float = 0.0
    command_id: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartRequest:
    """The weaver's health policy asking the job's launcher to restart a run on the healthy ranks.

    Attributes:
        run_id: the attempt it is about (a stale request names an older attempt).
        world_size: ranks of the next attempt.
        exclude_ranks: ranks whose devices are not used again.
        grad_accum_steps: the value the next attempt starts with (0: unchanged).
        checkpoint_id: the checkpoint to resume from (`ckpt-<seq>`); "" when there is none.
        checkpoint_path: where the ranks wrote it, when they said; "" otherwise.
        steps_lost: steps redone, as the weaver computed them.
        reason: why, for humans.
        time_s: when the weaver sent it (unix seconds).
    """

    job: str
    run_id: str
    world_size: int
    exclude_ranks: tuple[int, ...] = ()
    grad_accum_steps: int = 0
    checkpoint_id: str = ""
    checkpoint_path: str = ""
    steps_lost: int = 0
    reason: str = ""
    time_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RankResult:
    rank: int
    status: AckStatus
    step: int = 0
    reason: str = ""
    received_at_s: float = 0.0
    decided_at_s: float = 0.0
    detail: Mapping[str, str] = field(default_factory=dict)
    branch: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    command_id: str
    job: str
    status: OutcomeStatus
    reason: str = ""
    results: tuple[RankResult, ...] = ()
    command: Command | None = None
    submitted_at_s: float = 0.0
    published_at_s: float = 0.0
    completed_at_s: float = 0.0
    # Who asked; for a refused attempt (command is None) the only record of the submitter.
    issuer: Issuer | None = None
    run_id: str = ""
    # A refused attempt's body as submitted (what was asked); None for a sequenced command (its
    # body is `command.body`) and for a body too large to journal (`wire.BODY_MAX_BYTES`).
    attempted: Body | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    """A command to submit. `command_id` names it across retries (the CLI sends a uuid4 hex); the
    weaver decides an id once and answers a repeat with that decision. Empty: the weaver makes one."""

    body: Body
    job: str = ""
    issuer: Issuer = field(default_factory=Issuer)
    timeout_s: float = 0.0
    command_id: str = ""
    reason: str = ""  # the issuer's free-text reason (an agent's), journaled with its proposal


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    job: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStatus:
    rank: int
    step: int = 0
    state: RankState = RankState.RUNNING
    last_heartbeat_s: float = 0.0
    host: str = ""
    pid: int = 0
    incarnation: str = ""
    knobs: Mapping[str, KnobValue] = field(default_factory=dict)
    device: DeviceHealth | None = None
    step_time_s: float = 0.0
    alive: bool = True
    local_rank: int = 0
    health: str = "healthy"
    health_reason: str = ""
    branch: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    id: str
    tag: str = ""
    step: int = 0
    branch: str = ""
    path: str = ""
    created_at_s: float = 0.0
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BranchInfo:
    id: str
    parent: str = ""
    from_checkpoint: str = ""
    fork_step: int = 0
    created_at_s: float = 0.0
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    job: str
    run_id: str = ""
    world_size: int = 0
    ranks: tuple[RankStatus, ...] = ()
    knobs: tuple[KnobSpec, ...] = ()
    last_seq: int = 0
    checkpoints: tuple[CheckpointInfo, ...] = ()
    branches: tuple[BranchInfo, ...] = ()
    branch: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    jobs: tuple[JobStatus, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchRequest:
    job: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalRequest:
    """Which journal entries to stream: of one job/run (or all for ""), or one command's only."""

    job: str = ""
    follow: bool = False
    run_id: str = ""
    command_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRequest:
    """Set (`text`: the policy's TOML; "" turns rules off) or read the autopilot policy of `job`
    ("": the only running job)."""

    job: str = ""
    text: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyReply:
    """A job's autopilot policy (`name` "" when it runs without rules) and the proposals waiting for
    a person (their "rule_proposed" events)."""

    job: str
    name: str = ""
    text: str = ""
    proposals: tuple[JobEvent, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposalDecision:
    """A person's answer to an autopilot proposal: approve sends its commands, refuse sends none."""

    proposal_id: str
    approve: bool
    job: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentRefusal:
    """An agent's record of a model reply it refused (nothing was proposed), for the journal."""

    reason: str
    job: str = ""
    reply: str = ""


WatchEvent = StepMetrics | JobEvent | Outcome
