"""Every attack of the security review, replayed against a default `torchloom run` 2-rank job. First
what the bus itself refuses (the embedded server admits only torchloom's roles):

- an anonymous client cannot connect;
- the job's own threadlet credential cannot publish another job's heartbeats or acks, nor read another
  job's commands (nor its own job's stream metadata);
- a WebSocket handshake from a foreign page Origin gets 403 (the UI's own origin is accepted).

Then, by a client that can publish anyway (the weaver's own NATS credential, the strongest publisher
there is), what the weaver and the ranks refuse. Each attack must fail with the job training on and
its state unchanged, and a legitimate command afterwards must still apply:

- forged commands straight onto the command subject (a rollback pointing at a crafted pickle
  checkpoint, an in-bounds lr, a command signed with another key): refused by every rank, journaled;
- forged heartbeats (a new run id, last_seq=1000000, phantom rank 7, rank -5, subject/body mismatch,
  a second incarnation of a live rank): status unchanged;
- forged acks (APPLIED for a command the ranks refuse, REJECTED for one they apply): outcomes true;
- forged restart requests on the launcher subject (unsigned, signed with another key): the launcher
  refuses them (a `restart_refused` event each) and the run is not relaunched;
- a flood of heartbeats with distinct job names: weaver memory bounded, status small, a concurrent set
  still applied and journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.integration.helpers import EXAMPLE, kill_tree, unbound_env, until, ws_handshake
from torchloom import bus, discovery, signing, subjects, wire
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, CredentialStore, Role
from torchloom.errors import NatsUnavailable
from torchloom.messages import (
    Ack,
    AckStatus,
    Action,
    ActionKind,
    Command,
    Heartbeat,
    Issuer,
    JobEvent,
    JobStatus,
    Outcome,
    OutcomeStatus,
    RestartRequest,
    SetConfig,
    SubmitRequest,
)

JOB = "sec"


class _Payload:
    """Unpickling this creates `marker`: the code a crafted checkpoint would run in a rank."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _crafted_checkpoint(root: Path, marker: Path) -> Path:
    """A directory that looks like a DCP checkpoint whose metadata and items are pickles of `_Payload`."""
    path = root / "evil" / "ckpt-1"
    path.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (path / name).write_bytes(pickle.dumps(_Payload(marker)))
    (path / "torchloom-complete.json").write_text(json.dumps({"step": 1, "branch": "main"}))
    return path


async def _attacker(info: discovery.WeaverInfo) -> Any:
    """A NATS client with every publish right: the weaver's own credential (nobody else may publish
    where these attacks publish; the signatures and the weaver's checks must hold even so)."""
    store = CredentialStore(info.secrets_dir)
    return await nats.connect(info.nats_url, **store.client_auth(Role.WEAVER).nats_options())


OTHER = "other"  # a job the threadlet credential of JOB must not speak for


async def _refused_at_the_bus(client: ControlClient, info: discovery.WeaverInfo, start: JobStatus) -> None:
    """What the embedded server itself refuses, with the job's own ranks training on."""
    store = CredentialStore(info.secrets_dir)
    # No credential, no connection (plain NATS): the server answers "Authorization Violation" and
    # closes, which the client sees as either.
    with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset"):
        await bus.connect(info.nats_url, name="anonymous", connect_timeout_s=1.0)
    # A foreign page cannot open the WebSocket; the UI's own origin can (and must then authenticate).
    ws_port = int(info.ws_url.rsplit(":", 1)[1])
    assert ws_handshake(ws_port, "http://evil.example") == 403
    assert ws_handshake(ws_port, f"http://127.0.0.1:{info.ui_port}") == 101
    # The job's own threadlet credential (what every rank of JOB holds) against job OTHER.
    weaver = await _attacker(info)
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    rank = await bus.connect(
        info.nats_url,
        name="threadlet-of-sec",
        credentials=store.client_auth(Role.THREADLET, JOB),
        on_error=on_error,
    )
    try:
        js = weaver.jetstream()
        other = await bus.ensure_job_commands(js, OTHER)
        await js.publish(other.subject("r1"), b"other's command")
        hb = Heartbeat(job=OTHER, run_id="r1", rank=0, world_size=1, incarnation="x", sent_at_s=time.time())
        await rank.publish(subjects.heartbeat(OTHER, 0), wire.encode(hb))
        forged_ack = Ack(
            command_id="c", job=OTHER, run_id="r1", seq=1, rank=0, incarnation="x", status=AckStatus.APPLIED
        )
        await rank.publish(subjects.acks(OTHER), wire.encode(forged_ack))
        # Nor on OTHER's ack capture subjects, whatever the token (it cannot know OTHER's anyway).
        await rank.publish(subjects.ack_capture(other.ack_token, OTHER), wire.encode(forged_ack))
        await rank.flush()
        with pytest.raises(Exception):  # noqa: B017 (a refused JetStream request just gets no answer)
            await rank.jetstream(timeout=2.0).subscribe(
                subjects.commands(OTHER, "r1"),
                stream=subjects.stream_commands_of(OTHER),
                ordered_consumer=True,
            )
        with pytest.raises(Exception):  # noqa: B017 (stream info is the weaver's, even of its own job)
            await rank.jetstream(timeout=2.0).stream_info(subjects.stream_commands_of(JOB))
        deadline = time.monotonic() + 10
        wanted = (
            f'publish to "{subjects.heartbeat(OTHER, 0)}"',
            f'publish to "{subjects.acks(OTHER)}"',
            f'publish to "{subjects.ack_capture(other.ack_token, OTHER)}"',
        )
        while not all(any(w.lower() in v for v in violations) for w in wanted):
            assert time.monotonic() < deadline, f"the server did not refuse the forged reports: {violations}"
            await asyncio.sleep(0.1)
        assert any(subjects.stream_commands_of(OTHER).lower() in v for v in violations), violations
    finally:
        await rank.close()
        await weaver.close()
    # Nothing of it reached the weaver: no job OTHER, and JOB goes on as it was.
    assert [j.job for j in (await client.status()).jobs] == [JOB]
    await asyncio.sleep(0.5)
    _same_ranks(start, await _status(client))
    # The ranks' own credential file, as `torchloom run` hands it over: 0600, named in their
    # environment only by its path.
    seed = store.nkey_user(Role.THREADLET, JOB).seed_file
    assert seed.stat().st_mode & 0o077 == 0
    assert ClientAuth.from_file(seed).seed_file == seed


async def _status(client: ControlClient) -> JobStatus:
    jobs = [j for j in (await client.status(JOB)).jobs if j.job == JOB]
    assert jobs, "the job is gone from status"
    return jobs[0]


async def _until_training(client: ControlClient, proc: subprocess.Popen[bytes], min_step: int) -> JobStatus:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"torchloom run exited early with {proc.returncode}"
        with contextlib.suppress(Exception):
            st = await _status(client)
            if (
                len(st.ranks) == 2
                and all(r.alive for r in st.ranks)
                and min(r.step for r in st.ranks) >= min_step
            ):
                return st
        await asyncio.sleep(0.2)
    raise AssertionError(f"the job never reached step {min_step}")


async def _set(client: ControlClient, **values: Any) -> Outcome:
    return await client.submit(
        SubmitRequest(job=JOB, body=SetConfig(values=values), timeout_s=30, command_id=uuid.uuid4().hex)
    )


def _forged(status: JobStatus, body: SetConfig | Action, *, seq: int | None = None) -> Command:
    return Command(
        command_id=uuid.uuid4().hex,
        job=JOB,
        run_id=status.run_id,
        seq=seq if seq is not None else status.last_seq + 1,
        issuer=Issuer(kind="cli", identity="attacker"),
        issued_at_s=time.time(),
        body=body,
    )


async def _until_lr(client: ControlClient, lr: float) -> JobStatus:
    """Status once both ranks' heartbeats report `lr` (they come every 0.2 s)."""
    deadline = time.monotonic() + 10
    while True:
        st = await _status(client)
        if {r.knobs.get("lr") for r in st.ranks} == {lr}:
            return st
        assert time.monotonic() < deadline, f"status never showed lr={lr}: {[r.knobs for r in st.ranks]}"
        await asyncio.sleep(0.1)


def _same_ranks(before: JobStatus, after: JobStatus) -> None:
    assert after.run_id == before.run_id and after.world_size == before.world_size == 2
    assert [(r.rank, r.incarnation, r.host) for r in after.ranks] == [
        (r.rank, r.incarnation, r.host) for r in before.ranks
    ]
    assert all(r.alive for r in after.ranks)
    assert max(r.step for r in after.ranks) > max(r.step for r in before.ranks), "training stalled"


async def _journal(client: ControlClient) -> list[Outcome | JobEvent]:
    return [e async for e in client.journal(JOB) if isinstance(e, Outcome | JobEvent)]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.timeout(480)
async def test_every_attack_fails_and_the_job_trains_on(
    tmp_path: Path, tl_home: Path, subprocess_env: dict[str, str]
) -> None:
    env = unbound_env(subprocess_env, OMP_NUM_THREADS="1")
    out, marker = tmp_path / "out", tmp_path / "pwned"
    cmd = [
        sys.executable, "-m", "torchloom.app.cli", "run", "--job", JOB, "--nproc-per-node", "2",
        str(EXAMPLE), "--steps", "1000000", "--step-sleep", "0.02", "--out", str(out),
    ]  # fmt: skip
    proc = _start(cmd, env, tmp_path / "run.log")
    try:
        deadline = time.monotonic() + 60
        while (info := discovery.read()) is None:
            assert time.monotonic() < deadline and proc.poll() is None, "no control plane came up"
            await asyncio.sleep(0.2)
        async with ControlClient(info.grpc, timeout_s=30) as client:
            start = await _until_training(client, proc, min_step=5)
            await _attack_all(client, start, info, tl_home, tmp_path, marker)
            stopped = await client.submit(
                SubmitRequest(
                    job=JOB, body=Action(kind=ActionKind.STOP), timeout_s=60, command_id=uuid.uuid4().hex
                )
            )
            assert stopped.status is OutcomeStatus.APPLIED, stopped.reason
        assert await asyncio.to_thread(proc.wait, 120) == 0
        # The ranks' own records: every decided command came from the weaver (a real command id).
        for rank in (0, 1):
            decided = json.loads((out / f"rank{rank}.applied.json").read_text())
            assert all(d["command_id"] and "attacker" not in json.dumps(d) for d in decided)
            lrs = {
                json.loads(line)["lr"]["body"]
                for line in (out / f"rank{rank}.jsonl").read_text().splitlines()
            }
            assert 0.005 not in lrs and 0.006 not in lrs, "a forged lr was applied"
        assert not marker.exists(), "the crafted checkpoint ran code in a rank"
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)


async def _attack_all(
    client: ControlClient,
    start: JobStatus,
    info: discovery.WeaverInfo,
    home: Path,
    tmp_path: Path,
    marker: Path,
) -> None:
    await _refused_at_the_bus(client, info, start)
    nc = await _attacker(info)
    try:
        await _forged_commands(client, nc, start, tmp_path, marker)
        await _forged_heartbeats(client, nc)
        await _forged_acks(client, nc)
        await _forged_restarts(client, nc)
        await _flood(client, nc, info)
    finally:
        await nc.close()


async def _forged_commands(
    client: ControlClient, nc: Any, start: JobStatus, tmp_path: Path, marker: Path
) -> None:
    evil = _crafted_checkpoint(tmp_path, marker)
    # Straight onto the subject the ranks read: nats-server stores nothing there (the job's stream
    # captures only the weaver's secret capture subject), so no rank even sees it.
    stream = await bus.ensure_job_commands(nc.jetstream(), JOB)
    stored = (await nc.jetstream().stream_info(stream.stream)).state.last_seq
    await nc.publish(subjects.commands(JOB, start.run_id), b"not stored")
    await nc.flush()
    # The attacker holds the weaver's credential here, so it can read the capture subject and reach
    # the ranks: the signatures must hold even so.
    subject = stream.subject(start.run_id)
    rollback = _forged(
        start,
        Action(
            kind=ActionKind.ROLLBACK,
            args={"checkpoint": "ckpt-1", "checkpoint_id": "ckpt-1", "checkpoint_path": str(evil)},
        ),
    )
    await nc.publish(subject, wire.encode(rollback))
    lr = _forged(start, SetConfig(values={"lr": 0.005}), seq=start.last_seq + 2)
    await nc.publish(subject, wire.encode(lr))
    other_key = signing.Signer.generate().sign(
        _forged(start, SetConfig(values={"lr": 0.006}), seq=start.last_seq + 3)
    )
    await nc.publish(subject, wire.encode(other_key))
    await nc.flush()

    async def three_stored() -> bool:  # JetStream stores a core publish after the flush's round trip
        return (await nc.jetstream().stream_info(stream.stream)).state.last_seq == stored + 3

    await until("the three forged commands stored", three_stored)
    # The next real command still takes the next seq and applies on both ranks.
    applied = await _set(client, lr=0.002)
    assert applied.status is OutcomeStatus.APPLIED, applied.reason
    assert applied.command is not None and applied.command.seq == start.last_seq + 1
    _same_ranks(start, await _until_lr(client, 0.002))
    assert not await asyncio.to_thread(marker.exists)
    refusals: list[JobEvent] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        refusals = [
            e
            for e in await _journal(client)
            if isinstance(e, JobEvent)
            and e.kind == "refused"
            and "unsigned command refused on rank" in e.message
        ]
        if {e.attrs.get("rank") for e in refusals} >= {"0", "1"}:
            break
        await asyncio.sleep(0.5)
    assert {e.attrs.get("rank") for e in refusals} >= {"0", "1"}, refusals


async def _forged_heartbeats(client: ControlClient, nc: Any) -> None:
    before = await _status(client)
    real = before.ranks[0]

    def hb(rank: int, **kw: Any) -> Heartbeat:
        fields: dict[str, Any] = {
            "job": JOB,
            "run_id": before.run_id,
            "rank": rank,
            "world_size": 2,
            "incarnation": uuid.uuid4().hex,
            "host": "evil",
            "pid": 666,
            "step": 1,
        }
        fields.update(kw)
        return Heartbeat(**fields)

    forged = [
        (subjects.heartbeat(JOB, 0), hb(0, run_id="evil")),  # a new run: takes the job away
        (subjects.heartbeat(JOB, 0), hb(0, incarnation=real.incarnation, host=real.host, last_seq=1_000_000)),
        (subjects.heartbeat(JOB, 7), hb(7)),  # a phantom rank
        (subjects.heartbeat(JOB, -5), hb(-5)),
        (subjects.heartbeat(JOB, 0), hb(1)),  # subject says rank 0, body rank 1
        (subjects.heartbeat(JOB, 1), hb(1)),  # a second incarnation of a live rank
        (subjects.heartbeat(JOB, 0), hb(0, world_size=3)),
    ]
    for _ in range(5):
        for subject, beat in forged:
            await nc.publish(subject, wire.encode(beat))
        await nc.flush()
        await asyncio.sleep(0.1)
    applied = await _set(client, lr=0.003)
    assert applied.status is OutcomeStatus.APPLIED, applied.reason
    after = await _status(client)
    _same_ranks(before, after)
    assert after.last_seq < 1_000_000 and [r.rank for r in after.ranks] == [0, 1]
    assert all(r.host != "evil" for r in after.ranks)


async def _forged_acks(client: ControlClient, nc: Any) -> None:
    before = await _status(client)

    async def forge(status: AckStatus, stop: asyncio.Event) -> None:
        seq = before.last_seq + 1
        while not stop.is_set():
            for rank in (0, 1):
                ack = Ack(
                    command_id="",
                    job=JOB,
                    run_id=before.run_id,
                    seq=seq,
                    rank=rank,
                    incarnation=uuid.uuid4().hex,
                    status=status,
                    reason="forged",
                )
                await nc.publish(subjects.acks(JOB), wire.encode(ack))
            await asyncio.sleep(0.002)

    for status, body, expect in (
        (AckStatus.APPLIED, {"mix": "not-a-mixture"}, OutcomeStatus.REJECTED),
        (AckStatus.REJECTED, {"lr": 0.004}, OutcomeStatus.APPLIED),
    ):
        stop = asyncio.Event()
        task = asyncio.create_task(forge(status, stop))
        try:
            await asyncio.sleep(0.05)
            outcome = await _set(client, **body)
        finally:
            stop.set()
            await task
        assert outcome.status is expect, (body, outcome.reason)
        assert all(r.reason != "forged" for r in outcome.results)
        before = await _status(client)
    await _until_lr(client, 0.004)


async def _forged_restarts(client: ControlClient, nc: Any) -> None:
    before = await _status(client)
    data = wire.encode(
        RestartRequest(job=JOB, run_id=before.run_id, world_size=1, exclude_ranks=(1,), reason="forged")
    )
    other_key = {signing.SIGNATURE_HEADER: signing.Signer.generate().sign_restart(data)}
    want = {"it is unsigned", "its signature is not the weaver's"}
    seen: set[str] = set()
    for headers in (None, other_key):
        await nc.publish(subjects.launcher(JOB), data, headers=headers)
        await nc.flush()
        await asyncio.sleep(1.1)  # the launcher reports a refusal once a second
    deadline = time.monotonic() + 20
    while seen != want:
        events = [e for e in await _journal(client) if isinstance(e, JobEvent)]
        assert not [e for e in events if e.kind.startswith("reconfigure_")], (
            "a forged restart was carried out"
        )
        seen = {w for e in events if e.kind == "restart_refused" for w in want if w in e.message}
        assert time.monotonic() < deadline, f"the launcher did not report both refusals: {seen}"
        await asyncio.sleep(0.5)
    applied = await _set(client, lr=0.0025)
    assert applied.status is OutcomeStatus.APPLIED, applied.reason
    _same_ranks(before, await _until_lr(client, 0.0025))  # same run, same incarnations: no relaunch


async def _flood(client: ControlClient, nc: Any, info: discovery.WeaverInfo) -> None:
    before = await _status(client)
    rss_before = _rss_kib(info.pid)
    stop = asyncio.Event()

    async def flood() -> int:
        sent = 0
        while not stop.is_set() and sent < 20_000:
            for _ in range(200):
                name = f"flood{sent}"
                beat = Heartbeat(job=name, run_id="r", rank=0, world_size=1, incarnation="i", host="evil")
                await nc.publish(subjects.heartbeat(name, 0), wire.encode(beat))
                sent += 1
            await asyncio.sleep(0)
        await nc.flush()
        return sent

    task = asyncio.create_task(flood())
    try:
        outcome = await _set(client, lr=0.001)
    finally:
        sent = await task
    assert sent == 20_000
    assert outcome.status is OutcomeStatus.APPLIED, outcome.reason
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    reply = await client.status()
    took = time.monotonic() - t0
    size = len(wire.encode(reply))
    assert size < 500_000 and took < 1.5, (size, took)
    assert len(reply.jobs) <= 257
    grown_mib = (_rss_kib(info.pid) - rss_before) / 1024
    assert grown_mib < 40, f"the weaver grew {grown_mib:.0f} MiB under the flood"
    _same_ranks(before, await _status(client))
    # Heartbeats make no JetStream streams: a job's command stream comes with its first valid command.
    flooded = [
        s.config.name
        for s in await nc.jetstream().streams_info()
        if (s.config.name or "").startswith(f"{subjects.STREAM_COMMANDS_JOB_PREFIX}flood")
    ]
    assert flooded == [], f"{len(flooded)} command streams made for flood jobs, e.g. {flooded[:3]}"
    # The journal is written behind the answer (an outbox), so give it time, but it must arrive.
    deadline = time.monotonic() + 30
    while outcome.command_id not in {e.command_id for e in await _journal(client) if isinstance(e, Outcome)}:
        assert time.monotonic() < deadline, "the concurrent set was not journaled"
        await asyncio.sleep(0.5)
