"""Builders of protocol messages and weaver job states for unit tests.

One place for the defaults every test shares (job `JOB`, run `RUN`, two ranks, incarnation `inc<rank>`),
so a test names only the fields it varies: `heartbeat(1, step=5)`, `ack(3, 0, AckStatus.REJECTED)`,
`action(2, ActionKind.CHECKPOINT, tag="t")`, `running(world=4)`.
"""

from __future__ import annotations

from typing import Any

import threadlet
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Body,
    Command,
    Heartbeat,
    Issuer,
    KnobValue,
    SetConfig,
)
from weaver import liveness, submits
from weaver.model import WeaverState

JOB = "j"
RUN = "r1"
WORLD = 2


def incarnation(rank: int) -> str:
    """The default incarnation of `rank`'s process, shared by `heartbeat` and `ack` so they match."""
    return f"inc{rank}"


def heartbeat(
    rank: int = 0,
    *,
    job: str = JOB,
    run: str = RUN,
    world: int = WORLD,
    inc: str | None = None,
    **fields: Any,
) -> Heartbeat:
    """A heartbeat of `rank`; `fields` are any other `Heartbeat` fields (step, state, knobs, device, ...)."""
    return Heartbeat(
        job=job, run_id=run, rank=rank, world_size=world, incarnation=inc or incarnation(rank), **fields
    )


def ack(
    seq: int,
    rank: int,
    status: AckStatus = AckStatus.APPLIED,
    reason: str = "",
    *,
    job: str = JOB,
    run: str = RUN,
    inc: str | None = None,
    step: int = 10,
    command_id: str = "",
    **fields: Any,
) -> Ack:
    """`rank`'s answer to command `seq`; `fields` are any other `Ack` fields (detail, branch, ...)."""
    return Ack(
        command_id=command_id,
        job=job,
        run_id=run,
        seq=seq,
        rank=rank,
        incarnation=inc or incarnation(rank),
        status=status,
        reason=reason,
        step=step,
        **fields,
    )


def command(
    seq: int,
    body: Body,
    *,
    job: str = JOB,
    run: str = RUN,
    command_id: str | None = None,
    issuer: Issuer | None = None,
    issued_at_s: float = 0.0,
) -> Command:
    """Command `seq` of a run, as the weaver publishes it (the id defaults to one unique per run and seq)."""
    return Command(
        command_id=command_id if command_id is not None else f"{run}-c{seq}",
        job=job,
        run_id=run,
        seq=seq,
        issuer=issuer if issuer is not None else Issuer(),
        issued_at_s=issued_at_s,
        body=body,
    )


def action(seq: int, kind: ActionKind, /, **args: str) -> Command:
    """Command `seq` carrying the action `kind` with `args`."""
    return command(seq, Action(kind=kind, args=args))


def set_config(seq: int, /, **values: KnobValue) -> Command:
    """Command `seq` setting the knobs `values`."""
    return command(seq, SetConfig(values=values))


def local_config() -> threadlet.ThreadletConfig:
    """A threadlet config of job `JOB`, run `RUN` whose NATS URL nobody serves: the link never connects,
    so a world-size-1 threadlet decides filed commands locally. Its connection attempts last 0.2 s,
    so a close never waits long for one to end."""
    return threadlet.ThreadletConfig(
        nats_url="nats://127.0.0.1:1", job=JOB, run_id=RUN, connect_timeout_s=0.2
    )


def running(
    world: int = WORLD, *, job: str = JOB, run: str = RUN, now: float = 100.0, **fields: Any
) -> WeaverState:
    """A weaver state with one job whose `world` ranks have heartbeated at `now` and whose seq floor is
    known (0), so submits are accepted; `fields` go into every rank's heartbeat."""
    s = WeaverState()
    for r in range(world):
        liveness.observe_heartbeat(s, heartbeat(r, job=job, run=run, world=world, **fields), now)
    submits.set_seq_floor(s, job, run, 0)
    return s
