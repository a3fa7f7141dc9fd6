"""`torchloom run`: find the control plane (or start one, detached), hold a lease for the job while it
runs, launch torchrun under the supervisor, and record the run in the run index.

The control plane (torchloom.app.controlplane) owns NATS and the weaver and outlives any one job; this
launcher restarts it if it is killed while the job runs. torchrun is a child in its own session, so a
Ctrl-C reaches it exactly once: from us, forwarded. The command line is parsed in
torchloom.app.run_args.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from torchloom import defaults, discovery, env, private_files, signing, tls, tokens
from torchloom.app import actions as cli_actions
from torchloom.app import join as join_file
from torchloom.app import natsauth, policy_cmd, runs
from torchloom.app.health_options import HealthOptions as HealthOptions  # also torchloom.app.launcher's API
from torchloom.app.health_options import UsageError as UsageError
from torchloom.app.health_options import parse_health as parse_health
from torchloom.app.run_args import RunSpec, child_env, new_run_id, torchrun_command
from torchloom.app.supervisor import Supervisor, nproc_of, with_nproc
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, Role
from torchloom.errors import TorchloomError, WeaverUnavailable
from weaver.ui_server import serve_ui

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
KEEPER_INTERVAL_S = 0.25  # how often a running job checks that its control plane is alive


def exit_status(returncode: int) -> int:
    """Map a child's return code to ours: the same code, or 128+N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True, slots=True, kw_only=True)
class WeaverEndpoints:
    """Where clients and ranks reach the weaver and its NATS server."""

    nats_url: str
    grpc: str
    ws_url: str
    owned: bool  # True when this launcher started the control plane
    store_dir: str = ""  # the embedded server's directory (its JetStream store), "" when external
    pid: int = 0  # the control plane's pid (0: a weaver we do not manage, found by --grpc)
    secrets_dir: str = ""  # the control plane's credential store ("" when it keeps none)
    tls_ca_file: str = ""  # the CA of a control plane serving NATS and gRPC over TLS ("" without)


async def _probe(grpc: str, timeout_s: float = 2.0) -> bool:
    """Return True when a weaver answers Status at `grpc` within the deadline."""
    try:
        async with asyncio.timeout(timeout_s), ControlClient(grpc) as client:
            await client.status()
    except Exception as exc:  # any failure means "not usable"
        log.debug("weaver at %s not usable: %s", grpc, exc)
        return False
    return True


def _endpoints(info: discovery.WeaverInfo, *, owned: bool) -> WeaverEndpoints:
    return WeaverEndpoints(
        nats_url=info.nats_url,
        grpc=info.grpc,
        ws_url=info.ws_url,
        owned=owned,
        store_dir=info.store_dir,
        pid=info.pid,
        secrets_dir=info.secrets_dir,
        tls_ca_file=info.tls_ca_file,
    )


async def find_reusable(
    nats_url: str | None, grpc: str | None, listen: str | None = None
) -> WeaverEndpoints | None:
    """Return a running control plane to reuse: the live one of $TORCHLOOM_HOME when it answers and
    has the requested NATS URL, gRPC address and `--listen` host, or an explicit `--grpc` + `--nats`
    pair that answers.

    Raises:
        WeaverUnavailable: a live control plane of this home has another NATS URL, gRPC address or
            listening host, or does not answer within READY_TIMEOUT_S (the message says which and
            what to do).
    """
    info = discovery.read()
    if info is not None:
        if grpc not in (None, info.grpc) or nats_url not in (None, info.nats_url):
            raise WeaverUnavailable(
                f"a control plane (pid {info.pid}) already runs for {discovery.home()} with NATS "
                f"{info.nats_url} and gRPC {info.grpc}; pass those (or no) --nats/--grpc, or use another "
                "TORCHLOOM_HOME"
            )
        if listen is not None and (not info.tls_ca_file or urlsplit(info.nats_url).hostname != listen):
            raise WeaverUnavailable(
                f"a control plane (pid {info.pid}) already runs for {discovery.home()} with NATS "
                f"{info.nats_url}, not over TLS on {listen}: --listen applies to a control plane started "
                "here; let that one exit (10 s after its last job) or use another TORCHLOOM_HOME"
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not await _probe(info.grpc):  # it may be restarting its weaver
            if time.monotonic() >= deadline or not discovery.pid_alive(info.pid):
                raise WeaverUnavailable(
                    f"the control plane (pid {info.pid}) at gRPC {info.grpc} did not answer within "
                    f"{READY_TIMEOUT_S:g}s; see {controlplane_log()}"
                )
            await asyncio.sleep(0.2)
        return _endpoints(info, owned=False)
    # An explicit weaver plus an explicit NATS URL: the user says they belong together.
    if grpc is not None and nats_url is not None and await _probe(grpc):
        return WeaverEndpoints(nats_url=nats_url, grpc=grpc, ws_url="", owned=False)
    return None


def controlplane_log() -> Path:
    return runs.controlplane_dir() / "controlplane.log"


def start_control_plane(
    *,
    nats_url: str | None,
    grpc: str | None,
    health: HealthOptions,
    nats_creds: str | None = None,
    ui_port: int = 0,
    listen: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m torchloom.app.controlplane` detached: its own session, output appended to
    `$TORCHLOOM_HOME/controlplane/controlplane.log`, the NATS URL in its environment (never argv; a
    URL may hold a password), the path of a credential file on argv (a path is no secret)."""
    environ = dict(os.environ)
    for name in (env.NATS_URL, env.GRPC_ADDR, env.JOB, env.RUN_ID, env.NATS_CREDS_FILE):
        environ.pop(name, None)
    if nats_url is not None:
        environ[env.NATS_URL] = nats_url
    environ[env.HOME] = str(discovery.home())
    bind = grpc or (tls.host_port(listen, 0) if listen is not None else defaults.GRPC_BIND_ADDR)
    argv = [sys.executable, "-m", "torchloom.app.controlplane", "--grpc", bind]
    if listen is not None:
        argv += ["--listen", listen]
    argv += health.argv()
    if nats_creds is not None:
        argv += ["--nats-creds", nats_creds]
    if ui_port:
        argv += ["--ui-port", str(ui_port)]
    cp_dir = private_files.private_dir(runs.controlplane_dir())
    fd = os.open(controlplane_log(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, private_files.PRIVATE_FILE_MODE)
    try:
        proc = subprocess.Popen(
            argv,
            env=environ,
            cwd=cp_dir,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
        )
    finally:
        os.close(fd)
    # Reap it if it ends while we live, so its pid never lingers as a zombie that looks alive.
    threading.Thread(target=proc.wait, name="torchloom-controlplane-reaper", daemon=True).start()
    return proc


async def wait_ready(
    proc: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S
) -> discovery.WeaverInfo:
    """Wait until the control plane `proc` wrote the discovery file and its weaver answers.

    Raises:
        WeaverUnavailable: it exited first, or the deadline passed (naming its log).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (
                controlplane_log().read_text(errors="replace")[-1500:] if controlplane_log().exists() else ""
            )
            raise WeaverUnavailable(
                f"the control plane exited with status {proc.returncode} before it was ready; "
                f"its log {controlplane_log()} ends:\n{tail}"
            )
        info = discovery.read()
        if info is not None and info.pid == proc.pid and await _probe(info.grpc):
            return info
        await asyncio.sleep(0.05)
    raise WeaverUnavailable(
        f"the control plane (pid {proc.pid}) was not ready within {timeout_s:g}s; see {controlplane_log()}"
    )


async def attach(spec: RunSpec, lease: runs.Lease) -> WeaverEndpoints:
    """Find the control plane (or start one) and register the job's lease, under the lock that the
    control plane's idle exit also takes, so a control plane never exits under a new job."""
    lock = runs.ControlPlaneLock()
    deadline = time.monotonic() + 2 * READY_TIMEOUT_S
    while not lock.try_acquire():
        if time.monotonic() >= deadline:
            raise lock.timeout(2 * READY_TIMEOUT_S)
        await asyncio.sleep(0.05)
    try:
        nats_url = spec.nats_url or env.get(env.NATS_URL)
        endpoints = await find_reusable(nats_url, spec.grpc, spec.listen)
        if endpoints is None and spec.join is not None:
            # A joining node never starts a control plane of its own: the first node's must answer.
            raise WeaverUnavailable(
                f"the first node's weaver at gRPC {spec.grpc} (join file {spec.join_path}) does not answer: "
                "is its run still going, and can this machine reach that address?"
            )
        if endpoints is None:
            proc = start_control_plane(
                nats_url=nats_url,
                grpc=spec.grpc,
                health=spec.health,
                nats_creds=given_creds(spec) if nats_url else None,
                ui_port=spec.ui_port,
                listen=spec.listen,
            )
            endpoints = _endpoints(await wait_ready(proc), owned=True)
        runs.write_lease(lease)
    finally:
        lock.release()
    if endpoints.pid:
        await wait_registered(lease, endpoints.pid)
    return endpoints


def given_creds(spec: RunSpec) -> str | None:
    """`--nats-creds`, else TORCHLOOM_NATS_CREDS_FILE: the user's credential for their own server."""
    return spec.nats_creds or env.get(env.NATS_CREDS_FILE)


async def wait_registered(lease: runs.Lease, pid: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the control plane `pid` lists the lease's job in the discovery file: it has then
    minted the job's NATS credential, applied it to the server and created its command stream, so
    the ranks can connect and follow their commands from the start.

    Raises:
        WeaverUnavailable: it did not within `timeout_s` (naming its log).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        info = discovery.read()
        if info is not None and info.pid == pid and lease.job in info.jobs:
            return
        if time.monotonic() >= deadline:
            raise WeaverUnavailable(
                f"the control plane (pid {pid}) did not register job {lease.job} within {timeout_s:g}s; "
                f"see {controlplane_log()}"
            )
        await asyncio.sleep(0.02)


def nats_auth(spec: RunSpec, endpoints: WeaverEndpoints) -> tuple[ClientAuth | None, str | None]:
    """How this run talks to NATS: the supervisor's credential (the launcher role) and the file its
    ranks read theirs from (their job's threadlet credential). From the control plane's credential
    store when it keeps one (the embedded server), else from `--nats-creds` (a server of the
    user's), else none.

    Raises:
        CredentialsError: a credential is missing, readable by others or malformed.
    """
    auth, ranks = _role_auth(spec, endpoints)
    if endpoints.tls_ca_file:  # the control plane serves over TLS: trust its CA, and only it
        auth = replace(auth or ClientAuth(), tls_ca_file=Path(endpoints.tls_ca_file))
    return auth, ranks


def _role_auth(spec: RunSpec, endpoints: WeaverEndpoints) -> tuple[ClientAuth | None, str | None]:
    store = natsauth.store_of(endpoints.secrets_dir)
    if store is not None:
        return store.client_auth(Role.LAUNCHER), str(store.nkey_user(Role.THREADLET, spec.job).seed_file)
    given = given_creds(spec)
    if given is None:
        return None, None
    return natsauth.given_auth(given, Role.LAUNCHER), str(natsauth.given_rank_file(given, spec.job))


def write_join_file(spec: RunSpec, endpoints: WeaverEndpoints, run_id: str) -> Path | None:
    """On the first node of a multi-node run: the join file other nodes take (`--join FILE`), when
    the control plane keeps the credentials (the embedded server); None otherwise."""
    store = natsauth.store_of(endpoints.secrets_dir)
    if store is None:
        return None
    table = tokens.TokenTable.load(Path(endpoints.secrets_dir) / tokens.FILE_NAME)
    info = join_file.JoinInfo(
        job=spec.job,
        run_id=run_id,
        expires_at_s=time.time() + join_file.JOIN_TTL_S,
        nats_url=endpoints.nats_url,
        threadlet_seed=store.nkey_user(Role.THREADLET, spec.job).seed_file.read_text().strip(),
        launcher_seed=store.nkey_user(Role.LAUNCHER).seed_file.read_text().strip(),
        weaver_pubkey=signing.load_or_create(signing.default_key_path()).public_key,
        grpc=endpoints.grpc,
        grpc_token=table.token(tokens.TokenRole.LAUNCHER),
        tls_ca_pem=Path(endpoints.tls_ca_file).read_text() if endpoints.tls_ca_file else "",
    )
    return join_file.write(info)


def join_command_hint(spec: RunSpec, path: Path) -> str:
    """The one command line other nodes run, naming the join file by its path (never its content)."""
    return (
        f"torchloom: other nodes join with: torchloom run --join {path} [the same torchrun options] "
        f"{spec.script} ... (the join file is 0600 and holds this run's credentials: copy it to them "
        "privately; it expires in "
        f"{join_file.JOIN_TTL_S / 3600:g} h and is removed when this run ends)"
    )


def join_hint(spec: RunSpec, endpoints: WeaverEndpoints) -> str:
    """How another node of a multi-node run joins: the same command with this control plane's
    addresses and the same TORCHLOOM_HOME, where it finds the credentials (0600 files)."""
    words = ["torchloom", "run", "--job", spec.job, "--nats", endpoints.nats_url, "--grpc", endpoints.grpc]
    return (
        f"torchloom: other nodes join with TORCHLOOM_HOME={discovery.home()} (its credentials are "
        f"0600 files there, for this user only) and: {' '.join(words)} [the same torchrun options] "
        f"{spec.script} ..."
    )


async def keep_control_plane(spec: RunSpec, lease: runs.Lease, interval_s: float = KEEPER_INTERVAL_S) -> None:
    """While the job runs: when its control plane is gone (killed), start a new one. It continues the
    same NATS address and store, since this job still holds a lease."""
    while True:
        await asyncio.sleep(interval_s)
        if discovery.read() is not None:
            continue
        print("torchloom: the control plane is gone: starting a new one", file=sys.stderr, flush=True)
        try:
            announce(await attach(spec, lease))
        except TorchloomError as exc:
            print(f"torchloom: could not restart the control plane: {exc}", file=sys.stderr, flush=True)


def announce(endpoints: WeaverEndpoints, *, run_id: str | None = None, job: str | None = None) -> None:
    """Tell the user (on stderr) where to connect."""
    who = "started" if endpoints.owned else "reusing"
    parts = [f"torchloom: {who} weaver at gRPC {endpoints.grpc}", f"NATS {endpoints.nats_url}"]
    if endpoints.ws_url:
        parts.append(f"WebSocket {endpoints.ws_url}")
    if run_id is not None:
        parts.append(f"job {job} run {run_id}")
    print("; ".join(parts), file=sys.stderr, flush=True)


async def run(spec: RunSpec) -> int:
    """Launch the job under torchrun with a control plane reachable; return the exit status for it
    (128+N when signal N stopped it: 130 for Ctrl-C, 143 for SIGTERM)."""
    joined = spec.join
    joined_ca: Path | None = None
    if joined is not None:
        # The first node's credentials become 0600 files of this node's own; its gRPC token is this
        # launcher's (in its environment, which only this user can read; the ranks do not get it).
        taken = join_file.take_credentials(joined)
        spec = replace(spec, nats_creds=str(taken))
        os.environ[env.TOKEN] = joined.grpc_token
        joined_ca = join_file.ca_file(taken, joined)
        if joined_ca is not None:  # this launcher's own gRPC calls trust the first node's CA
            os.environ[env.GRPC_CA_FILE] = str(joined_ca)
            await asyncio.to_thread(join_file.verify_servers, joined, spec.join_path or "")
    run_id = spec.run_id or new_run_id()
    lease = runs.Lease(job=spec.job, run_id=run_id, pid=os.getpid())
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(runs.remove_lease, lease)
        endpoints = await attach(spec, lease)
        if joined_ca is not None:
            endpoints = replace(endpoints, tls_ca_file=str(joined_ca))
        if not endpoints.owned and spec.health.config_kwargs():
            print(
                "torchloom: reusing a running weaver, so --hung-after/--straggler-factor/--health-policy "
                "do not apply (they configure a control plane started here)",
                file=sys.stderr,
                flush=True,
            )
        announce(endpoints, run_id=run_id, job=spec.job)
        if spec.policy is not None or spec.replay_path is not None:
            # Before the ranks start, so the rules see the first report; a replay runs without rules
            # (it follows its file), even when the job had a policy before.
            text = policy_cmd.policy_text(spec.policy) if spec.policy is not None else ""
            reply = await policy_cmd.set_job_policy(endpoints.grpc, spec.job, text)
            if reply.name:
                print(f"torchloom: job {spec.job} runs under autopilot policy {reply.name}", file=sys.stderr)
        if spec.multinode:
            written = write_join_file(spec, endpoints, run_id) if spec.join is None else None
            if written is not None:
                stack.callback(join_file.remove, written)
                print(join_command_hint(spec, written), file=sys.stderr, flush=True)
            elif spec.join is None:
                print(join_hint(spec, endpoints), file=sys.stderr, flush=True)
        launcher_auth, ranks_creds = nats_auth(spec, endpoints)
        record = runs.RunRecord(
            run_id=run_id, job=spec.job, store_dir=endpoints.store_dir, nats_url=endpoints.nats_url
        )
        runs.record_run(record)
        if endpoints.pid:
            keeper = asyncio.create_task(keep_control_plane(spec, lease), name="torchloom-keeper")
            stack.push_async_callback(_cancel, keeper)
        if spec.ui:
            await start_ui(stack, endpoints.ws_url, port=spec.ui_port)
        started = time.monotonic()
        # The supervisor runs torchrun as attempts of this run and relaunches it on the weaver's
        # restart request (a device failure under --health-policy reconfigure).
        sup = Supervisor(
            job=spec.job,
            run_id=run_id,
            nats_url=endpoints.nats_url,
            command=lambda n: torchrun_command(
                spec if n is None else replace(spec, torchrun_args=with_nproc(spec.torchrun_args, n))
            ),
            child_env=child_env(
                spec,
                run_id=run_id,
                nats_url=endpoints.nats_url,
                grpc=endpoints.grpc,
                nats_creds_file=ranks_creds,
                tls_ca_file=endpoints.tls_ca_file,
            ),
            credentials=launcher_auth,
            nproc=nproc_of(spec.torchrun_args),
            elastic_membership=spec.multinode,
        )
        code = await sup.run()
        runs.record_run(replace(record, ended_at_s=time.time(), exit_code=code, last_run_id=sup.run_id))
        print(
            f"torchloom: job {spec.job} run {sup.run_id} exited with status {code} "
            f"after {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        return code
    raise AssertionError("unreachable")  # AsyncExitStack does not swallow exceptions


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def start_ui(stack: contextlib.AsyncExitStack, ws_url: str, *, port: int) -> None:
    """Serve the web UI until `stack` closes and print its URL; without a WebSocket URL or a built UI,
    say why on stderr and go on (training matters more than the dashboard)."""
    if not ws_url:
        print(
            "torchloom: no UI: this NATS server has no WebSocket listener known here "
            "(use the embedded server, or `torchloom ui --nats-ws URL`)",
            file=sys.stderr,
            flush=True,
        )
        return
    info = discovery.read()
    try:
        ui = await serve_ui(
            nats_ws_url=ws_url,
            port=port or (info.ui_port if info is not None else 0),
            credentials=cli_actions.ui_credentials(info),
        )
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"torchloom: no UI: {exc}", file=sys.stderr, flush=True)
        return
    stack.push_async_callback(ui.close)
    cli_actions.print_ui_urls(ui, prefix="torchloom UI", out=sys.stderr)
