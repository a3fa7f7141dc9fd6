"""The weaver's journal, registry, restart recovery and rank health against a real nats-server.

The test plays the ranks by publishing real protocol messages (heartbeats, acks with action detail),
as the other weaver integration tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tests.integration import helpers
from tests.integration.helpers import until, weaver_config
from tests.integration.test_weaver_service import KNOBS
from torchloom import subjects, tokens, wire
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    Heartbeat,
    Issuer,
    JobEvent,
    Outcome,
    OutcomeStatus,
    SetConfig,
    SubmitRequest,
    WatchEvent,
)
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver

JOB = "jjob"
RUN = "run1"
ME = Issuer(kind="cli", identity="alice@host")  # the identity this client claims
# What the journal records instead: the identity the client's bearer token authenticated (the
# local operator's, which ControlClient sends by default), with the claim kept beside it.
AUTHENTICATED = Issuer(kind=ME.kind, identity=tokens.operator_identity(), claimed_identity=ME.identity)


def detail_for(cmd: Command) -> dict[str, str]:
    """What a threadlet reports for an action, per docs/design.md."""
    if not isinstance(cmd.body, Action):
        return {}
    if cmd.body.kind is ActionKind.CHECKPOINT:
        cid = f"ckpt-{cmd.seq}"
        return {
            "checkpoint_id": cid,
            "checkpoint_tag": cmd.body.args.get("tag", ""),
            "checkpoint_path": f"/ck/{JOB}/{RUN}/{cid}",
            "checkpoint_step": "20",
            "branch": "main",
        }
    if cmd.body.kind is ActionKind.ROLLBACK:
        return {
            "branch": f"b{cmd.seq}",
            "parent_branch": "main",
            "from_checkpoint": cmd.body.args["checkpoint_id"],
            "fork_step": "20",
        }
    return {}


class Ranks:
    """Two ranks: heartbeats (rank 1's step can freeze, either can go silent) and acks on demand."""

    def __init__(self, nc: Any, *, auto_ack: bool = True) -> None:
        self.nc = nc
        self.auto_ack = auto_ack
        self.commands: list[Command] = []
        self.silent: set[int] = set()
        self.frozen: set[int] = set()
        self._steps = [20, 20]
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None

    async def __aenter__(self) -> Ranks:
        self._sub = await self.nc.subscribe(helpers.weaver_publishes(JOB, RUN), cb=self._on_command)
        self._tasks.append(asyncio.create_task(self._beat()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._sub.unsubscribe()

    async def _on_command(self, msg: Any) -> None:
        cmd = wire.decode_command(msg.data)
        if not await self._stored(cmd):
            return  # a publish JetStream refused: a core subscriber sees it, a threadlet never does
        self.commands.append(cmd)
        if self.auto_ack:
            await self.ack(cmd)

    async def _stored(self, cmd: Command) -> bool:
        """Whether the command stream holds `cmd`: real ranks read the stream (their consumer), so
        they never see a publish that JetStream refused, such as a second weaver's stale seq."""
        js = self.nc.jetstream()
        stream = subjects.stream_commands_of(JOB)
        for _ in range(20):  # the core delivery may come before JetStream has stored it
            last = (await js.stream_info(stream)).state.last_seq
            for seq in range(1, last + 1):
                with contextlib.suppress(Exception):  # a deleted message
                    raw = await js.get_msg(stream, seq)
                    if wire.decode_command(raw.data or b"").command_id == cmd.command_id:
                        return True
            await asyncio.sleep(0.05)
        return False

    async def ack(self, cmd: Command) -> None:
        detail = detail_for(cmd)
        for rank in range(2):
            a = Ack(
                command_id=cmd.command_id,
                job=JOB,
                run_id=RUN,
                seq=cmd.seq,
                rank=rank,
                incarnation=f"inc-{rank}",
                status=AckStatus.APPLIED,
                step=self._steps[rank],
                detail=detail,
                branch=detail.get("branch", "main"),
            )
            await self.nc.publish(subjects.acks(JOB), wire.encode(a))

    async def _beat(self) -> None:
        while True:
            for rank in range(2):
                if rank in self.silent:
                    continue
                if rank not in self.frozen:
                    self._steps[rank] += 1
                hb = Heartbeat(
                    job=JOB,
                    run_id=RUN,
                    rank=rank,
                    world_size=2,
                    incarnation=f"inc-{rank}",
                    step=self._steps[rank],
                    tick=self._steps[rank],
                    step_time_s=0.05,
                    knobs=KNOBS,
                    sent_at_s=time.time(),
                )
                await self.nc.publish(subjects.heartbeat(JOB, rank), wire.encode(hb))
            await asyncio.sleep(0.1)


async def live(client: ControlClient) -> None:
    async def seen() -> bool:
        try:
            reply = await client.status(JOB)
        except JobNotFound:
            return False
        return sum(r.alive for r in reply.jobs[0].ranks) == 2

    await until(f"2 live ranks of {JOB}", seen)


async def commands_stored(nc: Any) -> int:
    return int((await nc.jetstream().stream_info(subjects.stream_commands_of(JOB))).state.messages)


async def read_journal(client: ControlClient) -> list[WatchEvent]:
    async with asyncio.timeout(10):
        return [ev async for ev in client.journal(JOB)]


def outcomes(entries: list[WatchEvent]) -> list[Outcome]:
    """The decided commands among journal entries (refused attempts have no command)."""
    return [e for e in entries if isinstance(e, Outcome) and e.command is not None]


async def test_journal_checkpoints_and_rollback_survive_a_weaver_restart(
    nats_server: EmbeddedNats, nc: Any
) -> None:
    async with Ranks(nc) as ranks:
        async with open_weaver(weaver_config(nats_server)) as w1, ControlClient(w1.grpc_address) as client:
            await live(client)
            ck = await client.submit(
                SubmitRequest(
                    job=JOB, issuer=ME, body=Action(kind=ActionKind.CHECKPOINT, args={"tag": "good"})
                )
            )
            assert ck.status is OutcomeStatus.APPLIED, ck.reason
            assert [(r.rank, r.detail["checkpoint_id"], r.branch) for r in ck.results] == [
                (0, "ckpt-1", "main"),
                (1, "ckpt-1", "main"),
            ]
            lr = await client.submit(SubmitRequest(job=JOB, issuer=ME, body=SetConfig(values={"lr": "0.5"})))
            assert lr.status is OutcomeStatus.APPLIED

            # A rollback to a checkpoint nobody took is refused before anything is published.
            stored = await commands_stored(nc)
            bad = await client.submit(
                SubmitRequest(
                    job=JOB, issuer=ME, body=Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "nope"})
                )
            )
            assert bad.status is OutcomeStatus.REJECTED
            assert "checkpoint 'nope' does not exist: known checkpoints are ckpt-1 (tag good)" in bad.reason
            assert await commands_stored(nc) == stored and w1.weaver.state.jobs[JOB].last_seq == 2
            # ... and journaled as a refused attempt: who asked and why, no seq.

            async def refusal_journaled() -> bool:
                return any(
                    isinstance(e, Outcome) and e.command_id == bad.command_id and e.command is None
                    for e in await read_journal(client)
                )

            await until("the refusal in the journal", refusal_journaled)
            refusal = next(
                e for e in await read_journal(client) if isinstance(e, Outcome) and e.command is None
            )
            assert refusal.issuer == AUTHENTICATED  # who asked: the token's identity, not the claim
            assert refusal.reason == bad.reason and refusal.run_id == RUN
            # ... and what was asked, though nothing was published.
            assert refusal.attempted == Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "nope"})

            rb = await client.submit(
                SubmitRequest(
                    job=JOB, issuer=ME, body=Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "good"})
                )
            )
            assert rb.status is OutcomeStatus.APPLIED, rb.reason
            assert ranks.commands[-1].body == Action(
                kind=ActionKind.ROLLBACK,
                args={
                    "checkpoint": "good",
                    "checkpoint_id": "ckpt-1",  # no path: each rank resolves the id under its own root
                },
            )

            # This one stays in flight across the restart: nobody answers it yet.
            ranks.auto_ack = False
            held = await client.submit(
                SubmitRequest(job=JOB, issuer=ME, body=Action(kind=ActionKind.PAUSE), timeout_s=0.3)
            )
            assert held.status is OutcomeStatus.TIMEOUT

            async def journaled(n: int) -> bool:
                return len(outcomes(await read_journal(client))) == n

            await until("three outcomes in the journal", lambda: journaled(3))
            before = await read_journal(client)
            status1 = (await client.status(JOB)).jobs[0]

        entries = outcomes(before)
        first = entries[0]
        assert first.command is not None and first.command.seq == 1
        # The journal trusts the authenticated identity, never the one the client claimed.
        assert first.command.issuer == AUTHENTICATED and first.command.issuer.identity != ME.identity
        assert first.command.issued_at_s > 0 and first.command.body == Action(
            kind=ActionKind.CHECKPOINT, args={"tag": "good"}
        )
        assert [(r.rank, r.branch, r.detail["checkpoint_tag"]) for r in first.results] == [
            (0, "main", "good"),
            (1, "main", "good"),
        ]
        assert all(r.step > 20 for r in first.results)
        assert entries[1].command is not None and entries[1].command.body == SetConfig(values={"lr": 0.5})
        assert any(isinstance(e, JobEvent) and e.kind == "rank_joined" for e in before)
        assert [c.id for c in status1.checkpoints] == ["ckpt-1"] and status1.branch == "b3"

        async with open_weaver(weaver_config(nats_server)) as w2, ControlClient(w2.grpc_address) as client:
            # Straight from the streams, before any heartbeat reached this weaver.
            status2 = (await client.status(JOB)).jobs[0]
            assert status2.checkpoints == status1.checkpoints
            assert [b.id for b in status2.branches] == ["main", "b3"] and status2.branch == "b3"
            assert status2.last_seq == 4
            assert await read_journal(client) == before
            # Their heartbeats reach it: the journal already says these incarnations joined.
            await live(client)

            # The ranks answer the command published before the restart: it is journaled.
            await ranks.ack(ranks.commands[-1])

            async def held_journaled() -> bool:
                return any(o.command_id == held.command_id for o in outcomes(await read_journal(client)))

            await until("the pre-restart command's outcome in the journal", held_journaled)
            last = outcomes(await read_journal(client))[-1]
            assert last.status is OutcomeStatus.APPLIED and last.command is not None and last.command.seq == 4

            # Seqs continue, and the journal can be followed live.
            await live(client)
            ranks.auto_ack = True
            followed: list[Outcome] = []

            async def follow() -> None:
                async for ev in client.journal(JOB, follow=True):
                    if isinstance(ev, Outcome) and ev.command is not None:
                        followed.append(ev)
                        if len(followed) == 5:
                            return

            follower = asyncio.create_task(follow())
            again = await client.submit(SubmitRequest(job=JOB, issuer=ME, body=Action(kind=ActionKind.EVAL)))
            assert (
                again.status is OutcomeStatus.APPLIED and again.command is not None and again.command.seq == 5
            )
            async with asyncio.timeout(10):
                await follower
            assert followed[-1].command_id == again.command_id
            joined = [
                e for e in await read_journal(client) if isinstance(e, JobEvent) and e.kind == "rank_joined"
            ]
            assert joined == [e for e in before if isinstance(e, JobEvent) and e.kind == "rank_joined"]


async def test_frozen_step_is_hung_and_silence_is_dead(nats_server: EmbeddedNats, nc: Any) -> None:
    events: list[JobEvent] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode_event(msg.data))

    await nc.subscribe(subjects.events(JOB), cb=on_event)
    async with (
        Ranks(nc) as ranks,
        open_weaver(weaver_config(nats_server, hung_after_s=0.5)) as w,
        ControlClient(w.grpc_address) as client,
    ):
        await live(client)
        ranks.frozen.add(1)

        async def hung() -> bool:
            ranks_status = (await client.status(JOB)).jobs[0].ranks
            return [r.health for r in ranks_status] == ["healthy", "hung"]

        await until("rank 1 reported hung", hung)
        assert "unchanged for" in (await client.status(JOB)).jobs[0].ranks[1].health_reason

        async def hung_event() -> bool:
            return any(e.kind == "rank_hung" and e.attrs["rank"] == "1" for e in events)

        await until("a rank_hung event", hung_event)
        ranks.silent.add(1)

        async def dead() -> bool:
            rs = (await client.status(JOB)).jobs[0].ranks[1]
            return rs.health == "dead" and not rs.alive

        await until("rank 1 reported dead", dead)

        async def dead_event() -> bool:
            return any(e.kind == "rank_dead" and e.attrs["rank"] == "1" for e in events)

        await until("a rank_dead event", dead_event)
        assert (await client.status(JOB)).jobs[0].ranks[0].health == "healthy"


async def test_two_weavers_never_publish_the_same_seq(nats_server: EmbeddedNats, nc: Any) -> None:
    async with (
        Ranks(nc) as ranks,
        open_weaver(weaver_config(nats_server)) as w1,
        # A second weaver running at once reads the acks through a consumer of its own.
        open_weaver(weaver_config(nats_server, acks_consumer="second-weaver")) as w2,
        ControlClient(w1.grpc_address) as c1,
        ControlClient(w2.grpc_address) as c2,
    ):
        await live(c1)
        await live(c2)

        async def floor_loaded() -> bool:
            return all(JOB in w.weaver.state.jobs and w.weaver.state.jobs[JOB].seq_known for w in (w1, w2))

        await until("both weavers loaded the seq floor", floor_loaded)
        first = await c1.submit(SubmitRequest(job=JOB, body=Action(kind=ActionKind.EVAL)))
        # w2 still believes seq 1 is free: JetStream refuses its publish, it reloads and takes seq 2.
        second = await c2.submit(SubmitRequest(job=JOB, body=Action(kind=ActionKind.EVAL)))
        assert first.command is not None and second.command is not None
        assert (first.command.seq, second.command.seq) == (1, 2)
        assert second.status is OutcomeStatus.APPLIED
        # (A core subscriber also saw the refused publish; threadlets read the stream, which holds 2.)
        assert await commands_stored(nc) == 2
        raw = await nc.jetstream().get_last_msg(subjects.stream_commands_of(JOB), subjects.commands(JOB, RUN))
        stored = wire.decode_command(raw.data)
        assert (stored.seq, stored.command_id) == (2, second.command_id)
        assert {c.seq for c in ranks.commands} == {1, 2}
