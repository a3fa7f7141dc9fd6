"""The weaver against a real nats-server: submits, status over gRPC and NATS, restarts, watch.

The test plays the ranks by publishing real protocol messages (heartbeats, acks); end-to-end runs
with real threadlets live elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from tests.integration import helpers
from tests.integration.helpers import until, weaver_config
from torchloom import subjects, wire
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound, WeaverUnavailable
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    Heartbeat,
    JobEvent,
    Outcome,
    OutcomeStatus,
    SetConfig,
    StatusRequest,
    SubmitRequest,
)
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.service import Weaver

JOB = "tjob"
RUN = "run1"
KNOBS = (BUILTIN_SPECS["lr"], BUILTIN_SPECS["weight_decay"])


class FakeRanks:
    """Publishes heartbeats for `world` ranks of one run, and acks commands when told to."""

    def __init__(self, nc: Any, world: int = 2, run_id: str = RUN, job: str = JOB) -> None:
        self.nc = nc
        self.world = world
        self.run_id = run_id
        self.job = job
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        while True:
            for rank in range(self.world):
                hb = Heartbeat(
                    job=self.job,
                    run_id=self.run_id,
                    rank=rank,
                    world_size=self.world,
                    incarnation=f"inc-{rank}",
                    step=3,
                    knobs=KNOBS,
                    sent_at_s=time.time(),
                )
                await self.nc.publish(subjects.heartbeat(self.job, rank), wire.encode(hb))
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> FakeRanks:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def ack(
        self,
        cmd: Command,
        rank: int,
        status: AckStatus = AckStatus.APPLIED,
        reason: str = "",
        *,
        refused_by_peer: bool = False,
    ) -> None:
        a = Ack(
            command_id=cmd.command_id,
            job=cmd.job,
            run_id=cmd.run_id,
            seq=cmd.seq,
            rank=rank,
            incarnation=f"inc-{rank}",
            status=status,
            reason=reason,
            step=4,
            refused_by_peer=refused_by_peer,
        )
        await self.nc.publish(subjects.acks(cmd.job), wire.encode(a))


async def job_visible(client: ControlClient, world: int = 2) -> None:
    async def seen() -> bool:
        try:
            reply = await client.status(JOB)
        except JobNotFound:
            return False
        return len([r for r in reply.jobs[0].ranks if r.alive]) == world

    await until(f"{world} live ranks of {JOB} in status", seen)


async def stream_messages(nc: Any, stream: str) -> int:
    """Messages stored in `stream` (0 when it does not exist: a job's stream appears with the job)."""
    try:
        info = await nc.jetstream().stream_info(stream)
    except NotFoundError:
        return 0
    return int(info.state.messages)


async def test_invalid_submit_is_rejected_and_nothing_published(nats_server: EmbeddedNats, nc: Any) -> None:
    async with (
        open_weaver(weaver_config(nats_server)) as w,
        FakeRanks(nc),
        ControlClient(w.grpc_address) as client,
    ):
        await job_visible(client)
        out = await client.submit(SubmitRequest(job=JOB, body=SetConfig(values={"lr": "-1"})))
        assert out.status is OutcomeStatus.REJECTED
        assert "lr=-1 rejected: must be in (0, 10]" in out.reason
        bad_action = await client.submit(SubmitRequest(body=Action(kind=ActionKind.ROLLBACK)))
        assert bad_action.status is OutcomeStatus.REJECTED
        assert "needs argument 'checkpoint'" in bad_action.reason
        no_job = await client.submit(SubmitRequest(job="nope", body=SetConfig(values={"lr": "0.1"})))
        assert no_job.status is OutcomeStatus.REJECTED and "no job named 'nope'" in no_job.reason
        assert await stream_messages(nc, subjects.stream_commands_of(JOB)) == 0
        assert w.weaver.state.jobs[JOB].last_seq == 0


async def test_submit_applied_journaled_and_watched(nats_server: EmbeddedNats, nc: Any) -> None:
    commands: asyncio.Queue[Command] = asyncio.Queue()

    async def on_cmd(msg: Any) -> None:
        await commands.put(wire.decode_command(msg.data))

    await nc.subscribe(helpers.weaver_publishes(JOB, RUN), cb=on_cmd)
    async with (
        open_weaver(weaver_config(nats_server)) as w,
        FakeRanks(nc) as ranks,
        ControlClient(w.grpc_address) as client,
    ):
        await job_visible(client)
        seen: list[Any] = []
        watch_ready = asyncio.Event()

        async def watch() -> None:
            async for ev in client.watch(JOB):
                seen.append(ev)
                watch_ready.set()
                if isinstance(ev, Outcome):
                    return

        watcher = asyncio.create_task(watch())
        # Any event proves the stream is live: here the refusal of a second incarnation of live
        # rank 0 (announced at most once a second, so repeat it until the watch has one).
        async with asyncio.timeout(10):
            while not watch_ready.is_set():
                beat = Heartbeat(job=JOB, run_id=RUN, rank=0, world_size=2, incarnation="inc-0b", knobs=KNOBS)
                await ranks.nc.publish(subjects.heartbeat(JOB, 0), wire.encode(beat))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await watch_ready.wait()

        submit = asyncio.create_task(
            client.submit(SubmitRequest(body=SetConfig(values={"lr": "0.5"}), timeout_s=10.0))
        )
        async with asyncio.timeout(10):
            cmd = await commands.get()
        assert (cmd.seq, cmd.body) == (1, SetConfig(values={"lr": 0.5}))
        await ranks.ack(cmd, 1)
        await ranks.ack(cmd, 1)  # duplicate: counted once
        await ranks.ack(cmd, 0)
        out = await submit
        assert out.status is OutcomeStatus.APPLIED
        assert [r.rank for r in out.results] == [0, 1]
        assert out.command is not None and out.command.command_id == cmd.command_id
        assert 0 < out.submitted_at_s <= out.published_at_s <= out.completed_at_s
        async with asyncio.timeout(10):
            await watcher
        assert any(isinstance(e, JobEvent) and e.kind in ("rank_joined", "refused") for e in seen)
        assert isinstance(seen[-1], Outcome) and seen[-1].command_id == cmd.command_id

        js = nc.jetstream()

        async def journaled() -> bool:
            try:
                raw = await js.get_last_msg(subjects.STREAM_JOURNAL, subjects.journal(JOB))
            except NotFoundError:
                return False
            return wire.decode_outcome(raw.data).command_id == cmd.command_id

        await until("the outcome in the journal", journaled)


async def test_rejecting_rank_and_late_acks_after_timeout(nats_server: EmbeddedNats, nc: Any) -> None:
    commands: asyncio.Queue[Command] = asyncio.Queue()

    async def on_cmd(msg: Any) -> None:
        await commands.put(wire.decode_command(msg.data))

    await nc.subscribe(helpers.weaver_publishes(JOB, RUN), cb=on_cmd)
    events: list[JobEvent] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode_event(msg.data))

    await nc.subscribe(subjects.events(JOB), cb=on_event)
    async with (
        open_weaver(weaver_config(nats_server)) as w,
        FakeRanks(nc) as ranks,
        ControlClient(w.grpc_address) as client,
    ):
        await job_visible(client)
        # Nobody acks within the deadline: TIMEOUT names the silent ranks.
        out = await client.submit(SubmitRequest(body=Action(kind=ActionKind.PAUSE), timeout_s=0.3))
        assert out.status is OutcomeStatus.TIMEOUT
        assert "rank(s) 0, 1 did not answer" in out.reason
        cmd = await commands.get()
        # The acks arrive late: the final outcome still reaches the events and the journal.
        await ranks.ack(cmd, 0, AckStatus.REJECTED, "refused by another rank", refused_by_peer=True)
        await ranks.ack(cmd, 1, AckStatus.REJECTED, "rank 1 refused: busy")

        async def announced() -> bool:
            return any(e.kind == "command" and e.command_id == cmd.command_id for e in events)

        await until("the late command event", announced)
        final = next(e for e in events if e.command_id == cmd.command_id)
        assert final.attrs["status"] == "rejected"
        assert "rank 1: rank 1 refused: busy; rank 0: refused by another rank" in final.message


async def test_status_over_grpc_and_nats(nats_server: EmbeddedNats, nc: Any) -> None:
    async with (
        open_weaver(weaver_config(nats_server)) as w,
        FakeRanks(nc),
        ControlClient(w.grpc_address) as client,
    ):
        await job_visible(client)
        reply = await client.status()
        (job,) = reply.jobs
        assert (job.job, job.run_id, job.world_size) == (JOB, RUN, 2)
        assert [r.rank for r in job.ranks] == [0, 1]
        assert [k.name for k in job.knobs] == ["lr", "weight_decay"]
        with pytest.raises(JobNotFound, match="no job named 'other'"):
            await client.status("other")

        msg = await nc.request(subjects.api_status(), wire.encode(StatusRequest(job=JOB)), timeout=5)
        over_nats = wire.decode_status_reply(msg.data)
        assert [(j.job, j.run_id, len(j.ranks)) for j in over_nats.jobs] == [(JOB, RUN, 2)]

        # The NATS submit API answers like gRPC (here: a rejection, so nothing waits on ranks).
        msg = await nc.request(
            subjects.api_submit(),
            wire.encode(SubmitRequest(job=JOB, body=SetConfig(values={"nope": "1"}))),
            timeout=5,
        )
        assert "unknown knob 'nope'" in wire.decode_outcome(msg.data).reason


async def test_restarted_weaver_continues_seq_from_the_stream(nats_server: EmbeddedNats, nc: Any) -> None:
    async with FakeRanks(nc):
        async with open_weaver(weaver_config(nats_server)) as w1, ControlClient(w1.grpc_address) as client:
            await job_visible(client)
            for _ in range(2):
                out = await client.submit(SubmitRequest(body=Action(kind=ActionKind.EVAL), timeout_s=0.2))
                assert out.status is OutcomeStatus.TIMEOUT
        async with open_weaver(weaver_config(nats_server)) as w2, ControlClient(w2.grpc_address) as client:
            # Rebuilt from heartbeats alone (the ranks report last_seq 0: they never acked).
            await job_visible(client)
            out = await client.submit(SubmitRequest(body=Action(kind=ActionKind.EVAL), timeout_s=0.2))
            assert out.command is not None and out.command.seq == 3
    raw = await nc.jetstream().get_last_msg(subjects.stream_commands_of(JOB), subjects.commands(JOB, RUN))
    assert wire.decode_command(raw.data).seq == 3
    assert await stream_messages(nc, subjects.stream_commands_of(JOB)) == 3


async def test_new_run_restarts_seq_and_dead_ranks_are_announced(nats_server: EmbeddedNats, nc: Any) -> None:
    events: list[JobEvent] = []

    async def on_event(msg: Any) -> None:
        events.append(wire.decode_event(msg.data))

    await nc.subscribe(subjects.events(JOB), cb=on_event)
    async with open_weaver(weaver_config(nats_server)) as w, ControlClient(w.grpc_address) as client:
        async with FakeRanks(nc):
            await job_visible(client)
            out = await client.submit(SubmitRequest(body=Action(kind=ActionKind.EVAL), timeout_s=0.2))
            assert out.command is not None and out.command.seq == 1

        async def dead() -> bool:
            return sum(e.kind == "rank_dead" for e in events) == 2

        await until("two rank_dead events", dead)
        async with FakeRanks(nc, world=1, run_id="run2"):
            await job_visible(client, world=1)
            out = await client.submit(SubmitRequest(body=Action(kind=ActionKind.EVAL), timeout_s=0.2))
            assert out.command is not None and (out.command.run_id, out.command.seq) == ("run2", 1)
        assert sum(e.kind == "run_started" for e in events) == 2


async def test_unreachable_weaver_is_weaver_unavailable() -> None:
    async with ControlClient("127.0.0.1:1", timeout_s=2.0) as client:
        with pytest.raises(WeaverUnavailable, match="torchloom weaver"):
            await client.submit(SubmitRequest(body=Action(kind=ActionKind.PAUSE)))
        with pytest.raises(WeaverUnavailable):
            await client.status()


async def test_close_is_idempotent(nats_server: EmbeddedNats) -> None:
    w = Weaver(weaver_config(nats_server))
    await w.start()
    await asyncio.gather(w.close(), w.close())
    await w.close()
    await asyncio.wait_for(w.wait_closed(), 5)
