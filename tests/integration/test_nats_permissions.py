"""The NATS permission matrix of docs/security.md, cell by cell, against a real nats-server that runs
the config torchloom generates: each role connects with its own credential (nkeys over NATS, passwords
over WebSocket) and tries every operation; the server's answer must be the documented one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig
from nats.js.errors import NotFoundError

from tests.integration.helpers import until, weaver_config, ws_handshake
from torchloom import bus, subjects, wire
from torchloom.credentials import ClientAuth, CredentialStore, Role, inbox_prefix, permissions
from torchloom.errors import NatsUnavailable
from torchloom.messages import Command, Issuer, SetConfig
from torchloom.nats_server import EmbeddedNats, loopback_origins
from weaver.service import Weaver
from weaver.streams import Streams

REPO = Path(__file__).resolve().parents[2]
UI_PORT = 8765  # only named in allowed_origins; nothing needs to listen there
DECIDE_S = 10.0  # the longest an operation may take to show its effect (2 busy cores)
KV_BUCKET = "TORCHLOOM_PROBE"
PULL_CONSUMER = "probe-pull"
RANK_INCARNATION = "probe"  # the rank consumer the weaver fixture makes on each job's command stream
ROLE_COLUMNS = {
    "weaver": (Role.WEAVER, None),
    "launcher": (Role.LAUNCHER, None),
    "threadlet A": (Role.THREADLET, "A"),
    "ui-viewer": (Role.UI_VIEWER, None),
    "ui-operator": (Role.UI_OPERATOR, None),
}


def documented_matrix() -> dict[str, dict[str, bool]]:
    """The permission matrix table of docs/security.md: {operation: {role column: allowed}}."""
    text = (REPO / "docs" / "security.md").read_text()
    section = text.split("### Permission matrix", 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next heading
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[1:] == list(ROLE_COLUMNS), f"matrix columns {header[1:]} != {list(ROLE_COLUMNS)}"
    matrix: dict[str, dict[str, bool]] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c in ("yes", "no") for c in cells[1:]), f"cells must be yes/no: {row}"
        matrix[cells[0]] = {col: cell == "yes" for col, cell in zip(header[1:], cells[1:], strict=True)}
    return matrix


@dataclass
class Probe:
    """One role's connection, the permission errors the server sent it, and a weaver to observe."""

    nc: Client
    observer: Client
    errors: list[str] = field(default_factory=list)
    news: asyncio.Event = field(default_factory=asyncio.Event)  # set on every error or delivery

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())
        self.news.set()

    async def settle(self, nc: Client | None = None) -> None:
        """Return once the server has processed everything sent so far: its refusal comes before
        its answer to a later PING. nats-py's flush() writes the PING straight to the socket, ahead
        of SUB/PUB commands still queued for its flusher task, so push the queue out first."""
        conn = nc or self.nc
        await conn._flush_pending(force_flush=True)
        await conn.flush()

    async def until(self, done: Callable[[], bool], timeout_s: float = DECIDE_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.news.clear()
                if not done():
                    await self.news.wait()

    def refused(self, kind: str, subject: str, since: int) -> bool:
        needle = f'permissions violation for {kind} to "{subject.lower()}"'
        return any(needle in e for e in self.errors[since:])

    async def publish(self, subject: str) -> bool:
        """Allowed when the observer receives it, refused when the server says so; never both."""
        got = asyncio.Event()

        async def _cb(msg: Any) -> None:
            got.set()
            self.news.set()

        watch = await self.observer.subscribe(subject, cb=_cb)
        await self.settle(self.observer)
        since = len(self.errors)
        try:
            await self.nc.publish(subject, b"probe")
            await self.settle()
            await self.until(lambda: got.is_set() or self.refused("publish", subject, since))
            return got.is_set()
        finally:
            await watch.unsubscribe()

    async def subscribe(self, subject: str) -> bool:
        """Allowed when a message the observer publishes arrives, refused when the server says so."""
        got = asyncio.Event()

        async def _cb(msg: Any) -> None:
            got.set()
            self.news.set()

        since = len(self.errors)
        sub = await self.nc.subscribe(subject, cb=_cb)
        try:
            await self.settle()
            if self.refused("subscription", subject, since):
                return False
            concrete = subject.replace(".>", ".x").replace("*", "x")
            if concrete.startswith(subjects.PREFIX):
                await self.observer.publish(concrete, b"probe")
                await self.until(lambda: got.is_set() or self.refused("subscription", subject, since))
                return got.is_set()
            # Inboxes: the observer may not publish there; the server checks a SUB when it
            # arrives and answered our PINGs after that check, so no error means allowed.
            return True
        finally:
            await sub.unsubscribe()

    async def publish_unseen(self, subject: str) -> bool:
        """For subjects no observer may read (`$JS.ACK.>`): allowed unless the server refuses it (its
        refusal arrives before its answer to our PING)."""
        since = len(self.errors)
        await self.nc.publish(subject, b"")
        await self.settle()
        return not self.refused("publish", subject, since)

    async def request(self, subject: str, payload: dict[str, Any] | None = None) -> bool:
        """A JetStream API request: allowed when any answer comes (a JetStream error answer, a status,
        or a delivered message, which keeps its own subject), refused when the server says so."""
        answered = asyncio.Event()

        async def _cb(msg: Any) -> None:
            answered.set()
            self.news.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=_cb)
        since = len(self.errors)
        try:
            data = json.dumps(payload).encode() if payload is not None else b""
            await self.nc.publish(subject, data, reply=inbox)
            await self.settle()
            await self.until(lambda: answered.is_set() or self.refused("publish", subject, since))
            return answered.is_set()
        finally:
            await sub.unsubscribe()


def _consumer(stream: str, **config: Any) -> dict[str, Any]:
    return {"stream_name": stream, "config": {"ack_policy": "none", "deliver_policy": "all", **config}}


def _operations() -> dict[str, Callable[[Probe], Awaitable[bool]]]:
    api = subjects.JS_API
    cmd_a, cmd_b, journal = (
        subjects.stream_commands_of("A"),
        subjects.stream_commands_of("B"),
        "TORCHLOOM_JOURNAL",
    )
    ops: dict[str, Callable[[Probe], Awaitable[bool]]] = {}

    def pub(subject: str) -> None:
        ops[f"publish `{subject}`"] = lambda p: p.publish(subject)

    def sub(subject: str, label: str = "") -> None:
        ops[f"subscribe `{subject}`{label}"] = lambda p: p.subscribe(subject)

    def req(name: str, subject: str, payload: dict[str, Any] | None = None) -> None:
        ops[f"JetStream {name}"] = lambda p: p.request(subject, payload)

    for family in (
        "cmd.A.r1",
        "cmd.B.r1",
        "wcmd.T.A.r1",
        "hb.A.0",
        "hb.B.0",
        "metrics.A.0",
        "metrics.B.0",
        "ack.A",
        "ack.B",
        "wack.T.A",
        "wack.T.B",
    ):
        pub(f"{subjects.PREFIX}.{family}")
    for family in (
        "events.A",
        "journal.A",
        "wj.T.events.A",
        "wj.T.journal.A",
        "launcher.A",
        "api.submit",
        "api.decide",
        "api.status",
    ):
        pub(f"{subjects.PREFIX}.{family}")
    for owner in (Role.UI_VIEWER, Role.UI_OPERATOR):
        pub(subjects.api_feed(owner.value))
    for family in (
        "cmd.A.r1",
        "wcmd.*.A.*",
        "hb.A.0",
        "hb.B.0",
        "metrics.A.0",
        "ack.A",
        "wack.*.A",
        "events.A",
        "journal.A",
        "wj.*.events.*",
        "launcher.A",
    ):
        sub(f"{subjects.PREFIX}.{family}")
    sub(subjects.api_submit())
    sub("_INBOX.>", " (every inbox)")
    sub("_INBOX.weaver.x", " (the weaver's inbox)")
    sub("_INBOX.ui-viewer.x", " (the viewer's inbox)")
    sub("_INBOX.threadlet.B.x", " (job B's inbox)")
    req("account info", f"{api}.INFO")
    req("stream names", f"{api}.STREAM.NAMES")
    req(f"stream info `{journal}`", f"{api}.STREAM.INFO.{journal}")
    req(f"stream info `{subjects.STREAM_ACKS}`", f"{api}.STREAM.INFO.{subjects.STREAM_ACKS}")
    req(f"stream info `{cmd_a}`", f"{api}.STREAM.INFO.{cmd_a}")
    req("stream create", f"{api}.STREAM.CREATE.PROBE_NEW", {"name": "PROBE_NEW", "subjects": ["probe.new"]})
    req(f"stream purge `{cmd_a}`", f"{api}.STREAM.PURGE.{cmd_a}")
    req(f"consumer create on `{cmd_a}`", f"{api}.CONSUMER.CREATE.{cmd_a}", _consumer(cmd_a))
    filtered = subjects.commands("A", "r1")
    req(
        f"consumer create, named and filtered, on `{cmd_a}`",
        f"{api}.CONSUMER.CREATE.{cmd_a}.probe-named.{filtered}",
        _consumer(cmd_a, name="probe-named", filter_subject=filtered),
    )
    req(f"consumer create on `{cmd_b}`", f"{api}.CONSUMER.CREATE.{cmd_b}", _consumer(cmd_b))
    req(f"consumer create on `{journal}`", f"{api}.CONSUMER.CREATE.{journal}", _consumer(journal))
    req(
        f"consumer create, named, on `{journal}`",
        f"{api}.CONSUMER.CREATE.{journal}.probe-journal",
        _consumer(journal, name="probe-journal"),
    )
    req(
        f"consumer create, push, delivering to `_INBOX.weaver.x`, on `{journal}`",
        f"{api}.CONSUMER.CREATE.{journal}",
        _consumer(journal, deliver_subject="_INBOX.weaver.x", deliver_policy="new", inactive_threshold=10**9),
    )
    req(
        f"consumer next on `{journal}`",
        f"{api}.CONSUMER.MSG.NEXT.{journal}.{PULL_CONSUMER}",
        {"batch": 1, "no_wait": True},
    )
    req(f"consumer info on `{journal}`", f"{api}.CONSUMER.INFO.{journal}.{PULL_CONSUMER}")
    for stream in (cmd_a, cmd_b):
        rank = subjects.rank_consumer("r1", 0, RANK_INCARNATION)
        req(
            f"consumer next on `{stream}`",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{rank}",
            {"batch": 1, "no_wait": True},
        )
        req(f"consumer info on `{stream}`", f"{api}.CONSUMER.INFO.{stream}.{rank}")
        ack = f"$JS.ACK.{stream}.{rank}.1.1.1.0.0"
        ops[f"JetStream ack a delivery of `{stream}`"] = lambda p, ack=ack: p.publish_unseen(ack)  # type: ignore[misc]
    req(f"consumer list on `{cmd_a}`", f"{api}.CONSUMER.LIST.{cmd_a}")
    req(f"consumer delete on `{cmd_a}`", f"{api}.CONSUMER.DELETE.{cmd_a}.no-such-consumer")
    req(f"consumer delete on `{journal}`", f"{api}.CONSUMER.DELETE.{journal}.{PULL_CONSUMER}")
    req(f"message get `{cmd_a}`", f"{api}.STREAM.MSG.GET.{cmd_a}", {"seq": 1})
    req(f"message get `{cmd_b}`", f"{api}.STREAM.MSG.GET.{cmd_b}", {"seq": 1})
    req(f"message delete `{journal}`", f"{api}.STREAM.MSG.DELETE.{journal}", {"seq": 1})
    req(
        "KV bucket create",
        f"{api}.STREAM.CREATE.KV_PROBE_NEW",
        {"name": "KV_PROBE_NEW", "subjects": ["$KV.PROBE_NEW.>"]},
    )
    ops["JetStream KV put"] = lambda p: p.request(f"$KV.{KV_BUCKET}.k")
    req("KV get", f"{api}.DIRECT.GET.KV_{KV_BUCKET}.$KV.{KV_BUCKET}.k")
    req(f"stream delete `{cmd_b}`", f"{api}.STREAM.DELETE.{cmd_b}")
    return ops


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedNats, CredentialStore]]:
    root = tmp_path_factory.mktemp("nats-auth")
    store = CredentialStore.open(root / "secrets")
    for job in ("A", "B"):
        store.grant_job(job)
    server = EmbeddedNats(root / "run", credentials=store, allowed_origins=loopback_origins(UI_PORT)).start()
    try:
        yield server, store
    finally:
        server.stop()


async def connect_as(
    server: EmbeddedNats, store: CredentialStore, role: Role, job: str | None = None, **kw: Any
) -> Client:
    """Connect the way each role does: nkey seed file over NATS, password over WebSocket."""
    if role in (Role.UI_VIEWER, Role.UI_OPERATOR):
        user = store.password_user(role)
        url = server.ws_url.replace("ws://", f"ws://{user.user}:{user.password}@")
        return await bus.connect(
            url, name=role.value, credentials=ClientAuth(inbox_prefix=inbox_prefix(role)), **kw
        )
    return await bus.connect(server.url, name=role.value, credentials=store.client_auth(role, job), **kw)


@pytest.fixture
async def weaver(secured: tuple[EmbeddedNats, CredentialStore]) -> AsyncIterator[Client]:
    """A weaver connection that (re)creates what the matrix needs: streams, a command per job, a pull
    consumer on the journal and a KV bucket (a weaver row may have deleted some of it)."""
    server, store = secured
    nc = await connect_as(server, store, Role.WEAVER)
    js = nc.jetstream()
    journal = await bus.ensure_streams(js, shared_commands=False)
    for job in ("A", "B"):
        stream = await bus.ensure_job_commands(js, job)
        await bus.ensure_ack_capture(js, stream)  # as before the job's first command
        await js.publish(stream.subject("r1"), f"cmd-{job}".encode())
        await bus.ensure_rank_consumer(js, job, "r1", 0, RANK_INCARNATION)  # as at a rank's heartbeat
    await js.publish(journal.subject(subjects.events("A")), b"event")
    await js.add_consumer(
        subjects.STREAM_JOURNAL, ConsumerConfig(durable_name=PULL_CONSUMER, ack_policy="explicit")
    )
    kv = await js.create_key_value(KeyValueConfig(bucket=KV_BUCKET))
    await kv.put("k", b"v")
    yield nc
    await nc.close()


@pytest.mark.parametrize("column", list(ROLE_COLUMNS))
async def test_each_role_can_do_exactly_what_docs_security_md_says(
    column: str, secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    server, store = secured
    documented = documented_matrix()
    ops = _operations()
    assert set(ops) == set(documented), (
        f"untested rows: {sorted(set(documented) - set(ops))}; undocumented operations: "
        f"{sorted(set(ops) - set(documented))}"
    )
    role, job = ROLE_COLUMNS[column]
    probe = Probe(nc=None, observer=weaver)  # type: ignore[arg-type]
    probe.nc = await connect_as(server, store, role, job, on_error=probe.on_error)
    actual: dict[str, bool | str] = {}
    try:
        for name, op in ops.items():
            try:
                actual[name] = await op(probe)
            except Exception as exc:  # report every cell, not just the first surprise
                actual[name] = f"undecided: {exc!r}"
    finally:
        await probe.nc.close()
    expected = {name: documented[name][column] for name in ops}
    wrong = {
        n: actual[n] if isinstance(actual[n], str) else f"server {'allows' if actual[n] else 'refuses'}"
        for n in ops
        if actual[n] != expected[n]
    }
    assert not wrong, f"{column}: the server disagrees with docs/security.md on {json.dumps(wrong, indent=1)}"


async def test_clients_without_credentials_are_refused(secured: tuple[EmbeddedNats, CredentialStore]) -> None:
    server, _ = secured
    for url in (server.url, server.ws_url):
        with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
            await bus.connect(url, name="anonymous", connect_timeout_s=1.0)


async def test_each_role_connects_only_over_its_transport(
    secured: tuple[EmbeddedNats, CredentialStore],
) -> None:
    server, store = secured
    with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
        await bus.connect(
            server.ws_url, name="weaver-ws", credentials=store.client_auth(Role.WEAVER), connect_timeout_s=1.0
        )
    viewer = store.password_user(Role.UI_VIEWER)
    with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
        url = server.url.replace("nats://", f"nats://{viewer.user}:{viewer.password}@")
        await bus.connect(url, name="viewer-plain", connect_timeout_s=1.0)


def test_websocket_accepts_only_the_ui_origin(secured: tuple[EmbeddedNats, CredentialStore]) -> None:
    server, _ = secured
    assert server.ws_port is not None
    assert ws_handshake(server.ws_port, "http://evil.example") == 403
    assert ws_handshake(server.ws_port, f"http://127.0.0.1:{UI_PORT + 1}") == 403
    for origin in loopback_origins(UI_PORT):
        assert ws_handshake(server.ws_port, origin) == 101  # then NATS CONNECT must still authenticate


async def test_a_threadlet_pulls_its_commands_from_the_consumer_the_weaver_made_and_makes_none(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    server, store = secured
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await connect_as(server, store, Role.THREADLET, "A", on_error=on_error)
    try:
        js = nc.jetstream(timeout=2.0)
        stream_a, stream_b = subjects.stream_commands_of("A"), subjects.stream_commands_of("B")
        rank = subjects.rank_consumer("r1", 0, RANK_INCARNATION)
        pulled = await js.pull_subscribe_bind(rank, stream=stream_a)
        msgs = await pulled.fetch(1, timeout=DECIDE_S)
        assert msgs[0].data.startswith(b"cmd-A")
        await msgs[0].ack()
        # No consumer of its own, not even an ordered one on its own job's stream, and none of B's.
        with pytest.raises(Exception, match="timeout"):
            await js.subscribe(subjects.commands("A", "r1"), stream=stream_a, ordered_consumer=True)
        with pytest.raises(Exception, match="timeout"):
            await (await js.pull_subscribe_bind(rank, stream=stream_b)).fetch(1, timeout=2.0)
        for refused in (f"$js.api.consumer.create.{stream_a}", f"$js.api.consumer.msg.next.{stream_b}"):
            assert any(f'permissions violation for publish to "{refused.lower()}' in e for e in errors), (
                errors
            )
    finally:
        await nc.close()


async def _last_seq_of_b(weaver: Client) -> int:
    return int((await weaver.jetstream().stream_info(subjects.stream_commands_of("B"))).state.last_seq)


async def test_a_threadlet_cannot_aim_a_delivery_at_another_jobs_stream(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The vector the weaver-made consumers close: a push consumer's deliver subject is not checked.
    server, store = secured
    attacker = await connect_as(server, store, Role.THREADLET, "A")
    try:
        stream_a, before = subjects.stream_commands_of("A"), await _last_seq_of_b(weaver)
        with pytest.raises(Exception, match="timeout"):  # refused: no answer
            await attacker.request(
                f"{subjects.JS_API}.CONSUMER.CREATE.{stream_a}",
                json.dumps(_consumer(stream_a, deliver_subject=subjects.commands("B", "r1"))).encode(),
                timeout=2.0,
            )
        await asyncio.sleep(0.3)  # a delivery would be stored by now
        assert await _last_seq_of_b(weaver) == before
    finally:
        await attacker.close()


async def _aim_answers(attacker: Client, run_id: str, aimed: str, ack_subject: str) -> None:
    """As a threadlet of A, have JetStream answer at `aimed`: the PubAck of its own ack publish on
    `ack_subject` (A's ack capture subject: its ranks know A's token), and the next message of its
    rank-0 consumer of run `run_id` (a pull's reply subject)."""
    await attacker.publish(ack_subject, b"ack", reply=aimed)
    rank = subjects.rank_consumer(run_id, 0, RANK_INCARNATION)
    await attacker.publish(
        f"{subjects.JS_API}.CONSUMER.MSG.NEXT.{subjects.stream_commands_of('A')}.{rank}",
        json.dumps({"batch": 1, "no_wait": True}).encode(),
        reply=aimed,
    )
    await attacker.flush()


async def _ack_subject_of_a(weaver: Client) -> str:
    stream = await bus.ensure_job_commands(weaver.jetstream(), "A")
    return subjects.ack_capture(stream.ack_token, "A")


async def test_a_reply_subject_aimed_at_another_jobs_commands_stores_nothing(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # nats-server checks no reply subject against permissions, and JetStream answers there (the PubAck
    # of a threadlet's own ack publish, the messages of its pull). A job's command stream captures
    # only its weaver-only capture subject (`bus.JobCommands`), so an answer aimed at the subject B's
    # commands are stored under is stored nowhere. If nats-server starts checking reply subjects,
    # this still holds.
    server, store = secured
    attacker = await connect_as(server, store, Role.THREADLET, "A")
    try:
        before = await _last_seq_of_b(weaver)
        await _aim_answers(attacker, "r1", subjects.commands("B", "r1"), await _ack_subject_of_a(weaver))
        await asyncio.sleep(0.5)  # a stored answer would be there by now
        assert await _last_seq_of_b(weaver) == before
        # Nor can it learn B's (or its own job's) capture subject: no stream info, no subscription.
        with pytest.raises(Exception, match="timeout"):
            await attacker.jetstream(timeout=1.0).stream_info(subjects.stream_commands_of("B"))
    finally:
        await attacker.close()


async def _acks_held(js: JetStreamContext) -> int:
    return int((await js.stream_info(subjects.STREAM_ACKS)).state.messages)


@contextlib.asynccontextmanager
async def _delivered(weaver: Client, aimed: tuple[str, ...]) -> AsyncIterator[list[tuple[str, bytes]]]:
    """`(subject, data)` of every message delivered on `aimed` while the block runs (the weaver's
    subscriptions: whatever reaches a subject, stored or not)."""
    seen: list[tuple[str, bytes]] = []

    async def on_msg(msg: Any) -> None:
        seen.append((msg.subject, msg.data))

    watches = [await weaver.subscribe(a, cb=on_msg) for a in aimed]
    await weaver.flush()
    try:
        yield seen
    finally:
        for w in watches:
            await w.unsubscribe()


async def test_a_reply_subject_aimed_at_another_jobs_acks_stores_nothing(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The acks stream captures only each job's ack capture subject (a token only that job's commands
    # carry), so JetStream's answers to a threadlet of A (the PubAck of its own ack, a copy of one of
    # A's commands through a pull), aimed at B's ack subject or at a made-up capture subject of B, are
    # delivered there (a subscriber sees them) and stored nowhere; a publish on A's public ack subject
    # (where its refusals of unverified commands go, for the weaver to take live) is stored nowhere.
    server, store = secured
    js = weaver.jetstream()
    own_ack = await _ack_subject_of_a(weaver)
    aimed = (subjects.acks("B"), subjects.ack_capture("0" * 32, "B"))
    async with _delivered(weaver, aimed) as seen:
        attacker = await connect_as(server, store, Role.THREADLET, "A")
        try:
            before = await _acks_held(js)
            for target in aimed:
                await _aim_answers(attacker, "r1", target, own_ack)
            await until("the answers delivered", lambda: len(seen) >= 2 * len(aimed), timeout_s=DECIDE_S)
            assert sum(b'"stream"' in data for _, data in seen) == len(aimed)
            await attacker.publish(subjects.acks("A"), b"public ack")
            await attacker.flush()
            await asyncio.sleep(0.3)  # a stored answer would be there by now
            assert await _acks_held(js) == before + len(aimed)  # A's own acks, its right, and nothing else
            assert (await js.get_last_msg(subjects.STREAM_ACKS, subjects.acks("A"))).data == b"ack"
            with pytest.raises(NotFoundError):
                await js.get_last_msg(subjects.STREAM_ACKS, subjects.acks("B"))
        finally:
            await attacker.close()


async def _journal_held(js: JetStreamContext) -> int:
    return int((await js.stream_info(subjects.STREAM_JOURNAL)).state.messages)


async def test_a_reply_subject_aimed_at_another_jobs_journal_and_events_stores_nothing(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The journal stream captures only its capture subjects (`bus.JournalStream`: a token the weaver
    # and launcher roles alone can read), so JetStream's answers to a threadlet of A (the PubAck of
    # its own ack, a copy of one of A's commands through a pull), aimed at B's journal and event
    # subjects or at a made-up capture subject, are delivered there and stored nowhere.
    server, store = secured
    js = weaver.jetstream()
    stream = await bus.ensure_job_commands(js, "A")
    cmd = _command("A", "r2")
    await js.publish(stream.subject("r2"), wire.encode(cmd))
    await bus.ensure_rank_consumer(js, "A", "r2", 0, RANK_INCARNATION)
    aimed = (
        subjects.events("B"),
        subjects.journal("B"),
        subjects.journal_capture("0" * 32, subjects.events("B")),
    )
    async with _delivered(weaver, aimed) as seen:
        attacker = await connect_as(server, store, Role.THREADLET, "A")
        try:
            before = await _journal_held(js)
            for target in aimed:
                await _aim_answers(attacker, "r2", target, subjects.ack_capture(stream.ack_token, "A"))
            # Each target got the PubAck (JSON) and an answer to the pull: the first one the copy of
            # A's command (which keeps its subject), the others a status (it awaits its acknowledgement).
            await until("the answers delivered", lambda: len(seen) >= 2 * len(aimed), timeout_s=DECIDE_S)
            assert sum(b'"stream"' in data for _, data in seen) == len(aimed)
            assert sum(data == wire.encode(cmd) for _, data in seen) == 1
            await asyncio.sleep(0.3)  # a stored answer would be there by now
            assert await _journal_held(js) == before
        finally:
            await attacker.close()
    assert [e async for e in Streams(js, 5.0).journal("B")] == []


async def test_the_launchers_events_are_stored_and_the_public_journal_subjects_store_nothing(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The launcher may read the journal's capture token (stream info) and nothing else of JetStream:
    # its events are stored under their public subject and published there again for live readers.
    # What anyone publishes on the public journal and event subjects (here the weaver) is stored nowhere.
    server, store = secured
    js = weaver.jetstream()
    launcher = await connect_as(server, store, Role.LAUNCHER)
    live: list[tuple[str, bytes]] = []

    async def on_live(msg: Any) -> None:
        live.append((msg.subject, msg.data))

    watch = await weaver.subscribe(subjects.events("A"), cb=on_live)
    await weaver.flush()
    try:
        before = await _journal_held(js)
        await weaver.publish(subjects.journal("A"), b"public outcome")
        await weaver.publish(subjects.events("A"), b"public event")
        await weaver.flush()
        await asyncio.sleep(0.3)
        assert await _journal_held(js) == before
        live.clear()
        await bus.EventPublisher(launcher).publish("A", b"launcher event")
        await launcher.flush()

        async def stored() -> bool:
            last = await js.get_last_msg(subjects.STREAM_JOURNAL, subjects.events("A"))
            return last.data == b"launcher event"

        await until("the launcher's event stored under events.A", stored, timeout_s=DECIDE_S, interval_s=0.05)
        await until("the republished copy", lambda: live == [(subjects.events("A"), b"launcher event")])
    finally:
        await watch.unsubscribe()
        await launcher.close()


def _command(job: str, run_id: str) -> Command:
    return Command(
        command_id="c0ffee" * 5 + "00",
        job=job,
        run_id=run_id,
        seq=1,
        issuer=Issuer(kind="cli", identity="operator"),
        issued_at_s=1.0,
        body=SetConfig(values={"lr": 0.1}),
    )


async def test_a_revoked_job_can_no_longer_connect_and_a_granted_one_can(
    secured: tuple[EmbeddedNats, CredentialStore], tmp_path: Path
) -> None:
    server, store = secured
    server.grant_job("C")  # on the running server: a config reload, no restart
    nc = await connect_as(server, store, Role.THREADLET, "C")
    await nc.close()
    kept = tmp_path / "kept.nk"  # a rank that kept a copy of the seed
    kept.write_text(store.nkey_user(Role.THREADLET, "C").seed_file.read_text())
    kept.chmod(0o600)
    server.revoke_job("C")
    # Refused: -ERR 'Authorization Violation', or the close read first as a reset (seen in CI).
    with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
        await bus.connect(
            server.url, name="revoked", credentials=ClientAuth.from_file(kept), connect_timeout_s=1.0
        )


async def test_a_browser_role_cannot_aim_a_delivery_at_another_jobs_stream(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The vector the weaver-made journal feeds close (weaver/ui_feeds.py): the browser roles create
    # no consumer, so none delivers where they choose.
    server, store = secured
    journal, aimed = subjects.STREAM_JOURNAL, subjects.commands("B", "r1")
    for role in (Role.UI_VIEWER, Role.UI_OPERATOR):
        attacker = await connect_as(server, store, role)
        try:
            before = await _last_seq_of_b(weaver)
            for subject, config in (
                (f"{subjects.JS_API}.CONSUMER.CREATE.{journal}", {}),
                (f"{subjects.JS_API}.CONSUMER.CREATE.{journal}.probe-aim", {"name": "probe-aim"}),
            ):
                with pytest.raises(Exception, match="timeout"):  # refused: no answer
                    await attacker.request(
                        subject,
                        json.dumps(_consumer(journal, deliver_subject=aimed, **config)).encode(),
                        timeout=2.0,
                    )
            await asyncio.sleep(0.3)  # a delivery would be stored by now
            assert await _last_seq_of_b(weaver) == before, role
        finally:
            await attacker.close()


async def _aim_every_browser_request_at_b(
    server: EmbeddedNats, store: CredentialStore, weaver: Client, *, why: str
) -> int:
    """Each browser role publishes on every subject it may, with job B's command subject as the reply
    subject; nothing may be stored in B's stream. Returns how many requests were sent."""
    aimed, sent = subjects.commands("B", "r1"), 0
    for role in (Role.UI_VIEWER, Role.UI_OPERATOR):
        page = await connect_as(server, store, role)
        try:
            before = await _last_seq_of_b(weaver)
            for subject in permissions(role).publish:
                await page.publish(subject, b"{}", reply=aimed)
                sent += 1
            await page.flush()
            await asyncio.sleep(0.3)  # an answer would be stored by now
            assert await _last_seq_of_b(weaver) == before, f"{role.value}, {why}"
        finally:
            await page.close()
    return sent


async def test_a_browser_roles_request_gets_no_answer_on_another_subject(
    secured: tuple[EmbeddedNats, CredentialStore], weaver: Client
) -> None:
    # The browser roles publish only on api.* subjects, which no stream captures: a request naming
    # another job's command subject as its reply gets nothing stored there, with no weaver up (the
    # server's no-responders answer) and with one (it answers only to an _INBOX. subject).
    server, store = secured
    await _aim_every_browser_request_at_b(server, store, weaver, why="no weaver up")
    async with Weaver(weaver_config(server)) as service:
        before = service.refusals.total.get("api", 0)
        sent = await _aim_every_browser_request_at_b(server, store, weaver, why="a weaver up")
        await until(
            "the weaver's refusal of each",
            lambda: service.refusals.total.get("api", 0) == before + sent,
            timeout_s=DECIDE_S,
        )
