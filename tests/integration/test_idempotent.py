"""Idempotent submission end to end, against a real nats-server, weaver process and 2-rank torchrun job:

- a refused submit is journaled once (who asked, why, no seq), and a repeat of its id is the same
  refusal;
- the weaver killed between a `torchloom set` and its outcome: the CLI's retry, with the same command
  id, gets the outcome from the restarted weaver; exactly one seq, applied once on each rank;
- nats-server killed and restarted during a stream of commands: every client result agrees with the
  ranks' records and the journal holds exactly one outcome per seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import EXAMPLE, job_env, start_session, until
from tests.integration.helpers import cli as run_cli
from tests.integration.weaver_proc import WeaverProc
from torchloom.client import ControlClient, SubmitResult, submit_until
from torchloom.errors import JobNotFound, WeaverUnavailable
from torchloom.messages import (
    Action,
    ActionKind,
    Issuer,
    Outcome,
    OutcomeStatus,
    SetConfig,
    SubmitRequest,
)
from torchloom.nats_server import EmbeddedNats

JOB = "idem"
ISSUER = Issuer(kind="agent", identity="idempotence-test")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """An open nats-server (no roles) for this module: what is under test is idempotent submission
    through weaver and server kills, driven by a bare weaver process (weaver_proc.py) that takes no
    NATS credential; NATS roles have their own tests (test_nats_permissions, test_security)."""
    server = EmbeddedNats(tmp_path / "open-nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def trained(addr: str) -> bool:
    try:
        async with ControlClient(addr, timeout_s=2.0) as client:
            reply = await client.status(JOB)
    except (JobNotFound, WeaverUnavailable):
        return False
    return bool(reply.jobs) and sum(r.alive and bool(r.knobs) for r in reply.jobs[0].ranks) == 2


async def submit(addr: str, body: Any, command_id: str = "") -> SubmitResult:
    request = SubmitRequest(job=JOB, body=body, issuer=ISSUER, command_id=command_id)
    return await submit_until(request, lambda: addr, deadline_s=60.0)


async def journal(addr: str) -> list[Any]:
    async with ControlClient(addr) as client:
        return [e async for e in client.journal(JOB)]


@contextlib.asynccontextmanager
async def training_job(
    tmp_path: Path,
    env: dict[str, str],
    server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
    **job_vars: str,
) -> AsyncIterator[tuple[WeaverProc, subprocess.Popen[bytes], Path]]:
    """A weaver process on `server` and a 2-rank job training under it: (weaver, job, records dir)."""
    weaver = WeaverProc(server.url, env, tmp_path / "weaver.log")
    weaver.start()
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(EXAMPLE), "--steps", "1000000", "--out", str(out), "--step-sleep", "0.02",
    ]  # fmt: skip
    job = start_session(cmd, job_env(env, JOB, TORCHLOOM_NATS_URL=server.url, **job_vars))
    procs.append(job)
    try:
        await until("two training ranks", lambda: trained(weaver.addr), timeout_s=90, proc=job)
        yield weaver, job, out
    finally:
        weaver.stop()


async def stop_job(addr: str, job: subprocess.Popen[bytes]) -> SubmitResult:
    stopped = await submit(addr, Action(kind=ActionKind.STOP))
    assert stopped.outcome is not None and stopped.outcome.status is OutcomeStatus.APPLIED, stopped
    await until("the job to end", lambda: job.poll() is not None, timeout_s=60)
    assert job.returncode == 0
    return stopped


def ranks_records(out: Path) -> list[list[dict[str, Any]]]:
    records = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert [d["seq"] for d in rec] == list(range(1, len(rec) + 1)), "seqs not decided once, in order"
    assert [(d["seq"], d["command_id"], d["status"]) for d in records[0]] == [
        (d["seq"], d["command_id"], d["status"]) for d in records[1]
    ]
    return records


def one_outcome_per_seq(entries: list[Any]) -> dict[int, Outcome]:
    by_seq: dict[int, Outcome] = {}
    for e in entries:
        if isinstance(e, Outcome) and e.command is not None:
            assert e.command.seq not in by_seq, f"two outcomes for seq {e.command.seq}"
            by_seq[e.command.seq] = e
    return by_seq


@pytest.mark.timeout(240)
async def test_weaver_killed_between_submit_and_outcome_and_a_refusal_journaled_once(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    # Ranks file each command up to 3 s after it arrives: time to kill the weaver in between.
    async with training_job(
        tmp_path, subprocess_env, nats_server, procs, TORCHLOOM_TEST_DELIVERY_DELAY_S="3"
    ) as (weaver, job, out):
        # A refusal: journaled once, with who asked and why; its repeat is the same decision.
        bad = await submit(weaver.addr, SetConfig(values={"lr": "-1"}), command_id="refused-1")
        again = await submit(weaver.addr, SetConfig(values={"lr": "-1"}), command_id="refused-1")
        assert bad.outcome is not None and bad.outcome.status is OutcomeStatus.REJECTED
        assert again.outcome == bad.outcome

        async def refusal() -> list[Outcome]:
            return [e for e in await journal(weaver.addr) if isinstance(e, Outcome) and e.command is None]

        refused = await until("the refusal in the journal", refusal, timeout_s=30)
        assert len(refused) == 1 and refused[0].command_id == "refused-1"
        assert refused[0].reason == bad.outcome.reason and refused[0].issuer is not None
        shown = await asyncio.to_thread(
            run_cli, "journal", "--command", "refused-1", "--grpc", weaver.addr, "--json", env=subprocess_env
        )
        assert shown.returncode == 2, shown.stderr  # exits like the submit did: rejected
        assert json.loads(shown.stdout)["command_id"] == "refused-1"

        # `torchloom set` (its own command id), then the weaver dies before any rank answered.
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torchloom.app.cli", "set", "lr=0.0123", "--job", JOB,
            "--grpc", weaver.addr, "--timeout", "60", "--json",
            env=subprocess_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        async def published() -> bool:
            try:
                async with ControlClient(weaver.addr, timeout_s=2.0) as client:
                    return (await client.status(JOB)).jobs[0].last_seq >= 1
            except (JobNotFound, WeaverUnavailable):
                return False

        await until("the command published", published, timeout_s=30, proc=cli)
        await asyncio.sleep(0.3)  # stored in the stream; the ranks have not filed it yet
        weaver.kill()
        weaver.start()
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=90)
        assert cli.returncode == 0, stderr.decode()
        result = json.loads(stdout)
        assert result["status"] == "applied" and [a["rank"] for a in result["applied"]] == [0, 1]

        await stop_job(weaver.addr, job)
        records = ranks_records(out)
        sets = [d for d in records[0] if d["kind"] == "set"]
        assert [(d["seq"], d["command_id"], d["status"]) for d in sets] == [
            (1, result["command_id"], "applied")
        ]
        by_seq = one_outcome_per_seq(await journal(weaver.addr))
        assert by_seq[1].command_id == result["command_id"] and by_seq[1].status is OutcomeStatus.APPLIED
        assert sorted(by_seq) == [d["seq"] for d in records[0]]


@pytest.mark.timeout(240)
async def test_nats_server_killed_during_a_stream_of_commands(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    async with training_job(tmp_path, subprocess_env, nats_server, procs) as (weaver, job, out):
        results: list[tuple[float, SubmitResult]] = []
        kill_at = {5, 12}
        for n in range(1, 21):
            lr = round(1e-3 * (1 + n / 100), 9)
            task = asyncio.create_task(submit(weaver.addr, SetConfig(values={"lr": lr})))
            if n in kill_at:
                await asyncio.sleep(0.05)  # while the command is in flight
                assert nats_server.pid is not None
                os.kill(nats_server.pid, signal.SIGKILL)
                await asyncio.sleep(0.5)
                nats_server.start()  # same port, same store
            results.append((lr, await task))
        stopped = await stop_job(weaver.addr, job)

        decided = {d["command_id"]: d for d in ranks_records(out)[0]}
        for lr, result in results:
            outcome = result.outcome
            assert outcome is not None and outcome.status is OutcomeStatus.APPLIED, result
            d = decided[result.command_id]
            assert d["status"] == "applied" and d["values"] == {"lr": lr}
            assert outcome.command is not None and outcome.command.seq == d["seq"]
        assert set(decided) == {r.command_id for _, r in results} | {stopped.command_id}

        async def complete() -> dict[int, Outcome] | None:
            by_seq = one_outcome_per_seq(await journal(weaver.addr))
            return by_seq if len(by_seq) == len(decided) else None

        by_seq = await until("every outcome in the journal", complete, timeout_s=30)
        assert {o.command_id: s for s, o in by_seq.items()} == {c: d["seq"] for c, d in decided.items()}
