"""An outcome decided but not journaled when its weaver died is journaled by the next weaver, once.

A real nats-server, weaver and 2-rank torchrun job. The journal stream is made to refuse every write
(its max message size set to 1 byte: nothing stored is touched), so the weaver decides a command from
both ranks' acks but its journal write is retried, past ACK_WAIT_S, while the acks stay held and
pending (marked in progress, so JetStream does not deliver them again); then the weaver stops with
the write never landed, the stream takes writes again, and a new weaver starts. It must journal that
command's outcome from the acks its predecessor left unacknowledged (tests/integration/test_chaos.py
saw it lost once: acks delivered again were acknowledged as of no more use while the write was still
being retried; a delivery that comes back all the same, its in-progress mark lost, is held).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import job_env, kill_tree, torchrun, until, wait_training, weaver_config
from torchloom import subjects
from torchloom.client import ControlClient
from torchloom.messages import Outcome, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.acks import ACK_WAIT_S, AckFeed
from weaver.app import open_weaver

JOB = "undone"


async def _journal_takes_writes(js: Any, take: bool) -> None:
    """Let the journal stream store messages again, or refuse every one (nothing stored is touched)."""
    info = await js.stream_info(subjects.STREAM_JOURNAL)
    await js.update_stream(dataclasses.replace(info.config, max_msg_size=-1 if take else 1))


async def _journaled(client: ControlClient, command_id: str) -> list[Outcome]:
    return [e async for e in client.journal(JOB) if isinstance(e, Outcome) and e.command_id == command_id]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("meanwhile", "marks"),
    [("nothing", "kept"), ("ranks_gone", "kept"), ("acks_purged", "kept"), ("nothing", "lost")],
)
async def test_an_outcome_decided_but_not_journaled_is_journaled_by_the_next_weaver(
    meanwhile: str,
    marks: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    nats_server: EmbeddedNats,
    nc: Any,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Between the two weavers: `nothing`; the job ends (`ranks_gone`: the acks its ranks sent are
    all that is left of them, and no rank reports to the next weaver); or the acks stream is purged
    (`acks_purged`: nothing can decide the command, which ends as TIMEOUT saying so). With `marks`
    "lost" the held acks' in-progress marks are lost (the feed sends none), so JetStream delivers
    them again while the write is retried, and the feed must hold those deliveries too."""
    if marks == "lost":

        async def no_marks(self: AckFeed, every_s: float) -> None:
            return None

        monkeypatch.setattr(AckFeed, "_keep_held", no_marks)
    out = tmp_path / "out"
    job = torchrun(out, job_env(subprocess_env, JOB, server=nats_server), steps=1_000_000, step_sleep=0.02)
    procs.append(job)
    js = nc.jetstream()
    # Ranks answer within a second here: a command that waited longer has had its chance.
    config = weaver_config(nats_server, dead_after_s=3.0, command_timeout_s=1.0)
    acks_consumer = config.acks_consumer

    try:
        async with open_weaver(config) as running, ControlClient(running.grpc_address) as client:
            await wait_training(client, JOB, job, out)
            await _journal_takes_writes(js, False)
            decided = await client.submit(
                SubmitRequest(job=JOB, body=SetConfig(values={"lr": 0.003}), timeout_s=60)
            )
            assert decided.status is OutcomeStatus.APPLIED, decided
            # Both acks stay held, unacknowledged, while the outcome's write is retried past
            # ACK_WAIT_S; the feed marks them in progress, so none is delivered again meanwhile
            # (unless the marks are lost: then both are, and held again).
            await asyncio.sleep(2.5 * ACK_WAIT_S)
            info = await js.consumer_info(subjects.STREAM_ACKS, acks_consumer)
            assert info.num_ack_pending >= 2, info
            assert (info.num_redelivered >= 2) if marks == "lost" else (info.num_redelivered == 0), info
            assert not await _journaled(client, decided.command_id), "the journal took a write"
        # The weaver has stopped (its outbox cancelled) with the write never landed.
    finally:
        await _journal_takes_writes(js, True)
    if meanwhile == "ranks_gone":
        kill_tree(job.pid)
        job.wait(timeout=30)
    elif meanwhile == "acks_purged":
        await js.purge_stream(subjects.STREAM_ACKS)

    async with open_weaver(config) as running, ControlClient(running.grpc_address) as client:
        found = await until(
            "the outcome journaled by the next weaver",
            lambda: _journaled(client, decided.command_id),
            timeout_s=60,
            proc=job if meanwhile != "ranks_gone" else None,
        )
        assert len(found) == 1, found
        (kept,) = found
        if meanwhile == "acks_purged":
            assert kept.status is OutcomeStatus.TIMEOUT and not kept.results, kept
            assert "unknown whether rank(s) 0, 1 applied it" in kept.reason, kept.reason
        else:
            assert kept.status is OutcomeStatus.APPLIED
            # The ranks' own answers, as the first weaver decided them.
            assert [(r.rank, r.step) for r in kept.results] == [(r.rank, r.step) for r in decided.results]
        # Exactly once: nothing more is written for it (a repeat of the id gets that decision).
        again = await client.submit(
            SubmitRequest(job=JOB, body=SetConfig(values={"lr": 0.003}), command_id=decided.command_id)
        )
        assert again.command_id == decided.command_id and again.status is kept.status
        assert len(await _journaled(client, decided.command_id)) == 1
