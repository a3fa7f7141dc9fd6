"""The control-plane process: the embedded nats-server (supervised), the weaver and its gRPC service,
the discovery file, and the job leases that decide how long it lives.

`torchloom run` starts it detached (`python -m torchloom.app.controlplane`, own session, output to
`$TORCHLOOM_HOME/controlplane/controlplane.log`) when none is reachable; it exits once no lease has been
held for `idle_exit_s`. `torchloom weaver` is the same process in the foreground without the idle exit.
A dead nats-server comes back on the same port and JetStream store within about a second; a control
plane started while jobs still hold leases (the previous one was killed) continues its store and ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from torchloom import env

if __name__ == "__main__" and not (os.environ.get(env.NATS_URL) or "").startswith(("ws://", "wss://")):
    # Started as the detached control plane, which talks nats:// only: nats-py imports aiohttp for
    # its WebSocket transport if it can, about a third of this process's imports (0.4 to 0.7 s on a
    # loaded 2-core machine), all of it on the path of a restarted control plane's gap in control.
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]  # None reads as "not installed"

from nats.aio.client import Client

from torchloom import bus, defaults, discovery, private_files, tls, wire
from torchloom.app import runs
from torchloom.app.controlplane_config import (
    IDLE_EXIT_S,
    ControlPlaneConfig,
    Credentials,
    default_credentials,
    free_port,
    idle_exit_default,
    state_path,
    stream_replicas,
)
from torchloom.app.health_options import HealthOptions, UsageError, parse_health
from torchloom.credentials import SECRETS_SUBDIR, ClientAuth, Role
from torchloom.errors import NatsUnavailable, TorchloomError
from torchloom.messages import JobEvent
from torchloom.nats_server import EmbeddedNats, loopback_origins
from torchloom.policy import PolicyMode
from weaver import app as weaver_app
from weaver.app import RunningWeaver
from weaver.config import WeaverConfig

log = logging.getLogger("torchloom.app.controlplane")  # also when run as __main__

LEASE_POLL_S = 0.05  # how often the leases directory is looked at for a new or ended lease
WEAVER_READY_TIMEOUT_S = 30.0
WEAVER_RETRY_S = 0.5
# The JobEvent kind a control plane journals for every leased job when it replaced one that died
# while those jobs ran (attrs: `previous_pid`, `pid`, `ended`, `store_dir`).
CONTROL_PLANE_RESTARTED = "control_plane_restarted"


redact = private_files.redact_url  # `user:pass@` of every URL in a text -> `***@`


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def _is_nats_server(pid: int) -> bool:
    try:
        return b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _end_orphan(pid: int, timeout_s: float = 3.0) -> None:
    """Stop a nats-server a killed control plane left behind (it runs in its own session)."""
    if pid <= 0 or not discovery.pid_alive(pid) or not _is_nats_server(pid):
        return
    log.warning("stopping nats-server pid %d left by a previous control plane", pid)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, timeout_s)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while discovery.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not discovery.pid_alive(pid):
            return


class ControlPlane:
    """NATS (embedded and supervised, or external), a weaver restarted if it fails, the discovery
    file, and the lease sweep. Run it with `await run()`; `stop()` ends it.

    Args:
        config: how it runs.
        credentials: NATS authentication (default: `default_credentials(config)`, the role table
            of the control plane's credential store on the embedded server).

    Raises:
        CredentialsError: the credential store or `config.nats_creds` cannot be used.
    """

    def __init__(self, config: ControlPlaneConfig, *, credentials: Credentials | None = None) -> None:
        self.config = config
        self.credentials: Credentials = credentials or default_credentials(config)
        self.server: EmbeddedNats | None = None
        self.tls: tls.ServerTls | None = None  # with `listen_host`: the CA and certificate served
        self.nats_url = config.nats_url or ""
        self.ws_url = ""
        self.grpc = ""
        self.ui_port = config.ui_port
        self.operator_token = ""
        self.metrics_url = ""  # the weaver's Prometheus endpoint (served on a free loopback port)
        self._metrics_port = 0  # kept across weaver restarts, as the gRPC address is
        self.nats_restarts = 0
        self.events: list[JobEvent] = []  # what it published, in order
        self.ready = asyncio.Event()  # set once the weaver serves gRPC and the discovery file exists
        self._grpc_bind = config.grpc_addr
        self._stop = asyncio.Event()
        self._exiting = False
        self._jobs: dict[str, list[runs.Lease]] = {}
        self._nc: Client | None = None
        self._events: bus.EventPublisher | None = None  # where the journal stores our events
        # The state of the control plane this one replaced (it died while jobs held leases), until
        # the jobs' journals were told.
        self._replaced: dict[str, Any] | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def jobs(self) -> tuple[str, ...]:
        return tuple(sorted(self._jobs))

    async def run(self) -> None:
        """Serve until `stop()` or the idle exit. Everything started is stopped on the way out.

        Raises:
            NatsUnavailable: the embedded server cannot start.
            WeaverUnavailable-like TorchloomError: the weaver never became ready.
        """
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start_nats()
            with contextlib.suppress(NatsUnavailable):  # events are for watchers; no events is no crash
                self._nc = await bus.connect(
                    self.nats_url, name="torchloom-controlplane", credentials=self._client_auth()
                )
            first = asyncio.get_running_loop().create_future()
            tasks.append(asyncio.create_task(self._weaver_loop(first), name="controlplane-weaver"))
            await first  # the first weaver start must succeed: a bad --grpc is an error, not a retry
            if self.server is not None:
                tasks.append(asyncio.create_task(self._supervise_nats(), name="controlplane-nats"))
            tasks.append(asyncio.create_task(self._lease_loop(), name="controlplane-leases"))
            stopping = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done - {stopping}:
                task.result()  # a loop ended: that is a bug; surface it
        finally:
            # Set first: a weaver that swallows its cancellation returns normally, and the weaver
            # loop must then end instead of restarting it (it did, forever, once NATS was gone).
            self._stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            discovery.remove(self.config.home / discovery.FILE_NAME)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)
            self._remove_state()

    # ---- NATS -------------------------------------------------------------------------------------------

    def _previous(self) -> dict[str, Any] | None:
        """The state of a control plane that died while jobs still hold leases, when it ran the
        embedded server (its store is continued); else None. A predecessor that died with jobs
        running is remembered in `_replaced` either way, for `_announce_replaced`."""
        try:
            data = json.loads(state_path(self.config.home).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or discovery.pid_alive(int(data.get("pid") or 0)):
            return None
        _end_orphan(int(data.get("nats_pid") or 0))
        live, _ = runs.sweep_leases(self.config.home)
        if live and int(data.get("pid") or 0) > 0:
            self._replaced = data
        return data if live and data.get("store_dir") else None

    async def _announce_replaced(self) -> None:
        """Journal `CONTROL_PLANE_RESTARTED` for the jobs leased at its first lease sweep, when this
        control plane replaced one that died while they ran. That one left its state file behind,
        which its shutdown removes (also after an error), so a signal it could not handle ended it
        (SIGKILL, the OOM killer's, a crash's SIGSEGV); which one only its parent could tell."""
        old, self._replaced = self._replaced, None
        if old is None:
            return
        store = str(self.server.run_dir) if self.server is not None else ""
        continued = bool(store) and store == old.get("store_dir")
        await self._announce(
            CONTROL_PLANE_RESTARTED,
            f"the control plane pid {old['pid']} was killed (it ended without its shutdown): "
            f"control plane pid {os.getpid()} replaced it"
            + (f" and continued its NATS store {store} on {redact(self.nats_url)}" if continued else ""),
            previous_pid=str(old["pid"]),
            pid=str(os.getpid()),
            ended="killed",
            store_dir=store if continued else "",
        )

    async def _start_nats(self) -> None:
        previous = await asyncio.to_thread(self._previous)
        if previous is not None and previous.get("grpc") and self.config.grpc_addr.endswith(":0"):
            self._grpc_bind = str(previous["grpc"])  # clients that remember it keep working
        if self.config.nats_url is not None:
            self._write_state()
            return
        # nats-server fixes the WebSocket's allowed origins at start: the UI's port comes first.
        if not self.ui_port:
            self.ui_port = int((previous or {}).get("ui_port") or 0) or free_port()
        origins = loopback_origins(self.ui_port)
        if self.config.listen_host is not None:
            self.tls = await asyncio.to_thread(self._server_tls, self.config.listen_host)
        if previous is not None:
            log.info(
                "continuing the store %s of a control plane that stopped with jobs running",
                previous["store_dir"],
            )
            self.server = EmbeddedNats(
                previous["store_dir"],
                port=previous.get("nats_port"),
                ws_port=previous.get("ws_port"),
                allowed_origins=origins,
                tls=self.tls,
            )
        else:
            self.server = EmbeddedNats(
                runs.runs_dir(self.config.home) / f"cp-{uuid.uuid4().hex[:12]}",
                allowed_origins=origins,
                tls=self.tls,
            )
        self.credentials.prepare(self.server)
        try:
            await asyncio.to_thread(self.server.start)
        except NatsUnavailable:
            if previous is None:
                raise
            # Its port was taken meanwhile: a new address is worse than the old one, but not fatal.
            log.warning(
                "nats-server could not come back on port %s: starting on a free port", self.server.port
            )
            self.server = EmbeddedNats(previous["store_dir"], allowed_origins=origins, tls=self.tls)
            self.credentials.prepare(self.server)
            await asyncio.to_thread(self.server.start)
        self.nats_url, self.ws_url = self.server.url, self.server.ws_url
        self._write_state()

    async def _supervise_nats(self) -> None:
        """Restart a dead embedded server on the same port and store, and tell every leased job."""
        server = self.server
        assert server is not None
        while True:
            await asyncio.sleep(self.config.nats_check_interval_s)
            if server.running():
                continue
            t0 = time.monotonic()
            log.warning(
                "embedded nats-server (port %s) died: restarting it on the same port and store", server.port
            )
            server.stop()  # reap the dead process and close its pipe
            while True:
                try:
                    self.credentials.prepare(server)
                    await asyncio.to_thread(server.start)
                    break
                except NatsUnavailable as exc:
                    log.warning("nats-server restart failed, retrying: %s", exc)
                    await asyncio.sleep(0.2)
            took = time.monotonic() - t0
            self.nats_restarts += 1
            self._write_state()
            log.info(
                "nats-server is back on %s after %.3fs (restart %d)", server.url, took, self.nats_restarts
            )
            await self._announce(
                "nats_restarted",
                f"the embedded nats-server died and was restarted on {server.url} with the same store "
                f"in {took:.2f}s",
                restart_s=f"{took:.3f}",
                restarts=str(self.nats_restarts),
            )

    async def _announce(self, kind: str, message: str, **attrs: str) -> None:
        """Publish a JobEvent to every leased job's events subject (so the journal keeps it)."""
        for job, leases in sorted(self._jobs.items()):
            ev = JobEvent(
                job=job, run_id=leases[-1].run_id, kind=kind, message=message, time_s=time.time(), attrs=attrs
            )
            self.events.append(ev)
            if self._nc is None:
                continue
            self._events = self._events or bus.EventPublisher(self._nc)
            try:
                await self._events.publish(job, wire.encode(ev))
            except Exception as exc:  # the event is for watchers; the control plane goes on
                log.warning("could not publish %s for %s: %s", kind, job, exc)

    # ---- the weaver -------------------------------------------------------------------------------------

    async def _weaver_loop(self, first: asyncio.Future[None]) -> None:
        """Run the weaver; restart it (on the same gRPC address) whenever it stops. On an external
        NATS, a first start that fails on something that passes (the server not up yet, JetStream
        electing leaders: `weaver.app.transient_start_error`) is tried again for
        `weaver.app.DEFAULT_START_GIVE_UP_S`, as `python -m weaver` does: a pod started before its
        NATS waits for it instead of crashing."""
        began = time.monotonic()
        while True:
            bus.check_cancelled()  # a weaver's start or close may have swallowed our cancellation
            ready: asyncio.Future[RunningWeaver] = asyncio.get_running_loop().create_future()

            def _ready(w: RunningWeaver, fut: asyncio.Future[RunningWeaver] = ready) -> None:
                if not fut.done():
                    fut.set_result(w)

            config = WeaverConfig(
                nats_url=self.nats_url,
                grpc_addr=self._grpc_bind,
                nats_credentials=self._client_auth(),
                **self._secured_options(),
                **self._tls_options(),
                **{"metrics_port": self._metrics_port, **self.config.weaver_options},
            )
            task = asyncio.create_task(weaver_app.serve(config, ready=_ready), name="torchloom-weaver")
            try:
                waits: set[asyncio.Future[Any]] = {task, ready}
                async with asyncio.timeout(WEAVER_READY_TIMEOUT_S):
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                pass
            if ready.done():
                self.grpc = ready.result().grpc_address
                self.operator_token = ready.result().operator_token
                self._grpc_bind = self.grpc  # a restarted weaver answers at the same address
                served = ready.result().metrics
                if served is not None:
                    self.metrics_url = served.url
                    self._metrics_port = int(served.address.rpartition(":")[2])
                self._write_discovery()
                self._write_state()
                self.ready.set()
                if not first.done():
                    first.set_result(None)
                with contextlib.suppress(Exception):
                    await task
                if self._stop.is_set():
                    return  # it ended because the control plane is stopping (it may swallow the cancel)
                log.warning("the weaver stopped: restarting it")
            else:
                task.cancel()
                self._metrics_port = 0  # its port may be taken now: any beats a weaver that cannot start
                exc = None
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await task
                    except Exception as err:
                        exc = err
                if self._stop.is_set():
                    return
                if self._grpc_bind != self.config.grpc_addr and not self.ready.is_set():
                    # The address a killed predecessor had may be taken now: any address beats none.
                    log.warning(
                        "weaver could not start on %s (%r): trying %s",
                        self._grpc_bind,
                        exc,
                        self.config.grpc_addr,
                    )
                    self._grpc_bind = self.config.grpc_addr
                    continue
                if not first.done():
                    # On an external NATS that may be starting: keep trying, within a bound.
                    waiting = (
                        self.server is None and exc is not None and weaver_app.transient_start_error(exc)
                    )
                    bound = weaver_app.DEFAULT_START_GIVE_UP_S if waiting else WEAVER_READY_TIMEOUT_S
                    if not waiting or time.monotonic() - began >= bound:
                        first.set_exception(
                            WeaverFailed(f"weaver did not become ready within {bound:g}s: {exc!r}")
                        )
                        return
                log.warning("weaver start failed, retrying: %r", exc)
            await asyncio.sleep(WEAVER_RETRY_S)

    def _server_tls(self, host: str) -> tls.ServerTls:
        """The private CA and the certificate for `host` under the secrets directory (made or kept)."""
        from torchloom import certs  # the X.509 toolkit costs a loopback control plane's start nothing

        return certs.ensure_server_tls(self.config.home / SECRETS_SUBDIR / tls.TLS_SUBDIR, host)

    def _client_auth(self) -> ClientAuth | None:
        """The weaver credential, trusting the control plane's own CA when it serves TLS."""
        auth = self.credentials.client_auth(Role.WEAVER)
        if self.tls is None:
            return auth
        return replace(auth or ClientAuth(), tls_ca_file=self.tls.ca_file)

    def _tls_options(self) -> dict[str, Any]:
        """WeaverConfig settings of a control plane listening off loopback: gRPC over its certificate."""
        if self.tls is None:
            return {}
        return {"grpc_tls_cert_file": str(self.tls.cert_file), "grpc_tls_key_file": str(self.tls.key_file)}

    def _secured_options(self) -> dict[str, Any]:
        """WeaverConfig settings that hold when the embedded server enforces the role table: only
        the ui-operator role may publish on api.submit, so that is who submits there."""
        if self.server is None or self.credentials.secrets_dir is None:
            return {}
        return {"api_submit_identity": Role.UI_OPERATOR.value}

    # ---- leases, discovery, state ---------------------------------------------------------------------

    async def _wait_leases(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, returning early when a lease file appears or goes (a launcher
        waits for its job to be registered before it starts the ranks)."""
        directory = runs.leases_dir(self.config.home)

        def stamp() -> int:
            try:
                return directory.stat().st_mtime_ns
            except OSError:
                return 0

        before, end = stamp(), time.monotonic() + timeout_s
        while time.monotonic() < end:
            await asyncio.sleep(min(LEASE_POLL_S, max(0.0, end - time.monotonic())))
            if stamp() != before:
                return

    async def _lease_loop(self) -> None:
        idle_since: float | None = time.monotonic()
        live, _ended = runs.sweep_leases(self.config.home)
        for job in sorted(set(self.credentials.granted()) - {lease.job for lease in live}):
            log.info("job %s holds no lease: withdrawing its credential", job)
            await asyncio.to_thread(self.credentials.job_removed, job)
        while True:
            live, _ended = runs.sweep_leases(self.config.home)
            await self._update_jobs(live)
            await self._announce_replaced()
            now = time.monotonic()
            if live:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            limit = self.config.idle_exit_s
            if (
                limit is not None
                and idle_since is not None
                and now - idle_since >= limit
                and self._try_exit()
            ):
                log.info("no job has held a lease for %.1fs: exiting", now - idle_since)
                self.stop()
                return
            await self._wait_leases(self.config.lease_interval_s)

    async def _update_jobs(self, live: list[runs.Lease]) -> None:
        """Grant each newly leased job its credential and command stream, withdraw an ended job's,
        then list the jobs in the discovery file: a launcher starts its ranks once its job is there."""
        jobs: dict[str, list[runs.Lease]] = {}
        for lease in live:
            jobs.setdefault(lease.job, []).append(lease)
        added, removed = jobs.keys() - self._jobs.keys(), self._jobs.keys() - jobs.keys()
        for job in sorted(added):
            log.info(
                "job %s holds a lease (run %s, launcher pid %d)", job, jobs[job][-1].run_id, jobs[job][-1].pid
            )
            await asyncio.to_thread(self.credentials.job_added, job)
            await self._ensure_job_stream(job)
        for job in sorted(removed):
            log.info("job %s holds no lease any more", job)
            await asyncio.to_thread(self.credentials.job_removed, job)
        self._jobs = jobs
        if (added or removed) and self.ready.is_set():
            self._write_discovery()

    async def _ensure_job_stream(self, job: str) -> None:
        """Create the job's command stream now, so its ranks follow it from their first attempt (the
        weaver would create it at the job's first heartbeat; a threadlet may not create streams)."""
        if self._nc is None:
            return
        try:
            async with asyncio.timeout(WEAVER_RETRY_S * 4):
                await bus.ensure_job_commands(self._nc.jetstream(), job)
        except Exception as exc:  # the weaver creates it at the first heartbeat anyway
            log.warning("could not create the command stream of job %s yet: %r", job, exc)

    def _try_exit(self) -> bool:
        """Under the lock: with still no live lease, withdraw the discovery file and say yes.

        A launcher registers its lease under the same lock, so it either sees this file gone (and
        starts a new control plane) or its lease is seen here (and this one stays).
        """
        with runs.locked(self.config.home, timeout_s=None) as got:
            if not got:
                return False
            live, _ = runs.sweep_leases(self.config.home)
            if live:
                return False
            self._exiting = True
            discovery.remove(self.config.home / discovery.FILE_NAME)
            return True

    def _write_discovery(self) -> None:
        if self._exiting:
            return
        secrets = self.credentials.secrets_dir
        discovery.write(
            discovery.WeaverInfo(
                pid=os.getpid(),
                nats_url=redact(self.nats_url),
                grpc=self.grpc,
                ws_url=self.ws_url,
                jobs=self.jobs,
                store_dir=str(self.server.run_dir) if self.server is not None else "",
                secrets_dir=str(secrets) if secrets is not None else "",
                token=self.operator_token,
                ui_port=self.ui_port if self.server is not None else 0,
                metrics_url=self.metrics_url,
                tls_ca_file=str(self.tls.ca_file) if self.tls is not None else "",
            ),
            self.config.home / discovery.FILE_NAME,
        )

    def _write_state(self) -> None:
        server = self.server
        private_files.write_private_json(
            state_path(self.config.home),
            {
                "pid": os.getpid(),
                "store_dir": str(server.run_dir) if server is not None else "",
                "nats_port": server.port if server is not None else None,
                "ws_port": server.ws_port if server is not None else None,
                "nats_pid": (server.pid or 0) if server is not None else 0,
                "ui_port": self.ui_port,
                "grpc": self.grpc,
            },
        )

    def _remove_state(self) -> None:
        path = state_path(self.config.home)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


class WeaverFailed(TorchloomError, ConnectionError):
    """The control plane's weaver did not come up."""


# ---- entry points ------------------------------------------------------------------------------------


def print_ready(cp: ControlPlane, *, to_stdout: bool) -> None:
    """Say where the control plane is: one line on stderr, and `nats_url=`/`grpc=` lines on stdout."""
    parts = [
        f"torchloom: control plane pid {os.getpid()}: weaver at gRPC {cp.grpc}",
        f"NATS {redact(cp.nats_url)}",
    ]
    if cp.ws_url:
        parts.append(f"WebSocket {cp.ws_url}")
    if cp.metrics_url:
        parts.append(f"metrics {cp.metrics_url}")
    print("; ".join(parts), file=sys.stderr, flush=True)
    if to_stdout:
        print(f"nats_url={redact(cp.nats_url)}\ngrpc={cp.grpc}", flush=True)


async def serve_control_plane(cp: ControlPlane, *, to_stdout: bool = False) -> int:
    """Run `cp` until SIGINT/SIGTERM or its idle exit; return 0 on a clean stop, 1 on a failure."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, cp.stop)
            installed.append(sig)
    task = asyncio.create_task(cp.run(), name="controlplane")
    try:
        ready = asyncio.create_task(cp.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if cp.ready.is_set():
            print_ready(cp, to_stdout=to_stdout)
        await task
    except (TorchloomError, OSError) as exc:
        print(f"torchloom: control plane failed: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    print("torchloom: control plane stopped", file=sys.stderr, flush=True)
    return 0


def already_running(home: Path) -> discovery.WeaverInfo | None:
    """The live control plane of `home`, if one wrote the discovery file."""
    return discovery.read(home / discovery.FILE_NAME)


def serve_weaver(
    *,
    nats_url: str | None,
    grpc: str | None,
    health: HealthOptions | None = None,
    nats_creds: str | None = None,
    ui_port: int = 0,
    grpc_tls_cert: str | None = None,
    grpc_tls_key: str | None = None,
    autopilot_policy: str | None = None,
    replicas: int | None = None,
) -> int:
    """`torchloom weaver`: the control plane in the foreground, without the idle exit; with
    `autopilot_policy` (a TOML file or "default") the rules of every job that has none of its own;
    on a NATS of yours, `replicas` (else TORCHLOOM_NATS_REPLICAS) JetStream replicas of its streams."""
    home = discovery.home()
    running = already_running(home)
    if running is not None:
        print(
            f"torchloom weaver: a control plane already runs for {home} (pid {running.pid}, gRPC "
            f"{running.grpc}); stop it first or use another TORCHLOOM_HOME",
            file=sys.stderr,
        )
        return 1
    options = (health or HealthOptions()).config_kwargs()
    if grpc_tls_cert is not None or grpc_tls_key is not None:
        options.update(grpc_tls_cert_file=grpc_tls_cert, grpc_tls_key_file=grpc_tls_key)
    if autopilot_policy is not None:
        # Absolute, so the weaver (re)started later reads the same file whatever its directory.
        options["autopilot_policy"] = (
            autopilot_policy if autopilot_policy == "default" else str(Path(autopilot_policy).resolve())
        )
    url = nats_url or env.get(env.NATS_URL)
    try:
        if url:
            options["replicas"] = stream_replicas(replicas)
        elif replicas not in (None, 1):
            raise ValueError(
                f"--replicas {replicas}: the embedded NATS is one server (1 replica); "
                "replicas are for --nats URL, a cluster of yours"
            )
        # The weaver's own settings are checked now, so a bad flag is a usage error, not a retry.
        WeaverConfig(grpc_addr=grpc or defaults.GRPC_BIND_ADDR, **options)
        config = ControlPlaneConfig(
            home=home,
            nats_url=url,
            nats_creds=(nats_creds or env.get(env.NATS_CREDS_FILE)) if url else None,
            ui_port=ui_port,
            grpc_addr=grpc or defaults.GRPC_BIND_ADDR,
            idle_exit_s=None,
            weaver_options=options,
        )
        cp = ControlPlane(config)
    except ValueError as exc:  # CredentialsError too
        print(f"torchloom weaver: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve_control_plane(cp, to_stdout=True))


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), for the start-up log line; None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """`python -m torchloom.app.controlplane`: the detached control plane `torchloom run` starts.

    The NATS URL (an external server) comes from TORCHLOOM_NATS_URL, never from argv; `--nats-creds`
    names a credential file (its path, never a secret).
    """
    parser = argparse.ArgumentParser(prog="python -m torchloom.app.controlplane", description=__doc__)
    parser.add_argument("--grpc", default=defaults.GRPC_BIND_ADDR, help="gRPC bind address")
    parser.add_argument(
        "--idle-exit-s", type=float, default=None, help=f"grace after the last lease ({IDLE_EXIT_S:g})"
    )
    parser.add_argument("--no-idle-exit", action="store_true", help="never exit on idle")
    parser.add_argument("--hung-after")
    parser.add_argument("--straggler-factor")
    parser.add_argument("--health-policy", choices=[m.value for m in PolicyMode])
    parser.add_argument("--nats-creds", help="credential file or secrets directory for TORCHLOOM_NATS_URL")
    parser.add_argument("--ui-port", type=int, default=0, help="the web UI's port (0: a free one)")
    parser.add_argument(
        "--listen", metavar="HOST", help="serve NATS and gRPC on this address, over TLS (multi-node)"
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.addFilter(_RedactingFilter())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        handlers=[handler],
    )
    age_s = _process_age_s()
    if age_s is not None:  # interpreter start and imports: part of a restarted control plane's gap
        log.info("control plane process up %.2fs after its start", age_s)
    try:
        health = parse_health(args.hung_after, args.straggler_factor, args.health_policy)
        nats_url = env.get(env.NATS_URL)
        options = health.config_kwargs()
        if nats_url:  # a NATS of the user's: TORCHLOOM_NATS_REPLICAS, as `torchloom run` was given it
            options["replicas"] = stream_replicas(None)
        config = ControlPlaneConfig(
            home=discovery.home(),
            nats_url=nats_url,
            nats_creds=args.nats_creds,
            ui_port=args.ui_port,
            grpc_addr=args.grpc,
            listen_host=tls.check_listen_host(args.listen) if args.listen else None,
            idle_exit_s=None
            if args.no_idle_exit
            else (args.idle_exit_s if args.idle_exit_s is not None else idle_exit_default()),
            weaver_options=options,
        )
        cp = ControlPlane(config)
    except (UsageError, ValueError) as exc:
        parser.error(str(exc))
    return asyncio.run(serve_control_plane(cp))


if __name__ == "__main__":
    sys.exit(main())
