"""The weaver believes only what fits: every heartbeat, ack and metrics message is checked against the
subject it came on and against what the weaver knows before it may change any state
(docs/security.md, "What the weaver believes").

Pure: `subject_tokens`, `check_heartbeat`, `check_ack` and `check_metrics` return a refusal reason
(None: admit) and never change the state; `clamp_last_seq` returns a corrected heartbeat.
Mutators: `evict_dead_jobs(state, ...)` removes jobs in place; `Refusals.note` updates its own
counters and says when a refusal is to be announced (rate-limited, so a flood costs one event a
second, not one per message).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Protocol

from torchloom import naming, subjects
from torchloom.messages import Ack, Heartbeat, JobEvent, StepMetrics, SubmitRequest
from weaver.liveness import is_alive
from weaver.model import JobState, WeaverState

# Refusal events about a job the weaver does not know go to this job's event subject.
WEAVER_JOB = "_weaver"
MAX_KNOBS = 256
# A real heartbeat is a few KiB (knob schema, device health); anything far larger is refused unread.
MAX_MESSAGE_BYTES = 256 * 1024


# A client's command id names its command across retries (the CLI and the page send a uuid4 hex;
# a UUID with dashes fits too); an issuer kind says which kind of client it is ("cli", "ui", ...).
COMMAND_ID_FORM = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
ISSUER_KIND_FORM = re.compile(r"[A-Za-z0-9_.-]{0,32}")  # empty: a client that did not say


def oversized(what: str, size: int, subject: str) -> str | None:
    """Why a message of `size` bytes on `subject` is refused unread (over `MAX_MESSAGE_BYTES`),
    naming the bound; None when it fits."""
    if size <= MAX_MESSAGE_BYTES:
        return None
    return f"{what} of {size} bytes on {subject} refused: at most {MAX_MESSAGE_BYTES} bytes"


def _start(text: str, limit: int = 40) -> str:
    """The start of an untrusted `text`, quoted and escaped (`repr`), for a refusal to name it."""
    return f"{text[:limit]!r}{'...' if len(text) > limit else ''}"


def issuer_kind_bad(req: SubmitRequest) -> bool:
    return not ISSUER_KIND_FORM.fullmatch(req.issuer.kind)


def check_submit(req: SubmitRequest) -> str | None:
    """Why a submit's own fields are unusable (a command id or issuer kind that is not of the
    documented form, which the journal and every terminal would carry), or None when they fit."""
    if req.command_id and not COMMAND_ID_FORM.fullmatch(req.command_id):
        return (
            f"command_id {_start(req.command_id)} ({len(req.command_id)} characters) rejected: "
            "expected 1 to 64 characters from A-Z, a-z, "
            "0-9 and '_.:-' (the CLI sends a uuid4 hex), or empty for one the weaver makes"
        )
    if issuer_kind_bad(req):
        return (
            f"issuer kind {_start(req.issuer.kind)} rejected: "
            "expected at most 32 characters from A-Z, a-z, 0-9 and '_.-' (e.g. cli, ui, agent)"
        )
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what the weaver holds, so a flood slows nothing but itself.

    Attributes:
        max_jobs: jobs tracked at once; a new job beyond it is refused (after dead ones are evicted).
        max_ranks_per_job: the largest world size a heartbeat may claim.
        max_ranks_total: rank entries over every job.
        job_evict_after_s: a job with no live rank, no command in flight and no heartbeat for this
            long is forgotten (its journal stays).
    """

    max_jobs: int = 256
    max_ranks_per_job: int = 4096
    max_ranks_total: int = 65536
    job_evict_after_s: float = 300.0


def subject_tokens(subject: str, family: str) -> tuple[str, ...] | None:
    """The tokens after `torchloom.v1.<family>.` of `subject`, or None when it is not of that family."""
    prefix = f"{subjects.PREFIX}.{family}."
    return tuple(subject[len(prefix) :].split(".")) if subject.startswith(prefix) else None


def _live(job: JobState, now: float, dead_after_s: float) -> bool:
    return any(is_alive(e, now, dead_after_s) for e in job.ranks.values())


def _rank_fits(rank: int, world_size: int, limits: Limits) -> str | None:
    if not 1 <= world_size <= limits.max_ranks_per_job:
        return f"world_size={world_size} is outside [1, {limits.max_ranks_per_job}]"
    if not 0 <= rank < world_size:
        return f"rank {rank} is outside [0, {world_size - 1}] (world size {world_size})"
    return None


def check_heartbeat(
    state: WeaverState, hb: Heartbeat, subject: str, now: float, dead_after_s: float, limits: Limits
) -> str | None:
    """Why `hb`, received on `subject`, must not be believed; None when it may be folded in.

    Refused: subject job/rank tokens that differ from the body's; a rank outside [0, world_size);
    a world size outside [1, max_ranks_per_job] or different from the live run's; too many knobs;
    a new run id for a job whose current run has live ranks, unless it is an attempt of that run;
    a new job or rank beyond the limits.
    """
    if not (_token_ok(hb.job) and _token_ok(hb.run_id)):
        return f"job {hb.job[:80]!r} or run id {hb.run_id[:80]!r} is not a valid subject token"
    tokens = subject_tokens(subject, "hb")
    if tokens is None or tokens != (hb.job, str(hb.rank)):
        return f"subject {subject} does not match the body's job {hb.job!r} and rank {hb.rank}"
    bad_rank = _rank_fits(hb.rank, hb.world_size, limits)
    if bad_rank is not None:
        return bad_rank
    if len(hb.knobs) > MAX_KNOBS:
        return f"{len(hb.knobs)} knobs exceed the limit of {MAX_KNOBS}"
    if len(hb.knob_values) > MAX_KNOBS:
        return f"{len(hb.knob_values)} knob values exceed the limit of {MAX_KNOBS}"
    job = state.jobs.get(hb.job)
    if job is None:
        if len(state.jobs) >= limits.max_jobs:
            return f"the weaver tracks {len(state.jobs)} jobs, its limit (max_jobs)"
        return None
    if hb.run_id != job.run_id:
        if hb.run_id in job.retired_runs:
            return None  # ignored by observe_heartbeat, no need to announce
        if _live(job, now, dead_after_s) and not naming.is_attempt_of(hb.run_id, job.run_id):
            return (
                f"run {hb.run_id} is not an attempt of run {job.run_id}, which has live ranks: "
                "a job's run changes only when its ranks are gone or restart as an attempt of it"
            )
        return None
    if hb.world_size != job.world_size and _live(job, now, dead_after_s):
        return f"world_size={hb.world_size} differs from run {job.run_id}'s {job.world_size}"
    entry = job.ranks.get(hb.rank)
    if entry is not None and entry.incarnation != hb.incarnation and is_alive(entry, now, dead_after_s):
        # A restarted process comes back after its predecessor stopped heartbeating (and usually
        # as an attempt of the run); two live processes claiming one rank cannot both be it.
        return f"rank {hb.rank} is alive as incarnation {entry.incarnation}, not {hb.incarnation[:64]!r}"
    if hb.rank not in job.ranks and sum(len(j.ranks) for j in state.jobs.values()) >= limits.max_ranks_total:
        return f"the weaver tracks {limits.max_ranks_total} ranks, its limit (max_ranks_total)"
    return None


def clamp_last_seq(state: WeaverState, hb: Heartbeat) -> tuple[Heartbeat, str | None]:
    """`hb` with its last_seq cut to the last seq published for its run, once that is known (the
    commands stream is the truth), and the reason when it had to be cut."""
    job = state.jobs.get(hb.job)
    if job is None or job.run_id != hb.run_id or not job.seq_known or hb.last_seq <= job.last_seq:
        return hb, None
    reason = f"rank {hb.rank} claims last_seq={hb.last_seq} beyond the last published seq {job.last_seq}"
    return dataclasses.replace(hb, last_seq=job.last_seq), reason


def check_ack(state: WeaverState, ack: Ack, subject: str) -> str | None:
    """Why `ack`, received on `subject`, must not count; None when it may be recorded.

    Counted only on its own job's subject, from a rank inside the run's world, from that rank's
    current incarnation, for a seq this weaver published for the run and still waits on, naming that
    command's id. Acks of other (retired) runs are dropped without a reason: they are normal late
    answers.
    """
    tokens = subject_tokens(subject, "ack")
    if tokens is None or tokens != (ack.job,):
        return f"subject {subject} does not match the body's job {ack.job!r}"
    job = state.jobs.get(ack.job)
    if job is None or job.run_id != ack.run_id:
        return None if job is not None and ack.run_id in job.retired_runs else "no such job or run"
    world = job.world_size
    if not 0 <= ack.rank < max(world, 1):
        return f"rank {ack.rank} is outside [0, {world - 1}] (world size {world})"
    entry = job.ranks.get(ack.rank)
    if entry is None or entry.incarnation != ack.incarnation:
        return f"rank {ack.rank}'s incarnation {ack.incarnation!r} is not its current process"
    if ack.unverified:
        return None  # a refusal report, not an answer: the caller journals it
    pending = job.pending.get(ack.seq)
    if pending is None:
        if ack.seq > job.last_seq:
            return f"seq {ack.seq} was never published (last published {job.last_seq})"
        return None  # an answer to a command already decided (e.g. after a timeout): harmless
    if ack.command_id != pending.command.command_id:
        return f"command id {ack.command_id!r} is not seq {ack.seq}'s"
    return None


def check_metrics(state: WeaverState, sm: StepMetrics, subject: str) -> str | None:
    """Why metrics received on `subject` must not be fanned out; None when they fit a known rank."""
    tokens = subject_tokens(subject, "metrics")
    if tokens is None or tokens != (sm.job, str(sm.rank)):
        return f"subject {subject} does not match the body's job {sm.job!r} and rank {sm.rank}"
    job = state.jobs.get(sm.job)
    if job is None or sm.run_id != job.run_id or sm.rank not in job.ranks:
        return f"no rank {sm.rank} in run {sm.run_id} of job {sm.job}"
    return None


def evict_dead_jobs(state: WeaverState, now: float, dead_after_s: float, limits: Limits) -> tuple[str, ...]:
    """Forget jobs with no live rank, nothing in flight and no heartbeat for `job_evict_after_s`;
    returns their names. Mutates `state`."""
    gone = []
    for name, job in state.jobs.items():
        last = max((e.last_seen_s for e in job.ranks.values()), default=job.started_at_s)
        if not job.pending and not _live(job, now, dead_after_s) and now - last > limits.job_evict_after_s:
            gone.append(name)
    for name in gone:
        del state.jobs[name]
    return tuple(gone)


@dataclass(slots=True)
class Refusals:
    """Counts refusals by kind and lets one event per kind through per `interval_s`; the event says
    how many were refused since the last one, so nothing is hidden and a flood costs nothing."""

    interval_s: float = 1.0
    total: dict[str, int] = field(default_factory=dict)
    _since: dict[str, int] = field(default_factory=dict)
    _last_at: dict[str, float] = field(default_factory=dict)

    def note(
        self, kind: str, job: str, run_id: str, message: str, now: float, *, key: str = "", **attrs: str
    ) -> JobEvent | None:
        """Count a refusal of a `kind` message (heartbeat, ack, metrics, command, ...) and return the
        "refused" event to announce, or None while `key` (default: the kind) is rate-limited."""
        key = key or kind
        self.total[kind] = self.total.get(kind, 0) + 1
        self._since[key] = self._since.get(key, 0) + 1
        if now - self._last_at.get(key, -1e18) < self.interval_s:
            return None
        count, self._since[key] = self._since[key], 0
        self._last_at[key] = now
        suffix = f" ({count - 1} more like it since the last report)" if count > 1 else ""
        return JobEvent(
            job=job if _token_ok(job) else WEAVER_JOB,
            run_id=run_id if _token_ok(run_id) else "",
            kind="refused",
            message=message + suffix,
            time_s=now,
            attrs={"what": kind, "count": str(count), "total": str(self.total[kind]), **attrs},
        )


class Refuse(Protocol):
    """The weaver's refusal of a message (`Weaver._refuse`): counted by `Refusals.note` and, when
    that lets it through, logged and announced. The components that read the bus are handed one."""

    def __call__(
        self, kind: str, job: str, run_id: str, message: str, now: float, *, key: str = "", **attrs: str
    ) -> None: ...


def _token_ok(value: str) -> bool:
    try:
        subjects.check_token("token", value)
    except ValueError:
        return False
    return True
