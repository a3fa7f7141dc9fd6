"""A rank's command pull asks again as soon as the server has ended its request: with a real
nats-server, the job's command stream and the rank's consumer as the weaver makes them, and an
in-process threadlet, more commands than one pull request's batch each reach the rank and apply.

JetStream ends a pull request at its batch without a status message, and a delivery names the stored
command's subject, not the request's reply subject; a rank that matched deliveries to its request by
that subject never counted one, so after each batch it waited for a request that was over until its
heartbeat check gave up on it (`bench/command_latency.py`: every 64th command took 1.3 to 1.8 s).
Here the batch is 2 and the heartbeat check's period 30 s (a request's expiry 120 s), so that wait
would outlast the test's own deadline for each command."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
from torch import nn

import threadlet
import threadlet.link
from tests.integration import helpers
from tests.integration.test_threadlet_commands import command
from threadlet.agent import Threadlet
from torchloom import bus, wire
from torchloom.nats_server import EmbeddedNats

JOB = "pulljob"
COMMANDS = 7  # three whole batches of 2 and one more


def _step_until(tl: Threadlet, opt: torch.optim.Optimizer, lr: float, deadline_s: float) -> int:
    """Train (a step boundary every 10 ms) until `lr` is in effect; returns the steps it took, or -1."""
    steps = 0
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        tl.step(loss=0.5)
        steps += 1
        if opt.param_groups[0]["lr"] == lr:
            return steps
        time.sleep(0.01)
    return -1


async def test_more_commands_than_a_pull_batch_each_arrive(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threadlet.link, "_PULL_BATCH", 2)
    monkeypatch.setattr(threadlet.link, "_PULL_HEARTBEAT_S", 30.0)
    monkeypatch.setattr(threadlet.link, "_PULL_EXPIRES_S", 120.0)  # the server wants heartbeats well inside
    run_id = uuid.uuid4().hex[:8]
    nc = await helpers.connect(nats_server)
    tl = None
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, shared_commands=False)
        stream = await bus.ensure_job_commands(js, JOB)
        await helpers.make_rank_consumers(nc, JOB)  # the weaver's part, at the rank's first heartbeat
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        config = helpers.threadlet_config(nats_server, JOB, run_id)
        tl = threadlet.attach(model=model, optimizer=opt, config=config)
        for seq in range(1, COMMANDS + 1):
            lr = 0.001 * seq
            cmd = command(JOB, run_id, seq, {"lr": lr})  # signed, as the weaver publishes it
            await js.publish(stream.subject(run_id), wire.encode(cmd), stream=stream.stream)
            # The first command waits for the rank to connect and find its consumer; every later one
            # is stored while the rank's previous request may just have ended at its batch.
            steps = await asyncio.to_thread(_step_until, tl, opt, lr, 20.0)
            assert steps > 0, (
                f"command {seq} (lr={lr}) never applied: the rank did not ask for commands again after "
                f"its request ended (last decided seq {tl._state.last_decided})"
            )
    finally:
        if tl is not None:
            tl.close()
        await nc.close()
