"""Shared mechanics of the integration tests: starting torchrun jobs and CLI processes, killing their
process trees, job environments, reading the ranks' records and the job's events, and polling a
weaver until a job trains. Assertions stay in the tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client

from tests.conftest import REPO
from torchloom import bus, discovery, signing, subjects, wire
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, Role
from torchloom.errors import JobNotFound, WeaverUnavailable
from torchloom.messages import Command, JobEvent, Outcome, OutcomeStatus, StatusReply, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.config import WeaverConfig

if TYPE_CHECKING:
    from threadlet.config import ThreadletConfig

EXAMPLE = REPO / "examples" / "train_tiny.py"

# Variables naming a weaver or a job: a test that starts its own (`torchloom run`, `weaver`) drops them
# so nothing from the outer environment steers the child.
BINDING_VARS = ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID")


def example_until_stop(step_sleep: float) -> list[str]:
    """The example's arguments, all but the --out directory that follows them, for a job that trains
    until the test's `stop`: far more steps than any test needs, so no command arrives after the loop
    ended on a loaded machine, and its replay ends at the same (recorded) stop. The replay may run at
    another pace (0: it reproduces the recorded steps whatever the pace)."""
    return [str(EXAMPLE), "--steps", "1000000", "--step-sleep", str(step_sleep), "--out"]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts its workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    for p in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def start_session(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own session (so a failed test can kill the whole tree), output piped."""
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def torchrun(
    out: Path, env: dict[str, str], *, steps: int, step_sleep: float, script: Path = EXAMPLE
) -> subprocess.Popen[bytes]:
    """A 2-rank standalone torchrun job of `script` writing its records under `out`."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        str(script), "--steps", str(steps), "--out", str(out), "--step-sleep", str(step_sleep),
    ]  # fmt: skip
    return start_session(cmd, env)


def weaver_pubkey() -> str:
    """The public key a weaver started here signs with (its default key, under this process's
    TORCHLOOM_HOME): what ranks launched without `torchloom run` need to accept its commands."""
    return signing.load_or_create(signing.default_key_path()).public_key


def signed(cmd: Command) -> Command:
    """`cmd` signed with the key a weaver started here uses, as the weaver would publish it."""
    return signing.load_or_create(signing.default_key_path()).sign(cmd)


def auth(server: EmbeddedNats, role: Role = Role.WEAVER, job: str | None = None) -> ClientAuth | None:
    """The credential `role` connects to `server` with (None on an open server)."""
    return server.credentials.client_auth(role, job) if server.credentials is not None else None


async def connect(server: EmbeddedNats, role: Role = Role.WEAVER, job: str | None = None) -> Client:
    """A NATS connection to `server` as `role` (the weaver by default: it may do anything)."""
    return await bus.connect(server.url, name=f"test-{role.value}", credentials=auth(server, role, job))


def weaver_publishes(job: str, run_id: str) -> str:
    """The subjects the weaver publishes a run's commands on (its job stream's secret capture
    subject, whatever the token): a core subscription here sees each command as the weaver sends it."""
    return f"{subjects.PREFIX}.wcmd.*.{job}.{run_id}"


async def make_rank_consumers(nc: Client, job: str) -> None:
    """Play the weaver's part for ranks that run without one: at each rank process's first heartbeat,
    make its command consumer (`bus.ensure_rank_consumer`, as `weaver.streams.RankConsumers` does),
    the one its credential may pull from. `nc` must be the weaver's role and stay open meanwhile."""
    made: set[tuple[str, int, str]] = set()

    async def on_heartbeat(msg: Any) -> None:
        hb = wire.decode_heartbeat(msg.data)
        key = (hb.run_id, hb.rank, hb.incarnation)
        if key not in made:
            made.add(key)
            try:
                await bus.ensure_rank_consumer(nc.jetstream(), job, *key)
            except Exception:
                made.discard(key)  # the next heartbeat tries again

    await nc.subscribe(subjects.heartbeats_of(job), cb=on_heartbeat)


def rank_creds(server: EmbeddedNats, job: str) -> dict[str, str]:
    """The variables ranks of `job` need to reach `server`: its URL and, on a secured server, their
    job's threadlet credential (granted here and applied with a reload, as a job's registration does)."""
    env = {"TORCHLOOM_NATS_URL": server.url}
    if server.credentials is not None:
        env["TORCHLOOM_NATS_CREDS_FILE"] = str(server.grant_job(job).seed_file)
    return env


def threadlet_config(server: EmbeddedNats, job: str, run_id: str) -> ThreadletConfig:
    """The `ThreadletConfig` of an in-process rank of `job`'s run `run_id` on `server`: with the
    job's credential on a secured server, and accepting commands signed by a weaver started here."""
    from threadlet.config import ThreadletConfig  # here: most users of the helpers need no threadlet

    return ThreadletConfig(
        nats_url=server.url,
        job=job,
        run_id=run_id,
        weaver_pubkey=weaver_pubkey(),
        nats_creds_file=rank_creds(server, job).get("TORCHLOOM_NATS_CREDS_FILE"),
    )


def weaver_creds(server: EmbeddedNats) -> dict[str, str]:
    """The variable a weaver process (`python -m weaver`, `torchloom weaver --nats`) reads its NATS
    credential from, for `server` (empty on an open server)."""
    if server.credentials is None:
        return {}
    return {"TORCHLOOM_NATS_CREDS_FILE": str(server.credentials.nkey_user(Role.WEAVER).seed_file)}


def run_creds(server: EmbeddedNats, job: str) -> list[str]:
    """`torchloom run --nats URL` options for `server`: the URL and, on a secured server, its secrets
    directory (every party then uses its role's credential; `job` is granted first)."""
    args = ["--nats", server.url]
    if server.credentials is not None:
        server.grant_job(job)
        args += ["--nats-creds", str(server.credentials.directory)]
    return args


def job_env(
    base: dict[str, str], job: str, *, server: EmbeddedNats | None = None, **extra: str
) -> dict[str, str]:
    """`base` plus the job name, a fresh run id, one OMP thread, the weaver's public key, the bus of
    `server` (`rank_creds`) when given, and `extra`."""
    env = dict(base)
    env.update(
        TORCHLOOM_JOB=job,
        TORCHLOOM_RUN_ID=uuid.uuid4().hex[:8],
        OMP_NUM_THREADS="1",
        TORCHLOOM_WEAVER_PUBKEY=weaver_pubkey(),
        **(rank_creds(server, job) if server is not None else {}),
        **extra,
    )
    return env


def unbound_env(base: dict[str, str], *drop: str, **extra: str) -> dict[str, str]:
    """`base` without the weaver/job variables (and `drop`), plus `extra`."""
    env = dict(base)
    for name in (*BINDING_VARS, *drop):
        env.pop(name, None)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m torchloom.app.cli ARGS` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "torchloom.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `python -m torchloom.app.cli ARGS` (a `torchloom run`, say) in a session of its own, so
    a failed test can kill its whole tree; output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_cli(proc: subprocess.Popen[str], timeout_s: float = 240.0) -> str:
    """Wait for a `start_cli` process to end and return its stderr (the test checks `proc.returncode`);
    past the deadline, or on any error while waiting, kill its whole tree and raise."""
    try:
        _out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate(timeout=30)
    return err


def home_client(env: Mapping[str, str]) -> ControlClient | None:
    """A client (to open with `async with`) of the control plane of `env`'s TORCHLOOM_HOME, with its
    discovery file's address, token and CA, as a flagless CLI there finds it; None before the file
    exists."""
    info = discovery.read(discovery.home(env) / discovery.FILE_NAME)
    if info is None:
        return None
    ca = Path(info.tls_ca_file).read_bytes() if info.tls_ca_file else None
    return ControlClient(info.grpc, token=info.token or None, root_certificates=ca)


async def home_status(env: Mapping[str, str], job: str = "") -> StatusReply | None:
    """What `torchloom status [--job JOB]` shows for the control plane of `env`'s TORCHLOOM_HOME, read
    through one gRPC call from this process (`home_client`); None while no control plane answers or
    it does not know `job` yet. For polls: a CLI process per poll costs about a second of a loaded
    core, taken from the job that is starting."""
    client = home_client(env)
    if client is None:
        return None
    try:
        async with client:
            return await client.status(job)
    except (JobNotFound, WeaverUnavailable):
        return None


def wait_status(
    env: Mapping[str, str],
    what: str,
    ok: Callable[[StatusReply], object],
    *,
    proc: subprocess.Popen[Any] | None = None,
    job: str = "",
    timeout_s: float = 120.0,
) -> StatusReply:
    """Poll `home_status` every 0.1 s until `ok` holds for the reply, and return it; fail naming
    `what` at the deadline, or at once when `proc` (the `torchloom run` under test) has exited."""

    async def poll() -> StatusReply:
        end = time.monotonic() + timeout_s
        while True:
            reply = await home_status(env, job)
            if reply is not None and ok(reply):
                return reply
            if proc is not None and proc.poll() is not None:
                said = await _output(proc)
                pytest.fail(
                    f"the process exited ({proc.returncode}) while waiting for {what}: {said[-3000:]}"
                )
            if time.monotonic() > end:
                pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}; last status {reply!r}")
            await asyncio.sleep(0.1)

    return asyncio.run(poll())


def wait_ranks(
    env: Mapping[str, str],
    min_step: int,
    *,
    proc: subprocess.Popen[Any] | None = None,
    job: str = "",
    ranks: int = 2,
) -> StatusReply:
    """`wait_status` until the job (`job`, or the first one) has `ranks` live ranks, each at
    `min_step` or later."""

    def ok(reply: StatusReply) -> bool:
        live = [r for r in reply.jobs[0].ranks if r.alive] if reply.jobs else []
        return len(live) == ranks and min(r.step for r in live) >= min_step

    return wait_status(env, f"{ranks} live ranks at step {min_step}", ok, proc=proc, job=job)


def status_job(
    env: dict[str, str], min_step: int, *, proc: subprocess.Popen[Any], job: str = "", ranks: int = 2
) -> dict[str, Any]:
    """Once the job's `ranks` ranks are at `min_step` (`wait_ranks`, polled in this process), the job
    as `torchloom status --json [--job JOB]` shows it; that it shows them so is checked here."""
    wait_ranks(env, min_step, proc=proc, job=job, ranks=ranks)
    res = cli("status", "--json", *(("--job", job) if job else ()), env=env, timeout_s=30)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = json.loads(res.stdout)["jobs"]
    live = [r for r in jobs[0]["ranks"] if r["alive"]] if jobs else []
    assert len(live) == ranks and min(r["step"] for r in live) >= min_step, jobs
    return dict(jobs[0])


def wait_journaled(env: Mapping[str, str], job: str, kind: str, *, proc: subprocess.Popen[Any]) -> None:
    """Until the journal of `job` holds an event of `kind`, read in this process through the gRPC
    journal `torchloom journal --job JOB` reads (`home_client`): a CLI per poll takes a core."""

    async def poll() -> None:
        client = home_client(env)
        assert client is not None, "no control plane"
        async with client:

            async def journaled() -> bool:
                entries = [e async for e in client.journal(job)]
                return any(isinstance(e, JobEvent) and e.kind == kind for e in entries)

            await until(f"a {kind} event in the journal of {job}", journaled, proc=proc, timeout_s=120)

    asyncio.run(poll())


def min_step(env: dict[str, str]) -> int:
    """The lowest step of the only job's ranks, from the status `torchloom status --json` shows (0
    before it reports), read in this process (`home_status`)."""
    reply = asyncio.run(home_status(env))
    jobs = reply.jobs if reply is not None else ()
    return min((r.step for r in jobs[0].ranks), default=0) if jobs else 0


def port_open(url: str) -> bool:
    """Whether a server accepts TCP connections at `url` (nats://HOST:PORT)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def read_records(path: Path) -> list[dict[str, object]]:
    """The complete JSON lines a rank has written so far ([] before the file exists)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def read_all_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a finished rank's record file (it must exist and be complete)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def replay_plan(out: Path, job: str) -> dict[str, Any]:
    """A replay file's content: the commands rank 0 applied (its record is the journal's), in order."""
    applied = json.loads((out / "rank0.applied.json").read_text())
    return {
        "job": job,
        "commands": [
            {k: a[k] for k in ("seq", "step", "branch", "kind", "values", "args")}
            for a in applied
            if a["status"] == "applied"
        ],
    }


async def job_events(url: str, job: str, *, credentials: ClientAuth | None = None) -> list[JobEvent]:
    """Every event of `job` in the events stream: read until the stream has none left to deliver (each
    delivery says how many are pending), or, when it holds none, until 1 s passes without one. For a
    finished run: what its weaver publishes after the read began may be missed."""
    nc = await bus.connect(url, name="test-events", credentials=credentials)
    try:
        sub = await nc.jetstream().subscribe(
            subjects.events(job), stream=subjects.STREAM_JOURNAL, ordered_consumer=True
        )
        out: list[JobEvent] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            out.append(wire.decode_event(msg.data))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await nc.close()


async def wait_training(client: ControlClient, job: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    """Until the weaver sees two alive ranks and each has written 10 records (deadline 60 s)."""

    async def training() -> bool:
        try:
            status = (await client.status(job)).jobs[0]
        except JobNotFound:
            return False
        return len([r for r in status.ranks if r.alive]) == 2 and all(
            len(read_records(out / f"rank{r}.jsonl")) >= 10 for r in (0, 1)
        )

    await until("two training ranks", training, interval_s=0.05, proc=proc)


async def submit(client: ControlClient, job: str, body: Any) -> Outcome:
    """Submit `body` and check both ranks applied it at the same step, branch and ids."""
    out = await client.submit(SubmitRequest(job=job, body=body, timeout_s=60))
    assert out.status is OutcomeStatus.APPLIED, out
    assert [r.rank for r in sorted(out.results, key=lambda r: r.rank)] == [0, 1]
    # Every rank decided it at the same step, on the same branch, with the same ids (an eval's
    # metrics are each rank's own).
    ids = {
        (r.step, r.branch, tuple(sorted(r.detail.items())) if "eval.loss" not in r.detail else ())
        for r in out.results
    }
    assert len(ids) == 1, out.results
    return out


async def until(
    what: str,
    check: Callable[[], Any],
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.1,
    proc: asyncio.subprocess.Process | subprocess.Popen[Any] | None = None,
    logs: Sequence[Path] = (),
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy, and return that; fail naming
    `what` at the deadline, or at once when `proc` (the process under test) has exited. The failure
    shows the process's output and the tails of `logs`."""
    end = time.monotonic() + timeout_s
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.returncode if proc else None
        if proc is not None and code is not None:
            out = await _output(proc)
            pytest.fail(
                f"the process exited ({code}) while waiting for {what}: {out[-3000:]}{log_tails(logs)}"
            )
        if time.monotonic() > end:
            pytest.fail(
                f"timed out after {timeout_s:g}s waiting for {what}; last value {got!r}{log_tails(logs)}"
            )
        await asyncio.sleep(interval_s)


async def _output(proc: asyncio.subprocess.Process | subprocess.Popen[Any]) -> str:
    """What an exited process wrote to its captured stderr (or stdout, where stderr goes there)."""
    if isinstance(proc, subprocess.Popen):
        stream = proc.stderr or proc.stdout
        said = stream.read() if stream else ""
        return said.decode(errors="replace") if isinstance(said, bytes) else said
    stream_a = proc.stderr or proc.stdout
    return (await stream_a.read()).decode(errors="replace") if stream_a else ""


def log_tails(logs: Sequence[Path]) -> str:
    """The last 3,000 characters of each log in `logs` that exists, each under its name."""
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


def weaver_config(server: EmbeddedNats, **kw: Any) -> WeaverConfig:
    """A weaver on `server` with its credential, that declares a rank dead after 1 s without a
    heartbeat unless `kw` says otherwise."""
    kw.setdefault("dead_after_s", 1.0)
    return WeaverConfig(nats_url=server.url, nats_credentials=auth(server), **kw)


def ws_handshake(port: int, origin: str) -> int:
    """A raw WebSocket upgrade to 127.0.0.1:`port` as a browser page on `origin` sends it; the HTTP
    status (101 accepted, 403 refused)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key}
        conn.request("GET", "/", headers={**headers, "Sec-WebSocket-Version": "13", "Origin": origin})
        return conn.getresponse().status
    finally:
        conn.close()
