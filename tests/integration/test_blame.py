"""Blame the cause, end to end: a 2-rank torchrun job under `torchloom run`, rank 1 frozen with
SIGSTOP. The events name rank 1 dead with rank 0 waiting on it (never hung nor straggler), status and
`torchloom devices` agree on both ranks, and after SIGCONT both train again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import run_creds, unbound_env, until
from tests.integration.test_reconfigure_faults import JOB, SCRIPT, _client, _status, _torchloom_run
from torchloom.client import ControlClient
from torchloom.messages import JobEvent, StatusReply
from torchloom.nats_server import EmbeddedNats

# Longer than --hung-after: a waiting rank must not turn hung however long it waits (rank 0 has waited
# since the SIGSTOP, seconds before this wait begins).
STALL_S = 2.0


@pytest.fixture
def run_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"))


def _ranks(reply: StatusReply | None) -> dict[int, tuple[str, bool, int]]:
    """(health, alive, step) by rank."""
    if reply is None or not reply.jobs:
        return {}
    return {r.rank: (r.health, r.alive, r.step) for r in reply.jobs[0].ranks}


async def _collect(client: ControlClient, into: list[JobEvent]) -> None:
    """The job's events as the weaver announces them (its live feed), until cancelled."""
    async for ev in client.watch(JOB):
        if isinstance(ev, JobEvent):
            into.append(ev)


async def _devices(env: dict[str, str]) -> dict[int, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torchloom.app.cli", "devices", "--json", "--job", JOB, env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    raw, _ = await proc.communicate()
    return {int(d["rank"]): d for d in json.loads(raw)["devices"]}


@pytest.mark.timeout(150)
async def test_a_frozen_rank_is_blamed_and_its_peer_reported_waiting(
    tmp_path: Path, nats_server: EmbeddedNats, run_env: dict[str, str], tl_home: Path
) -> None:
    args = [
        *run_creds(nats_server, JOB),
        "--health-policy",
        "alert",
        "--hung-after",
        "1.5",
        "--nproc-per-node",
        "2",
    ]
    script = [str(SCRIPT), "--steps", "100000", "--step-sleep", "0.02", "--out", str(tmp_path / "out")]
    async with _torchloom_run([*args, *script], run_env) as proc:
        client = await _client(proc)
        async with client, asyncio.TaskGroup() as tg:
            announced: list[JobEvent] = []
            feed = tg.create_task(_collect(client, announced))

            async def training() -> StatusReply | None:
                reply = await _status(client)
                ranks = _ranks(reply)
                ok = len(ranks) == 2 and all(
                    h == "healthy" and alive and step >= 10 for h, alive, step in ranks.values()
                )
                return reply if ok else None

            reply = await until("both ranks training", training, timeout_s=90, proc=proc)
            victim = next(r for r in reply.jobs[0].ranks if r.rank == 1)
            os.kill(victim.pid, signal.SIGSTOP)
            try:

                async def blamed() -> dict[int, tuple[str, bool, int]] | None:
                    ranks = _ranks(await _status(client))
                    ok = ranks.get(1, ("", True, 0))[:2] == ("dead", False) and ranks[0][:2] == (
                        "waiting",
                        True,
                    )
                    return ranks if ok else None

                await until("rank 1 dead and rank 0 waiting on it", blamed, timeout_s=30, proc=proc)
                # Status and devices read one verdict: the same state, reason and liveness per rank.
                seen: dict[int, tuple[str, bool]] = {}

                async def agree() -> bool:
                    devices = await _devices(run_env)
                    reply = await _status(client)
                    if reply is None:
                        return False
                    for r in reply.jobs[0].ranks:
                        seen[r.rank] = (r.health, r.alive)
                    return all(
                        devices[r.rank]["state"] == r.health and r.alive == (r.health != "dead")
                        for r in reply.jobs[0].ranks
                    )

                await until("status and devices agreeing", agree, timeout_s=20, proc=proc)
                assert seen == {0: ("waiting", True), 1: ("dead", False)}
                devices = await _devices(run_env)
                assert "rank 1 (dead)" in str(devices[0]["reason"]), devices
                # Waiting outlasts --hung-after: still waiting, never hung.
                await asyncio.sleep(STALL_S)
                assert _ranks(await _status(client))[0][0] == "waiting"
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            stalled_step = _ranks(await _status(client))[0][2]

            async def recovered() -> bool:
                ranks = _ranks(await _status(client))
                return len(ranks) == 2 and all(
                    h == "healthy" and alive and step > stalled_step + 5 for h, alive, step in ranks.values()
                )

            await until("both ranks healthy and training again", recovered, timeout_s=30, proc=proc)
            feed.cancel()

    events = [e for e in announced if e.kind.startswith(("rank_", "ranks_"))]
    summary = [(e.kind, dict(e.attrs)) for e in events]
    dead = [e for e in events if e.kind == "rank_dead"]
    assert [(e.attrs["rank"], e.attrs.get("waiting")) for e in dead] == [("1", "0")], summary
    assert dead[0].message.endswith("; rank 0 waiting on it"), dead[0].message
    # Rank 0 never had an event of its own while it waited: no hung, no straggler, no dead.
    assert not [e for e in events if e.attrs.get("rank") == "0" and e.kind != "rank_joined"], summary
    back = [e for e in events if e.kind == "rank_recovered" and e.attrs.get("rank") == "1"]
    assert back and back[0].time_s > dead[0].time_s, summary
    resumed = back[0].attrs.get("resumed") or next(
        (e.attrs["ranks"] for e in events if e.kind == "ranks_resumed"), ""
    )
    assert resumed == "0", summary
