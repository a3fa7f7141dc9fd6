"""A job's autopilot policy outlives its weaver: set on one weaver, it is journaled, and the weaver
started after it (a restart, or a standby taking over) runs the job under it, so its rules fire on
the next report. The test plays the ranks by publishing real heartbeats and step metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from tests.integration.helpers import until, weaver_config
from tests.integration.test_weaver_service import FakeRanks
from torchloom import subjects, wire
from torchloom.client import ControlClient
from torchloom.messages import JobEvent, StepMetrics
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.service import Weaver

JOB = "pjob"
RUN = "prun"
POLICY = """
name = "alert-on-nan"
[[rule]]
name = "nan-alert"
when = "nonfinite"
cooldown_s = 0.0
do = [{alert = "the loss is not finite"}]
"""


async def _fired(w: Weaver) -> list[JobEvent]:
    return [e async for e in w.journal(JOB) if isinstance(e, JobEvent) and e.kind == "rule_fired"]


async def test_a_policy_set_before_a_weaver_restart_keeps_firing_after_it(
    nats_server: EmbeddedNats, nc: Any
) -> None:
    config = weaver_config(nats_server)
    async with open_weaver(config) as first, ControlClient(first.grpc_address) as client:
        reply = await client.set_policy(JOB, POLICY)
        assert reply.name == "alert-on-nan"
        await until("the policy journaled", lambda: _policy_events(first.weaver))
    async with FakeRanks(nc, job=JOB, run_id=RUN):
        async with open_weaver(config) as second, ControlClient(second.grpc_address) as client:
            # Recovered from the journal before the weaver serves anything.
            view = await client.get_policy(JOB)
            assert (view.name, view.text) == ("alert-on-nan", POLICY)
            await until("the ranks known", lambda: JOB in second.weaver.state.jobs)
            step = 4

            async def nan_report() -> list[JobEvent]:
                nonlocal step
                step += 1
                sm = StepMetrics(
                    job=JOB,
                    run_id=RUN,
                    rank=0,
                    step=step,
                    branch="main",
                    time_s=time.time(),
                    values={"loss": math.nan, "nonfinite_loss_steps": float(step)},
                )
                await nc.publish(subjects.metrics(JOB, 0), wire.encode(sm))
                return await _fired(second.weaver)

            (fired, *_) = await until("the rule to fire on the restarted weaver", nan_report, interval_s=0.3)
            assert fired.attrs["rule"] == "nan-alert" and fired.attrs["signal"] == "nonfinite"
            assert "the loss is not finite" in fired.message
            # Turning the rules off is journaled too: the next weaver runs the job without them.
            await client.set_policy(JOB, "")
            await until("the policy removal journaled", lambda: _policy_events(second.weaver, 2))
        async with open_weaver(config) as third, ControlClient(third.grpc_address) as client:
            assert (await client.get_policy(JOB)).name == ""


async def _policy_events(w: Weaver, count: int = 1) -> bool:
    return (
        len([e async for e in w.journal(JOB) if isinstance(e, JobEvent) and e.kind == "policy_set"]) >= count
    )
