"""Every NATS subject and JetStream stream name torchloom uses, versioned under `torchloom.v1.`.

Job names and run ids become subject tokens, so they are restricted to `[A-Za-z0-9_-]`.
"""

from __future__ import annotations

import re

PREFIX = "torchloom.v1"

# JetStream streams.
STREAM_COMMANDS = "TORCHLOOM_COMMANDS"  # every validated command, per (job, run)
STREAM_JOURNAL = "TORCHLOOM_JOURNAL"  # outcomes and job events: the durable audit trail
# Every rank's acks, read by the weaver through a durable consumer (acked once the outcome they
# complete is journaled), so a weaver that was down when they came still completes every outcome.
STREAM_ACKS = "TORCHLOOM_ACKS"
ACKS_CONSUMER = "torchloom-weaver-acks"
# Per-job command streams (stream_commands_of): a threadlet's credential can name its job's stream
# in JetStream API permissions, so it reads that job's commands and nothing else.
STREAM_COMMANDS_JOB_PREFIX = "TORCHLOOM_CMD_"

# nats-server's own subjects that the permission table (torchloom/credentials.py) names.
JS_API = "$JS.API"
INBOX = "_INBOX"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(kind: str, value: str) -> str:
    """Return `value` when it is a valid subject token, else raise ValueError naming the form."""
    if not _TOKEN.match(value):
        raise ValueError(
            f"{kind} {value!r} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


def matches(pattern: str, subject: str) -> bool:
    """Whether `subject` is one of the subjects `pattern` names (NATS wildcards: `*` one token, `>`
    the rest). A JetStream delivery keeps its stored subject whatever subject it was delivered on, so
    a handler checks this before believing a message belongs to what it subscribed to."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


def commands(job: str, run_id: str, *, check: bool = True) -> str:
    """Validated commands for one run of a job, in seq order (JetStream, the job's command stream).
    `check=False` lets `run_id` be a subject-mapping function (a stream's subject transform)."""
    return f"{PREFIX}.cmd.{check_token('job', job)}.{check_token('run id', run_id) if check else run_id}"


def commands_capture(token: str, job: str) -> str:
    """The subjects one job's command stream captures: `<PREFIX>.wcmd.<token>.<job>.*`, which the
    stream stores as `commands(job, run)`. `token` is the stream's secret (`bus.JobCommands`), known
    only to weaver-role clients: nats-server does not check a request's reply subject, so any client
    could have a JetStream answer stored on a subject a stream captures; a capture subject nobody
    else knows cannot be aimed at (docs/security.md, "Reply subjects")."""
    return f"{_capture_prefix(token, job)}.*"


def command_capture(token: str, job: str, run_id: str) -> str:
    """Where the weaver publishes a command of `run_id`: one of `commands_capture(token, job)`."""
    return f"{_capture_prefix(token, job)}.{check_token('run id', run_id)}"


def _capture_prefix(token: str, job: str) -> str:
    return f"{PREFIX}.wcmd.{check_token('capture token', token)}.{check_token('job', job)}"


def commands_all() -> str:
    return f"{PREFIX}.cmd.>"


def commands_of(job: str) -> str:
    """Every run's commands of one job: the subjects of its stream `stream_commands_of(job)`."""
    return f"{PREFIX}.cmd.{check_token('job', job)}.>"


def stream_commands_of(job: str) -> str:
    """The JetStream stream that holds one job's commands (all its runs)."""
    return f"{STREAM_COMMANDS_JOB_PREFIX}{check_token('job', job)}"


def rank_consumer(run_id: str, rank: int, incarnation: str) -> str:
    """The durable pull consumer on the job's command stream that one rank process reads its run's
    commands from: the weaver makes it, the threadlet may only pull from it (docs/security.md)."""
    if int(rank) < 0:
        raise ValueError(f"rank {rank} is not valid: must be >= 0")
    return f"rank-{check_token('run id', run_id)}-{int(rank)}-{check_token('incarnation', incarnation)}"


def acks(job: str, *, check: bool = True) -> str:
    """Per-rank acknowledgements of commands, as the acks stream stores them (and republishes them,
    for live readers). A rank publishes its acks on `ack_capture` instead; what it publishes here (a
    refusal of an unverified command, an ack before the rank knows its job's ack token) is stored
    nowhere: the weaver takes it live. `check=False` lets `job` be a subject-mapping function."""
    return f"{PREFIX}.ack.{check_token('job', job) if check else job}"


def acks_all() -> str:
    return f"{PREFIX}.ack.*"


def ack_capture(token: str, job: str) -> str:
    """Where the ranks of `job` publish their acks: `<PREFIX>.wack.<token>.<job>`, which the acks stream
    captures only for the tokens the weaver gave (`bus.JobCommands.ack_token`, carried in every command
    it signs) and stores as `acks(job)`. A rank of another job does not know the token, so it cannot
    have a JetStream answer stored there through a reply subject (docs/security.md, "Reply subjects")."""
    return f"{PREFIX}.wack.{check_token('ack token', token)}.{check_token('job', job)}"


def ack_captures_of(job: str) -> str:
    """Every ack capture subject of one job, whatever its token (the job's threadlets may publish there)."""
    return f"{PREFIX}.wack.*.{check_token('job', job)}"


def ack_captures_all() -> str:
    return f"{PREFIX}.wack.*.*"


def journal_capture(token: str, subject: str) -> str:
    """Where the journal stream's rightful publishers (the weaver, launchers) publish what it stores as
    `subject` (a `journal(job)` or `events(job)` subject, or a pattern of them): `<PREFIX>.wj.<token>.`
    and the rest of `subject`. The token is the stream's secret (`bus.JournalStream`), readable only
    by the weaver and launcher roles, so nobody else can have anything stored in the journal."""
    kind, _, job = subject.removeprefix(f"{PREFIX}.").partition(".")
    if f"{PREFIX}.{kind}.{job}" != subject or kind not in ("journal", "events") or not job:
        raise ValueError(
            f"subject {subject!r} is not a journal subject: expected {PREFIX}.journal.<job> or .events.<job>"
        )
    return f"{PREFIX}.wj.{check_token('journal token', token)}.{subject.removeprefix(PREFIX + '.')}"


def journal_capture_root(token: str) -> str:
    """Every journal capture subject of one token: what the journal stream maps onto `<PREFIX>.>`."""
    return f"{PREFIX}.wj.{check_token('journal token', token)}.>"


def event_captures_all() -> str:
    """Every event capture subject whatever its token (launchers may publish there)."""
    return f"{PREFIX}.wj.*.events.*"


def heartbeat(job: str, rank: int) -> str:
    return f"{PREFIX}.hb.{check_token('job', job)}.{int(rank)}"


def heartbeats_all() -> str:
    return f"{PREFIX}.hb.*.*"


def heartbeats_of(job: str) -> str:
    return f"{PREFIX}.hb.{check_token('job', job)}.*"


def metrics(job: str, rank: int) -> str:
    return f"{PREFIX}.metrics.{check_token('job', job)}.{int(rank)}"


def metrics_all() -> str:
    return f"{PREFIX}.metrics.*.*"


def metrics_of(job: str) -> str:
    return f"{PREFIX}.metrics.{check_token('job', job)}.*"


def events(job: str) -> str:
    """Weaver-side job events (joins, deaths, command outcomes, reconfiguration phases)."""
    return f"{PREFIX}.events.{check_token('job', job)}"


def events_all() -> str:
    return f"{PREFIX}.events.*"


def journal(job: str) -> str:
    """Final outcome of every command (JetStream, STREAM_JOURNAL)."""
    return f"{PREFIX}.journal.{check_token('job', job)}"


def journal_all() -> str:
    return f"{PREFIX}.journal.*"


def launcher(job: str) -> str:
    """Requests to the job's launcher (a RestartRequest from the weaver's health policy)."""
    return f"{PREFIX}.launcher.{check_token('job', job)}"


def launcher_all() -> str:
    return f"{PREFIX}.launcher.*"


def inbox_prefix(*owner: str) -> str:
    """A client's private inbox prefix, e.g. `_INBOX.threadlet.J`: replies to it match `<prefix>.>`."""
    if not owner:
        raise ValueError("inbox_prefix needs an owner, e.g. inbox_prefix('weaver')")
    return ".".join((INBOX, *(check_token("inbox owner", o) for o in owner)))


def api_submit() -> str:
    """Request-reply: SubmitRequest -> Outcome; the same handler as gRPC Control.Submit."""
    return f"{PREFIX}.api.submit"


def api_decide() -> str:
    """Request-reply: ProposalDecision -> JobEvent; the same handler as gRPC Control.DecideProposal."""
    return f"{PREFIX}.api.decide"


def api_status() -> str:
    """Request-reply: StatusRequest -> StatusReply."""
    return f"{PREFIX}.api.status"


def api_feed(owner: str) -> str:
    """Request-reply: a journal feed for the browser role `owner` (`ui-viewer`, `ui-operator`), JSON
    both ways (weaver.ui_feeds); only that role may publish here, so the subject names who asks."""
    return f"{PREFIX}.api.feed.{check_token('feed owner', owner)}"


def api_feeds_all() -> str:
    return f"{PREFIX}.api.feed.*"
