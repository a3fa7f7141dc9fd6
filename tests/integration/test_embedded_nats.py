"""The embedded nats-server: starts on a free loopback port with JetStream, restarts on its port, and
with credentials refuses anyone without one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from tests.integration.helpers import connect, until
from torchloom import bus, subjects
from torchloom.credentials import CredentialStore, Role
from torchloom.errors import NatsUnavailable
from torchloom.nats_server import EmbeddedNats


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(nats_server)
    yield client
    await client.close()


async def test_embedded_server_serves_jetstream_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "run").start()
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        assert server.ws_url.startswith("ws://127.0.0.1:")
        nc = await bus.connect(server.url, name="test")
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await bus.ensure_streams(js)  # idempotent
        ack = await js.publish(subjects.commands("j", "r"), b"x")
        assert ack.stream == subjects.STREAM_COMMANDS
        await nc.close()
        url = server.url
        server.stop()
        assert not server.running()
        server.start()  # same port, same store: the message survived
        assert server.url == url
        nc = await bus.connect(server.url, name="test")
        msg = await nc.jetstream().get_last_msg(subjects.STREAM_COMMANDS, subjects.commands("j", "r"))
        assert msg.data == b"x"
        await nc.close()
        assert (tmp_path / "run" / "jetstream").is_dir()
    finally:
        server.stop()


async def test_a_secured_server_restarts_with_the_same_credentials_and_refuses_strangers(
    tmp_path: Path,
) -> None:
    store = CredentialStore.open(tmp_path / "secrets")
    server = EmbeddedNats(tmp_path / "run", credentials=store).start()
    try:
        assert not server.websocket  # no UI origin given: no WebSocket listener
        weaver = store.client_auth(Role.WEAVER)
        nc = await bus.connect(server.url, name="weaver", credentials=weaver)
        await bus.ensure_streams(nc.jetstream(), shared_commands=False)
        stream = await bus.ensure_job_commands(nc.jetstream(), "j")
        await nc.jetstream().publish(stream.subject("r"), b"x")
        await nc.close()
        url = server.url
        server.kill()  # as a crash would; the supervisor restarts it on the same port
        server.start()
        assert server.url == url
        nc = await bus.connect(server.url, name="weaver", credentials=weaver)
        msg = await nc.jetstream().get_last_msg(stream.stream, subjects.commands("j", "r"))
        assert msg.data == b"x"
        await nc.close()
        # Refused: the server sends -ERR 'Authorization Violation' and closes the connection; a
        # client that reads the close first sees the reset (seen once in CI), either way no session.
        with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
            await bus.connect(server.url, name="stranger", connect_timeout_s=1.0)
    finally:
        server.stop()


async def test_an_older_stores_shared_command_stream_makes_way_for_per_job_streams(
    nats_server: EmbeddedNats,
) -> None:
    nc = await connect(nats_server)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)  # as an earlier version left its store: one stream for every job
        await js.publish(subjects.commands("j", "r"), b"old")
        assert await bus.remove_shared_commands(js) == 1
        assert await bus.remove_shared_commands(js) == 0  # idempotent
        stream = await bus.ensure_job_commands(js, "j")
        assert stream.stream == subjects.stream_commands_of("j")
        ack = await js.publish(stream.subject("r"), b"new")
        assert ack.stream == subjects.stream_commands_of("j")
        # Stored under the public subject the ranks read, captured only on the weaver's own one.
        assert (await js.get_last_msg(stream.stream, subjects.commands("j", "r"))).data == b"new"
        with pytest.raises(NoStreamResponseError):
            await js.publish(subjects.commands("j", "r"), b"straight onto the public subject", timeout=1.0)
    finally:
        await nc.close()


async def test_a_job_command_stream_keeps_its_capture_token_and_an_older_one_gets_one(
    nats_server: EmbeddedNats,
) -> None:
    nc = await connect(nats_server)
    try:
        js = nc.jetstream()
        # As an earlier version made it: capturing the public subjects themselves.
        await js.add_stream(
            StreamConfig(name=subjects.stream_commands_of("k"), subjects=[subjects.commands_of("k")])
        )
        await js.publish(subjects.commands("k", "r"), b"before")
        first = await bus.ensure_job_commands(js, "k")
        assert await bus.ensure_job_commands(js, "k") == first  # idempotent: the same token
        other = await bus.ensure_job_commands(js, "m")
        assert other.token != first.token  # random per stream
        await js.publish(first.subject("r"), b"after")
        msgs = [await js.get_msg(first.stream, seq) for seq in (1, 2)]
        assert [(m.subject, m.data) for m in msgs] == [
            (subjects.commands("k", "r"), b"before"),
            (subjects.commands("k", "r"), b"after"),
        ]
        with pytest.raises(NoStreamResponseError):
            await js.publish(subjects.commands("k", "r"), b"no longer captured", timeout=1.0)
    finally:
        await nc.close()


async def test_an_older_acks_stream_gets_its_capture_subjects_and_keeps_what_it_stored(
    nc: Client,
) -> None:
    js = nc.jetstream()
    # As an earlier version made it: capturing the public subjects themselves.
    await js.add_stream(StreamConfig(name=subjects.STREAM_ACKS, subjects=[subjects.acks_all()]))
    await js.publish(subjects.acks("j"), b"ack before")
    await bus.ensure_streams(js, shared_commands=False)
    with pytest.raises(NoStreamResponseError):
        await js.publish(subjects.acks("j"), b"no longer captured", timeout=1.0)
    # The acks stream captures no job's acks until the weaver gives the job a token.
    stream = await bus.ensure_job_commands(js, "j")
    with pytest.raises(NoStreamResponseError):
        await js.publish(subjects.ack_capture(stream.ack_token, "j"), b"no token yet", timeout=1.0)
    await bus.ensure_ack_capture(js, stream)
    await bus.ensure_ack_capture(js, stream)  # idempotent
    live: list[tuple[str, bytes]] = []

    async def on_live(msg: Msg) -> None:
        live.append((msg.subject, msg.data))

    await nc.subscribe(subjects.acks_all(), cb=on_live)
    await nc.flush()
    ack = await js.publish(subjects.ack_capture(stream.ack_token, "j"), b"ack after")
    assert ack.stream == subjects.STREAM_ACKS
    # Stored, and published again, under the public subject readers read.
    stored = [await js.get_msg(subjects.STREAM_ACKS, seq) for seq in (1, 2)]
    assert [(m.subject, m.data) for m in stored] == [
        (subjects.acks("j"), b"ack before"),
        (subjects.acks("j"), b"ack after"),
    ]
    await until("the live copy", lambda: live == [(subjects.acks("j"), b"ack after")], timeout_s=5.0)
    # A weaver that starts again keeps the job's capture (the ranks keep acking there).
    await bus.ensure_streams(js, shared_commands=False)
    await js.publish(subjects.ack_capture(stream.ack_token, "j"), b"after a restart")


async def test_the_journal_keeps_its_capture_token_stores_only_what_comes_there_and_an_older_one_gets_one(
    nc: Client,
) -> None:
    js = nc.jetstream()
    # As an earlier version made it: capturing the public subjects themselves.
    await js.add_stream(
        StreamConfig(name=subjects.STREAM_JOURNAL, subjects=[subjects.journal_all(), subjects.events_all()])
    )
    await js.publish(subjects.journal("j"), b"before")
    journal = await bus.ensure_streams(js, shared_commands=False)
    assert await bus.ensure_streams(js, shared_commands=False) == journal  # idempotent: the same token
    assert await bus.journal_of(js) == journal
    for public in (subjects.journal("j"), subjects.events("j")):
        with pytest.raises(NoStreamResponseError):
            await js.publish(public, b"no longer captured", timeout=1.0)
    live: list[tuple[str, bytes]] = []

    async def on_live(msg: Msg) -> None:
        live.append((msg.subject, msg.data))

    await nc.subscribe(subjects.journal_all(), cb=on_live)
    await nc.flush()
    await js.publish(journal.subject(subjects.journal("j")), b"after")
    # Stored, and published again, under the public subject readers read.
    msgs = [await js.get_msg(subjects.STREAM_JOURNAL, seq) for seq in (1, 2)]
    assert [(m.subject, m.data) for m in msgs] == [
        (subjects.journal("j"), b"before"),
        (subjects.journal("j"), b"after"),
    ]
    await until("the live copy", lambda: live == [(subjects.journal("j"), b"after")], timeout_s=5.0)


async def test_two_writers_making_the_journal_at_once_agree_on_its_token(nats_server: EmbeddedNats) -> None:
    one, two = await connect(nats_server), await connect(nats_server)
    try:
        made = await asyncio.gather(
            bus.ensure_streams(one.jetstream(), shared_commands=False),
            bus.ensure_streams(two.jetstream(), shared_commands=False),
        )
        assert made[0] == made[1] == await bus.journal_of(one.jetstream())
    finally:
        await one.close()
        await two.close()


async def test_an_ack_token_is_per_job_and_tells_nothing_of_the_command_token(
    nc: Client,
) -> None:
    js = nc.jetstream()
    await bus.ensure_streams(js, shared_commands=False)
    k, m = await bus.ensure_job_commands(js, "k"), await bus.ensure_job_commands(js, "m")
    assert len({k.ack_token, m.ack_token, k.token, m.token}) == 4
    assert (await bus.ensure_job_commands(js, "k")).ack_token == k.ack_token  # every weaver's
    for stream in (k, m):
        await bus.ensure_ack_capture(js, stream)
    captured = (await js.stream_info(subjects.STREAM_ACKS)).config.subjects
    # The placeholder it was made with is gone once a job is captured.
    assert captured == [subjects.ack_capture(k.ack_token, "k"), subjects.ack_capture(m.ack_token, "m")]
    with pytest.raises(NoStreamResponseError):  # k's token is not m's
        await js.publish(subjects.ack_capture(k.ack_token, "m"), b"x", timeout=1.0)


async def test_the_acks_stream_captures_the_newest_jobs_up_to_its_bound(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "ACKS_MAX_CAPTURES", 2)
    js = nc.jetstream()
    await bus.ensure_streams(js, shared_commands=False)
    made = [await bus.ensure_job_commands(js, job) for job in ("k", "m", "n")]
    for stream in made:
        await bus.ensure_ack_capture(js, stream)
    captured = (await js.stream_info(subjects.STREAM_ACKS)).config.subjects
    assert captured == [subjects.ack_capture(s.ack_token, s.job) for s in made[1:]]
