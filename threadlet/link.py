"""The threadlet's bus side: a named daemon thread with a private asyncio loop that owns the NATS
connection, pulls its run's commands from the consumer the weaver made for this rank process, and
publishes heartbeats, acks and metrics.

Nothing here touches the model or optimizer, and nothing here raises into the training thread:
failures are appended to `errors` and surfaced by the agent at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import APIError

from threadlet.config import ThreadletConfig
from threadlet.health import DeviceProbe
from torchloom import bus, signing, subjects, wire
from torchloom.credentials import ClientAuth, Role, inbox_prefix
from torchloom.messages import Ack, AckStatus, Command, DeviceHealth, Heartbeat, StepMetrics

log = logging.getLogger(__name__)

THREAD_NAME = "torchloom-threadlet"
# How long an ack is retried until its stream stores it: JetStream's duplicate window, so a retry
# after a lost answer is still recognised as the same message.
DURABLE_RETRY_S = 120.0
_DURABLE_WAIT_S = (0.05, 1.0)  # first and longest pause between durable publish attempts
# The command pull: one request always waits at the server (a long poll), so a stored command is
# delivered at once; it asks for up to _PULL_BATCH commands, expires after _PULL_EXPIRES_S, and the
# server sends an idle heartbeat every _PULL_HEARTBEAT_S: missing two of them (a request lost with a
# restarted server or connection) makes the rank ask again.
_PULL_BATCH = 64
_PULL_EXPIRES_S = 10.0
_PULL_HEARTBEAT_S = 1.0
# While the consumer does not exist yet (the weaver makes it at the rank's first heartbeat, or when
# the job's command stream is made), the rank asks again after this long, doubling up to the most.
_NO_CONSUMER_WAIT_S = (0.05, 0.5)
# A refused unsigned command is reported at most this often, so a flood of forged commands costs the
# bus (and this thread) next to nothing; `Link.refused_unsigned` counts them all.
_UNVERIFIED_REPORT_INTERVAL_S = 0.2

OnCommand = Callable[[Command, float], None]


class ReportSource(Protocol):
    """Builds the reports this thread publishes from the raw values the training thread last handed
    over (threadlet/reports.py's `Outbox`), so a step never builds a message."""

    def status(self, *, sent_at_s: float = 0.0, device: DeviceHealth | None = None) -> Heartbeat | None:
        """The latest status with these two fields (None before the first)."""
        ...

    def new_metrics(self) -> StepMetrics | None:
        """The latest metrics if not returned before, else None."""
        ...

    def metrics(self) -> StepMetrics | None:
        """The latest metrics, returned before or not (None before the first)."""
        ...


class Link:
    """The background thread and its NATS connection.

    Args:
        config: the threadlet config (nats_url must be set).
        rank: this process's rank, for subjects and the connection name.
        on_command: called on the background thread with each decoded command and the unix time
            it arrived; it must be thread-safe and must not touch training state. None: commands
            are not followed (replay mode), only reports are published.
        probe: sampled on this thread for each heartbeat's device health (None: no device field).
        incarnation: this process's incarnation (its heartbeats'), which names its command consumer;
            a fresh one when not given.
        reports: what heartbeats and metrics are built from (None: none are sent).
    """

    def __init__(
        self,
        config: ThreadletConfig,
        *,
        rank: int,
        on_command: OnCommand | None,
        probe: DeviceProbe | None = None,
        incarnation: str = "",
        reports: ReportSource | None = None,
    ) -> None:
        assert config.nats_url is not None
        self._config = config
        self._rank = rank
        self._incarnation = incarnation or uuid.uuid4().hex
        self._consumer = subjects.rank_consumer(config.run_id, rank, self._incarnation)
        self._on_command = on_command
        self._probe = probe
        # Test-only delivery jitter (TORCHLOOM_TEST_DELIVERY_DELAY_S), reproducible per seed and rank.
        self._delay_rng = random.Random(config.test_delivery_seed * 1_000_003 + rank)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._nc: Client | None = None
        self._pull_done = asyncio.Event()  # the current pull request ended (or was lost): ask again
        self._pull_id = 0
        self._pull_left = 0  # deliveries the current pull request still may bring
        self._pull_seen_s = 0.0  # when the server last answered a pull of ours (monotonic)
        self._no_consumer = False
        self._pending: set[asyncio.Task[None]] = set()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        # The training thread swaps raw values into it and this thread's heartbeat and metrics loops
        # build and publish the latest on their clocks, so a step never wakes this thread (a wake-up
        # costs the step a GIL hand-off) nor builds a message.
        self._reports = reports
        # Appended here, drained by the training thread at a step boundary.
        self.errors: collections.deque[str] = collections.deque(maxlen=64)
        self.subscribed = threading.Event()
        # Commands are checked on this thread, before filing: never on the training thread.
        self._verifier = (
            signing.Verifier(config.weaver_pubkey)
            if config.verify_commands and config.weaver_pubkey
            else None
        )
        self._last_report_s = 0.0
        self.refused_unsigned = 0
        # The job's ack token, as the last command filed brought it (the weaver signs it into each):
        # written on this thread, read by `ack_subject` on the training thread (one attribute store).
        self._ack_token = ""
        if not config.verify_commands and on_command is not None:
            log.warning("threadlet: command signatures are NOT checked (TORCHLOOM_VERIFY_COMMANDS=0)")

    # ---- training-thread side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def status(self) -> Heartbeat | None:
        """The status the next heartbeat carries (built now; None before the first)."""
        return None if self._reports is None else self._reports.status()

    @property
    def metrics(self) -> StepMetrics | None:
        """The latest metrics handed over, published or not (built now; None before the first)."""
        return None if self._reports is None else self._reports.metrics()

    @property
    def connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    def publish(self, subject: str, data: bytes) -> None:
        """Hand a message to the loop; never blocks, never raises (a failure lands in `errors`)."""
        if self._closing:
            return
        try:
            self._loop.call_soon_threadsafe(self._publish_soon, subject, data)
        except RuntimeError as exc:  # loop already closed
            self.errors.append(f"publish on {subject} dropped: {exc}")

    def publish_durable(self, subject: str, data: bytes, msg_id: str) -> None:
        """Like `publish`, but retried until the JetStream stream capturing `subject` stores it
        (an ack must reach the weaver even across a server restart), for up to DURABLE_RETRY_S;
        `msg_id` makes repeats one message. Never blocks, never raises."""
        if self._closing:
            return
        try:
            self._loop.call_soon_threadsafe(self._track, self._publish_durable(subject, data, msg_id))
        except RuntimeError as exc:  # loop already closed
            self.errors.append(f"publish on {subject} dropped: {exc}")

    def ack_subject(self) -> str:
        """Where this rank publishes its acks: the ack capture subject of the token its job's commands
        carry (the acks stream stores only those), or the public ack subject before any command brought
        one (an older weaver's commands carry none: its acks stream captures that subject)."""
        token, job = self._ack_token, self._config.job
        return subjects.ack_capture(token, job) if token else subjects.acks(job)

    def close(self) -> None:
        """Send the latest metrics and status (best effort, bounded: hand over the final status
        first), close NATS and stop the thread; idempotent."""
        if self._closing:
            return
        self._closing = True
        if not self._thread.is_alive():
            self._loop.close()
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=4 * self._config.close_timeout_s + 1.0)

    # ---- background thread ----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        except Exception as exc:  # the thread must die quietly; training goes on
            log.debug("threadlet loop ended: %r", exc)
        finally:
            self._loop.close()

    def _publish_soon(self, subject: str, data: bytes) -> None:
        self._track(self._publish(subject, data))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish_durable(self, subject: str, data: bytes, msg_id: str) -> None:
        cfg = self._config
        end = time.monotonic() + DURABLE_RETRY_S
        wait, longest = _DURABLE_WAIT_S
        while True:
            bus.check_cancelled()
            nc = self._nc
            try:
                if nc is None or nc.is_closed:
                    raise ConnectionError("not connected to NATS")
                js = nc.jetstream(timeout=cfg.connect_timeout_s)
                await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
                return
            except Exception as exc:
                # A restarting server, or a stream electing its leader ("no response from stream"
                # too): try again.
                if self._closing or time.monotonic() > end:
                    self.errors.append(f"publish on {subject} not stored: {exc!r}")
                    await self._publish(subject, data)  # a live reader may still see it
                    return
            await asyncio.sleep(wait)
            wait = min(longest, wait * 2)

    async def _publish(self, subject: str, data: bytes) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            self.errors.append(f"not connected to NATS: dropped a message on {subject}")
            return
        try:
            # While reconnecting nats-py buffers the publish and sends it after the reconnect.
            await nc.publish(subject, data)
        except Exception as exc:
            self.errors.append(f"publish on {subject} failed: {exc!r}")

    async def _main(self) -> None:
        tasks = [
            asyncio.create_task(self._connection(), name="threadlet-connection"),
            asyncio.create_task(self._heartbeats(), name="threadlet-heartbeats"),
            asyncio.create_task(self._metrics_loop(), name="threadlet-metrics"),
        ]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._shutdown()
            # Publishes still retrying (NATS unreachable to the end) stop with the thread.
            leftover = list(self._pending)
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)

    async def _shutdown(self) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            async with asyncio.timeout(self._config.close_timeout_s):
                if nc.is_connected:
                    await self._send_metrics(nc)
                    await self._send_heartbeat(nc)
                    if self._pending:
                        await asyncio.gather(*self._pending, return_exceptions=True)
                    await nc.flush()  # bounded by the enclosing timeout
        except Exception as exc:  # best effort: the final heartbeat is a courtesy
            log.debug("final heartbeat not sent: %r", exc)
        try:
            async with asyncio.timeout(self._config.close_timeout_s):
                await nc.close()
        except Exception as exc:
            log.debug("nats close: %r", exc)

    async def _connection(self) -> None:
        cfg = self._config
        assert cfg.nats_url is not None
        while self._nc is None:
            bus.check_cancelled()  # a connect attempt may have swallowed close()'s cancellation
            try:
                # The job's own credential: it may publish only this job's reports and read only
                # this job's commands (docs/security.md). Read at each attempt: a missing or
                # too-open file is an error the rank reports, not a crash.
                auth = (
                    ClientAuth.from_file(
                        cfg.nats_creds_file, inbox_prefix=inbox_prefix(Role.THREADLET, cfg.job)
                    )
                    if cfg.nats_creds_file
                    else None
                )
                if cfg.nats_ca_file:  # a control plane serving over TLS: trust its CA, and only it
                    auth = dataclasses.replace(auth or ClientAuth(), tls_ca_file=Path(cfg.nats_ca_file))
                self._nc = await bus.connect(
                    cfg.nats_url,
                    name=f"threadlet-{cfg.job}-{self._rank}",
                    connect_timeout_s=cfg.connect_timeout_s,
                    reconnect_wait_s=cfg.reconnect_wait_s,
                    on_reconnected=self._on_reconnected,
                    credentials=auth,
                )
            except Exception as exc:
                self.errors.append(str(exc))
                await asyncio.sleep(cfg.reconnect_wait_s)
        if self._on_command is None:
            return  # replay mode: reports only
        await self._follow(self._nc)

    async def _on_reconnected(self) -> None:
        # A restarted server forgot our waiting pull request: ask again now.
        self._pull_done.set()

    async def _follow(self, nc: Client) -> None:
        """Pull this process's commands from its consumer, one long-poll request always waiting.

        The weaver makes the consumer (durable, on the job's command stream, every command of the
        run from the first); this rank's credential may pull from it and acknowledge, nothing more
        (docs/security.md). The consumer outlives a restart of the weaver; a restarted nats-server has
        forgotten it (its state is in the server's memory, `bus.rank_consumer`): the pull is told "no
        consumer" until the weaver has made it again, and it then delivers the run's commands from
        the first, whose decided seqs the agreement drops.
        """
        cfg = self._config
        api = f"{subjects.JS_API}.CONSUMER.MSG.NEXT.{subjects.stream_commands_of(cfg.job)}.{self._consumer}"
        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=self._on_pull_msg)
        wait, longest = _NO_CONSUMER_WAIT_S
        request = json.dumps(
            {
                "batch": _PULL_BATCH,
                "expires": int(_PULL_EXPIRES_S * 1e9),
                "idle_heartbeat": int(_PULL_HEARTBEAT_S * 1e9),
            }
        ).encode()
        while True:
            bus.check_cancelled()  # a consumer request's answer may have swallowed our cancellation
            self._pull_id += 1
            self._pull_left, self._pull_seen_s = _PULL_BATCH, time.monotonic()
            self._pull_done.clear()
            self._no_consumer = False
            try:
                await nc.publish(api, request, reply=f"{inbox}.{self._pull_id}")
            except Exception as exc:  # closed or reconnecting: try again shortly
                self.errors.append(f"cannot ask for commands: {exc!r}")
                self._pull_done.set()
            while not self._pull_done.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_PULL_HEARTBEAT_S):
                        await self._pull_done.wait()
                if time.monotonic() - self._pull_seen_s > 2.5 * _PULL_HEARTBEAT_S:
                    break  # the request is lost (or refused): no answer, no heartbeat
            if self._no_consumer:
                await self._no_consumer_yet(nc)
                await asyncio.sleep(wait)
                wait = min(longest, wait * 2)
            else:
                wait = _NO_CONSUMER_WAIT_S[0]

    async def _no_consumer_yet(self, nc: Client) -> None:
        """The consumer does not exist (yet). On a bus without credentials nobody may be there to
        make it, and nothing stops this rank from doing so: it makes the one the weaver would."""
        cfg = self._config
        if cfg.nats_creds_file:
            return  # a credentialed rank may not: the weaver makes it
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await bus.ensure_rank_consumer(
                    nc.jetstream(), cfg.job, cfg.run_id, self._rank, self._incarnation
                )
        except (APIError, TimeoutError) as exc:  # no stream yet: the weaver makes it with a command
            self.errors.append(f"cannot follow {subjects.commands(cfg.job, cfg.run_id)} yet: {exc!r}")

    async def _on_pull_msg(self, msg: Msg) -> None:
        """One answer to a pull request: a command to acknowledge and check, or a status."""
        # A delivery carries its acknowledgement subject as reply; the server's status messages none.
        status = (msg.headers or {}).get("Status") if not msg.reply else None
        if status is not None:
            # A status comes on the request's own reply subject, so it names the request it ends.
            if msg.subject.rsplit(".", 1)[-1] != str(self._pull_id):
                return  # the end of a request already given up
            self._pull_seen_s = time.monotonic()
            # 404/408: nothing more for this request; 409: ended by the server; 503: no consumer.
            self._no_consumer = status == "503"
            if not self._no_consumer:
                self.subscribed.set()  # the consumer exists
            if status != "100":  # an idle heartbeat: the request still waits
                self._pull_done.set()
            return
        self.subscribed.set()
        # A delivery keeps the command's own subject (JetStream sends it to the request's reply
        # subject, but names the stored subject), so it cannot tell which request it answers: it
        # counts against the current one. The server ends a request at its batch without a status,
        # so a count that missed deliveries left the rank waiting for a request that was over until
        # the heartbeat check gave up on it: every 64th command took 1.3 to 1.8 s to arrive. A
        # delivery to a request already given up counts too: at worst the next request goes early.
        self._pull_seen_s = time.monotonic()
        self._pull_left -= 1
        if self._pull_left <= 0:
            self._pull_done.set()
        try:
            await self._on_msg(msg)
        finally:
            with contextlib.suppress(Exception):  # unacknowledged, it comes again after the ack wait
                await msg.ack()

    async def _on_msg(self, msg: Any) -> None:
        received_at_s = time.time()
        cfg = self._config
        if msg.subject != subjects.commands(cfg.job, cfg.run_id):
            # The consumer filters on this run's subject: anything else is not ours.
            self.errors.append(f"ignored a message of {msg.subject} on the command consumer")
            return
        try:
            cmd, verified = self._decode(msg.data)
            refusal = self._refusal(cmd, verified=verified)
            if refusal is not None:
                await self._report_unverified(cmd, refusal, received_at_s)
                return
            if cmd.ack_token and cmd.ack_token != self._ack_token:
                self._ack_token = subjects.check_token("ack token", cmd.ack_token)
            max_delay = self._config.test_delivery_delay_s
            assert self._on_command is not None
            if max_delay > 0:
                # Each command is filed after its own delay, so ranks file in different orders.
                self._track(self._file_later(cmd, received_at_s, self._delay_rng.uniform(0.0, max_delay)))
                return
            self._on_command(cmd, received_at_s)
        except Exception as exc:
            self.errors.append(f"bad command message: {exc!r}")

    async def _file_later(self, cmd: Command, received_at_s: float, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        assert self._on_command is not None
        try:
            self._on_command(cmd, received_at_s)
        except Exception as exc:
            self.errors.append(f"bad command message: {exc!r}")

    def _decode(self, data: bytes) -> tuple[Command, bool]:
        """The command received as `data` and whether its signature verified: over the received bytes
        when they are in the weaver's layout (`Verifier.decode_command`); False when not checked."""
        if self._config.verify_commands and self._verifier is not None:
            return self._verifier.decode_command(data)
        return wire.decode_command(data), False

    def _refusal(self, cmd: Command, *, verified: bool | None = None) -> str | None:
        """Why `cmd` must not be filed (None: the weaver signed it, for this job and run).
        `verified` is `_decode`'s answer for the received bytes; None checks `cmd` itself."""
        cfg = self._config
        if not cfg.verify_commands:
            return None
        if self._verifier is None:
            return "this rank has no weaver public key (TORCHLOOM_WEAVER_PUBKEY), so it files no command"
        if not cmd.signature:
            return "the command is not signed"
        if not (self._verifier.verify(cmd) if verified is None else verified):
            return "its signature does not match the weaver's key"
        if (cmd.job, cmd.run_id) != (cfg.job, cfg.run_id):
            # Signed, but for another job or run: a copy moved onto this run's subject.
            return (
                f"it is signed for job {cmd.job} run {cmd.run_id}, not this rank's {cfg.job} run {cfg.run_id}"
            )
        return None

    async def _report_unverified(self, cmd: Command, reason: str, received_at_s: float) -> None:
        """Count a refused command; tell the weaver (an `unverified` ack it journals), rate-limited."""
        self.refused_unsigned += 1
        now = time.monotonic()
        if now - self._last_report_s < _UNVERIFIED_REPORT_INTERVAL_S:
            return
        self._last_report_s = now
        cfg, status = self._config, self.status
        self.errors.append(
            f"refused a command on {subjects.commands(cfg.job, cfg.run_id)} (seq {cmd.seq}): {reason}"
        )
        ack = Ack(
            command_id=cmd.command_id[:64],
            job=cfg.job,
            run_id=cfg.run_id,
            seq=cmd.seq,
            rank=self._rank,
            incarnation=status.incarnation if status is not None else "",
            status=AckStatus.REJECTED,
            reason=reason,
            received_at_s=received_at_s,
            unverified=True,
        )
        # On the public ack subject, never the capture one: a refusal is not stored (a flood of forged
        # commands costs the acks stream nothing); the weaver takes it live (weaver.acks.AckFeed.on_live).
        await self._publish(subjects.acks(cfg.job), wire.encode(ack))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            nc = self._nc
            if nc is not None and nc.is_connected:
                try:
                    await self._send_heartbeat(nc)
                except Exception as exc:
                    self.errors.append(f"heartbeat failed: {exc!r}")

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.metrics_interval_s)
            nc = self._nc
            if nc is not None and nc.is_connected:
                try:
                    await self._send_metrics(nc)
                except Exception as exc:
                    self.errors.append(f"metrics publish failed: {exc!r}")

    async def _send_metrics(self, nc: Client) -> None:
        sm = None if self._reports is None else self._reports.new_metrics()
        if sm is None:
            return
        await nc.publish(subjects.metrics(sm.job, sm.rank), wire.encode(sm))

    async def _send_heartbeat(self, nc: Client) -> None:
        reports = self._reports
        if reports is None:
            return
        device = None
        if self._probe is not None:
            try:
                # Probes lock internally; the training thread only advances a fake's step.
                device = self._probe.sample()
            except Exception as exc:
                self.errors.append(f"device probe failed: {exc!r}")
        hb = reports.status(sent_at_s=time.time(), device=device)
        if hb is None:
            return  # before the first status (the front hands one over before it starts this thread)
        await nc.publish(subjects.heartbeat(hb.job, hb.rank), wire.encode(hb))
