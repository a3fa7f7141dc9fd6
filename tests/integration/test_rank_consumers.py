"""A rank's command consumer keeps its state in the server's memory (`bus.rank_consumer`: on file,
one command took 0.26 to 0.7 s to reach the last of 1,000 ranks). A restarted nats-server has
forgotten it, so the weaver makes it again once it has reconnected, and the rank, which was told
"no consumer" meanwhile, reads the run's commands from the first again and drops those it decided.

Real nats-server (secured, restarted on the same port and store), a real weaver, a real threadlet
with the job's credential (it may pull, never make a consumer), stepping in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid

import pytest
import torch
from nats.js.errors import APIError
from torch import nn

import threadlet
from tests.integration import helpers
from threadlet.agent import Threadlet
from torchloom import bus, subjects
from torchloom.client import ControlClient
from torchloom.messages import OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver

JOB = "consumers"


def _train(tl: Threadlet, stop: threading.Event) -> None:
    while not stop.is_set():
        tl.step(loss=0.5)
        time.sleep(0.01)


async def _set_lr(client: ControlClient, lr: float) -> None:
    out = await client.submit(SubmitRequest(job=JOB, body=SetConfig(values={"lr": lr}), timeout_s=30.0))
    assert out.status is OutcomeStatus.APPLIED, out


async def test_a_restarted_server_gets_the_rank_consumers_again(nats_server: EmbeddedNats) -> None:
    run_id = uuid.uuid4().hex[:8]
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    config = helpers.threadlet_config(nats_server, JOB, run_id)
    assert config.nats_creds_file, "a secured server: the rank may pull, never make its consumer"
    stop = threading.Event()
    async with (
        open_weaver(helpers.weaver_config(nats_server, dead_after_s=10.0)) as w,
        ControlClient(w.grpc_address) as client,
    ):
        tl = threadlet.attach(model=model, optimizer=opt, config=config)
        trainer = threading.Thread(target=_train, args=(tl, stop), daemon=True)
        trainer.start()
        try:

            async def knows_lr() -> bool:
                try:
                    reply = await client.status(JOB)
                except Exception:
                    return False
                return any(k.name == "lr" for k in reply.jobs[0].knobs)

            await helpers.until("the rank's knobs at the weaver", knows_lr, timeout_s=30)
            await _set_lr(client, 0.002)
            nc = await helpers.connect(nats_server)
            try:
                assert tl._link is not None
                name = subjects.rank_consumer(run_id, 0, tl._link._incarnation)
                info = await nc.jetstream().consumer_info(subjects.stream_commands_of(JOB), name)
                assert info.config.mem_storage, "the rank's consumer keeps its state on file"
            finally:
                await nc.close()

            nats_server.kill()
            await asyncio.sleep(0.5)
            nats_server.start()  # same port and store: the stream is there, the consumer is not
            # The weaver and the rank reconnect; the weaver makes the consumer again at the rank's
            # next heartbeat, and this command reaches the rank through it.
            await _set_lr(client, 0.003)
            await asyncio.sleep(0.5)  # the rank has read the run's first command again by now
        finally:
            stop.set()
            trainer.join(timeout=10)
            tl.close()
    decided = [(d.seq, str(d.status)) for d in tl.applied]
    assert decided == [(1, "applied"), (2, "applied")], decided  # each once, the first not again
    assert opt.param_groups[0]["lr"] == 0.003


async def test_a_consumer_an_older_version_made_on_file_is_kept(nats_server: EmbeddedNats) -> None:
    """A weaver of this version, on a store where an older one made a rank's consumer with its state
    on file, takes that consumer as made (it delivers the same commands): nats-server refuses to
    change a consumer's storage, and that refusal, repeated at every heartbeat, must not be taken for
    a failure to make it."""
    nc = await helpers.connect(nats_server)
    try:
        js = nc.jetstream()
        await bus.ensure_job_commands(js, JOB)
        config = bus.rank_consumer(JOB, "r1", 0, "inc-0")
        older = dataclasses.replace(config, mem_storage=None)
        await js.add_consumer(subjects.stream_commands_of(JOB), older)
        assert await bus.ensure_rank_consumer(js, JOB, "r1", 0, "inc-0") == config.durable_name
        info = await js.consumer_info(subjects.stream_commands_of(JOB), config.durable_name)
        assert not info.config.mem_storage  # kept as it was
        # A name taken by a consumer of another subject is still an error.
        other = dataclasses.replace(older, durable_name=bus.rank_consumer(JOB, "r1", 1, "inc-1").durable_name)
        await js.add_consumer(
            subjects.stream_commands_of(JOB), dataclasses.replace(other, filter_subject=">")
        )
        with pytest.raises(APIError):
            await bus.ensure_rank_consumer(js, JOB, "r1", 1, "inc-1")
    finally:
        await nc.close()
