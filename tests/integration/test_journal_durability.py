"""The journal survives a restart of both the weaver and the nats-server: a real 2-rank torchrun job
is steered, then the weaver and the server are stopped and started again on the same store; the
journal still holds the command with its issuer, payload and per-rank steps, and the job, which
kept training meanwhile, takes a new command with the next seq."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.helpers import auth, rank_creds, until, weaver_pubkey
from torchloom import tokens
from torchloom.client import ControlClient
from torchloom.credentials import CredentialStore
from torchloom.messages import Issuer, JobEvent, Outcome, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import open_weaver
from weaver.config import WeaverConfig

JOB = "durable"


async def wait_for_ranks(
    client: ControlClient, world: int, deadline_s: float = 90.0, logs: tuple[Path, ...] = ()
) -> int:
    """Wait until `world` ranks of JOB are alive and their knobs known (a weaver that has not seen
    them yet answers a set with "try again"); return the highest step they report."""

    async def top_step() -> tuple[int] | None:
        jobs = [j for j in (await client.status()).jobs if j.job == JOB]
        if jobs and sum(r.alive for r in jobs[0].ranks) == world and jobs[0].knobs:
            return (max(r.step for r in jobs[0].ranks),)  # a tuple: step 0 is found too
        return None

    (step,) = await until(f"{world} live ranks of {JOB}", top_step, timeout_s=deadline_s, logs=logs)
    return int(step)


async def journal(client: ControlClient) -> list[Outcome | JobEvent]:
    return [e for e in [ev async for ev in client.journal(JOB)] if isinstance(e, Outcome | JobEvent)]


@pytest.mark.timeout(300)  # above the sum of the waits below, so a slow phase fails by name
async def test_journal_survives_weaver_and_nats_server_restart(
    tmp_path: Path, subprocess_env: dict[str, str], nats_store: CredentialStore
) -> None:
    server = EmbeddedNats(tmp_path / "nats", credentials=nats_store).start()
    log = tmp_path / "ranks.log"  # the ranks' output, shown when a wait fails
    log_file = log.open("wb")
    env = dict(
        subprocess_env,
        **rank_creds(server, JOB),
        TORCHLOOM_JOB=JOB,
        TORCHLOOM_RUN_ID=uuid.uuid4().hex[:8],
        TORCHLOOM_WEAVER_PUBKEY=weaver_pubkey(),
        OMP_NUM_THREADS="1",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(REPO / "examples" / "train_tiny.py"), "--steps", "100000", "--step-sleep", "0.01",
        "--out", str(tmp_path / "out"),
        env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    issuer = Issuer(kind="agent", identity="durability-test")
    try:
        async with (
            open_weaver(WeaverConfig(nats_url=server.url, nats_credentials=auth(server))) as weaver,
            ControlClient(weaver.grpc_address) as c,
        ):
            await wait_for_ranks(c, 2, logs=(log,))
            first = await c.submit(
                SubmitRequest(job=JOB, body=SetConfig(values={"lr": "0.004"}), issuer=issuer, timeout_s=45)
            )
            assert first.status is OutcomeStatus.APPLIED

            # Wait until the outcome is in the journal before pulling the plug.
            async def journaled() -> bool:
                return any(isinstance(e, Outcome) for e in await journal(c))

            await until("the outcome in the journal", journaled, timeout_s=20)
        server.stop()  # terminate, wait, kill; the store stays on disk
        server.start()  # same port, same store
        async with (
            open_weaver(WeaverConfig(nats_url=server.url, nats_credentials=auth(server))) as weaver,
            ControlClient(weaver.grpc_address) as c,
        ):
            # The ranks reconnected by themselves.
            step_after = await wait_for_ranks(c, 2, deadline_s=60, logs=(log,))
            outcomes = [e for e in await journal(c) if isinstance(e, Outcome)]
            assert [o.command_id for o in outcomes] == [first.command_id]
            kept = outcomes[0]
            assert kept.status is OutcomeStatus.APPLIED
            assert kept.command is not None
            # The issuer is the identity the gRPC token authenticated (the local operator's, which
            # ControlClient sends by default), not the one the client claimed (kept beside it as
            # claimed_identity), and it survives too.
            assert kept.command.issuer == Issuer(
                kind=issuer.kind, identity=tokens.operator_identity(), claimed_identity=issuer.identity
            )
            assert kept.command.issuer.identity != issuer.identity
            assert kept.command.seq == 1
            assert dict(kept.command.body.values) == {"lr": 0.004}  # type: ignore[union-attr]
            assert sorted(r.rank for r in kept.results) == [0, 1]
            assert len({r.step for r in kept.results}) == 1
            assert step_after > kept.results[0].step  # training went on through the restarts
            second = await c.submit(
                SubmitRequest(job=JOB, body=SetConfig(values={"lr": "0.002"}), issuer=issuer, timeout_s=45)
            )
            assert second.status is OutcomeStatus.APPLIED
            assert second.command is not None and second.command.seq == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log_file.close()
        server.stop()
