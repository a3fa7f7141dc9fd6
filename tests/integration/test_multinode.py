"""Multi-node elastic run on one machine: two real `torchloom run` launchers play two nodes of one c10d
rendezvous (`--nnodes 1:2`); node B's agent and worker are killed with SIGKILL, node A's torchrun
re-rendezvouses alone and resumes from the checkpoint as `<run>-a1`, and the weaver reports the
scale-down. Once on loopback, once with node A's control plane listening on 127.0.0.2 over TLS
(`--listen`, as for nodes on other machines; nothing outside loopback is ever a target here): node B
then joins over TLS with only the join file, a client without the CA and a plaintext client are
refused, node A's CLI needs no flag, and a join file with another CA is refused naming the host."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import nats
import pytest

from tests.integration.helpers import cli, until
from torchloom import certs, discovery, subjects, wire
from torchloom.app.health_options import UsageError
from torchloom.app.run_args import split_run_args
from torchloom.client import ControlClient
from torchloom.credentials import ClientAuth, CredentialStore, Role
from torchloom.errors import WeaverUnavailable
from torchloom.messages import Action, ActionKind, Issuer, JobEvent, OutcomeStatus, StatusReply, SubmitRequest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "reconf_train.py"
JOB = "mn"
RUN = "mn"  # derived from --rdzv-id
# Node A alone trains from the checkpoint (about step 10) to the end at 50 ms a step; the first attempt
# needs only to outlast the checkpoint and the kill that follow both nodes' step 5.
STEPS = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(out: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for path in sorted(out.glob("rank*.jsonl")):
        recs += [json.loads(line) for line in path.read_text().splitlines()]
    return recs


def _weaver_auth(info: discovery.WeaverInfo, *, with_ca: bool = True) -> ClientAuth:
    """The control plane's weaver credential, trusting its CA when it serves TLS (unless not `with_ca`)."""
    auth = CredentialStore(info.secrets_dir).client_auth(Role.WEAVER)
    if info.tls_ca_file and with_ca:
        return dataclasses.replace(auth, tls_ca_file=Path(info.tls_ca_file))
    return auth


@contextlib.asynccontextmanager
async def _event_feed(info: discovery.WeaverInfo) -> AsyncIterator[list[JobEvent]]:
    """The job's events (from the journal's start), appended live: node A's embedded NATS, which holds
    the journal, ends with node A, so the test reads them while it runs (with the weaver's credential
    from the control plane's store: the server admits no anonymous client)."""
    nc = await nats.connect(info.nats_url, allow_reconnect=False, **_weaver_auth(info).nats_options())
    got: list[JobEvent] = []

    async def on_event(msg: Any) -> None:
        got.append(wire.decode_event(msg.data))

    try:
        await nc.jetstream().subscribe(
            subjects.events(JOB), stream=subjects.STREAM_JOURNAL, cb=on_event, ordered_consumer=True
        )
        yield got
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


@contextlib.asynccontextmanager
async def _node(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """One node: `torchloom run` in its own session; on the way out SIGTERM, then SIGKILL to its group."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "torchloom.app.cli", "run", *args, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()


async def _status(client: ControlClient) -> StatusReply | None:
    try:
        async with asyncio.timeout(5):
            return await client.status(JOB)
    except Exception:  # not up yet, or the job has no heartbeat yet
        return None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _agent_of(worker: int) -> tuple[int, int]:
    """(torchrun agent, launcher) of a worker: its parent and grandparent (torchrun starts each worker
    in a session of its own, so the worker is not in the agent's process group)."""
    agent = _parent(worker)
    return agent, _parent(agent)


def _check_private_and_unprinted(join_file: Path, log: Path) -> None:
    """The join file is 0600 and its secrets are not in the log (the path is printed, not these)."""
    assert stat.S_IMODE(join_file.stat().st_mode) == 0o600
    secrets = json.loads(join_file.read_text())
    for name in ("threadlet_seed", "launcher_seed", "grpc_token"):
        assert secrets[name] not in log.read_text()


def _plain_nats_reply(host: str, port: int) -> tuple[dict[str, Any], bytes]:
    """Speak plain NATS to `host:port`: its INFO greeting, and everything it answers a CONNECT and a
    PING with until it closes the connection (or 5 s pass)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        greeting = sock.recv(65536)
        assert greeting.startswith(b"INFO "), greeting[:80]
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    return json.loads(greeting[5:].split(b"\r\n", 1)[0]), answer


def _check_join_names_tls(info: discovery.WeaverInfo, joined: Path) -> None:
    """The join file names node A's TLS addresses and carries its CA, the one node A's clients trust."""
    join_data = json.loads(joined.read_text())
    assert (join_data["nats_url"], join_data["grpc"]) == (info.nats_url, info.grpc)
    assert join_data["tls_ca_pem"] == Path(info.tls_ca_file).read_text()


def _stale_join_file(joined: Path, tmp: Path) -> tuple[Path, str]:
    """A copy of the join file with another CA (0600), and the NATS host:port it names."""
    data = json.loads(joined.read_text())
    data["tls_ca_pem"] = certs.ensure_server_tls(tmp / "stale-ca", "127.0.0.2").ca_pem()
    stale = tmp / "stale-join.json"
    stale.write_text(json.dumps(data))
    stale.chmod(0o600)
    return stale, urlsplit(data["nats_url"]).netloc


async def _only_tls_with_the_ca(
    info: discovery.WeaverInfo, joined: Path, env: dict[str, str], tmp: Path
) -> None:
    """Node A serves NATS and gRPC on 127.0.0.2 over TLS only, trusting nobody but its own CA's
    holders; its own CLI needs no flag (the discovery file names the CA)."""
    nats_at, grpc_at = urlsplit(info.nats_url), info.grpc
    assert (nats_at.scheme, nats_at.hostname) == ("tls", "127.0.0.2"), info
    assert grpc_at.startswith("127.0.0.2:") and info.tls_ca_file, info
    _check_join_names_tls(info, joined)
    res = await asyncio.to_thread(cli, "status", "--json", env=env, timeout_s=60)
    assert res.returncode == 0 and JOB in res.stdout, res.stderr[-2000:]
    # A client with the right credential but without the CA: the handshake fails, nothing is said.
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(
            info.nats_url,
            allow_reconnect=False,
            connect_timeout=5,
            **_weaver_auth(info, with_ca=False).nats_options(),
        )
    other_ca = certs.ensure_server_tls(tmp / "other-ca", "127.0.0.2").ca_pem().encode()
    with pytest.raises(WeaverUnavailable):
        async with ControlClient(grpc_at, root_certificates=other_ca, timeout_s=5) as wrong:
            await wrong.status(JOB)
    # Plain NATS: the server demands TLS and answers a plaintext CONNECT with nothing but a close.
    greeting, answer = await asyncio.to_thread(_plain_nats_reply, "127.0.0.2", int(nats_at.port or 0))
    assert greeting.get("tls_required") is True, greeting
    assert b"PONG" not in answer and b"+OK" not in answer, answer
    # Plaintext gRPC: no HTTP/2 session, so no call, whatever token it would carry.
    async with grpc.aio.insecure_channel(grpc_at) as channel:
        status = channel.unary_unary("/torchloom.v1.Control/Status")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await status(b"", timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value


async def _another_ca_is_refused(joined: Path, torchrun: list[str], env: dict[str, str], tmp: Path) -> None:
    """A join file whose CA is not the first node's: `torchloom run --join` stops before anything
    connects, naming the host whose certificate did not verify and the file."""
    stale, host = _stale_join_file(joined, tmp)
    env_c = dict(env, TORCHLOOM_HOME=str(tmp / "home_c"))
    res = await asyncio.to_thread(
        cli, "run", "--join", str(stale), *torchrun, str(SCRIPT), env=env_c, timeout_s=90
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert (
        f"NATS server at {host} presented a certificate that the CA of join file {stale} does not verify"
        in (res.stderr)
    ), res.stderr[-2000:]


def test_listen_takes_only_an_address_of_this_machine_that_a_certificate_can_name() -> None:
    base = ["--nnodes", "2", "--rdzv-id", "r1", "train.py"]
    assert split_run_args(["--listen", "127.0.0.2", *base]).listen == "127.0.0.2"
    with pytest.raises(
        UsageError, match=r"--listen 192.0.2.1 rejected: this machine has no address 192.0.2.1"
    ):
        split_run_args(["--listen", "192.0.2.1", *base])  # TEST-NET-1: bound nowhere, contacted never
    with pytest.raises(UsageError, match="a wildcard address cannot be named in a certificate"):
        split_run_args(["--listen", "0.0.0.0", *base])
    with pytest.raises(UsageError, match=r"--grpc 127.0.0.1:5005 rejected: with --listen 127.0.0.2"):
        split_run_args(["--listen", "127.0.0.2", "--grpc", "127.0.0.1:5005", *base])


@pytest.mark.parametrize("listen", [None, "127.0.0.2"], ids=["loopback", "tls-off-127.0.0.1"])
@pytest.mark.timeout(200)
async def test_losing_a_node_is_a_scale_down_the_weaver_reports_and_node_a_resumes(
    tmp_path: Path, subprocess_env: dict[str, str], listen: str | None
) -> None:
    env = dict(subprocess_env)
    for name in ("TORCHLOOM_NATS_URL", "TORCHLOOM_GRPC", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env["TORCHLOOM_CHECKPOINT_DIR"] = str(tmp_path / "ckpt")  # the nodes' shared file system
    out = tmp_path / "out"
    rdzv_port = _free_port()
    # Node A hosts the rendezvous store (it must outlive node B); a dead node is dropped from the
    # rendezvous after 3 missed 1 s keep-alives; the last call waits for stragglers to join: node B's
    # agent joins about 0.5 s after node A's (both start once A's control plane is up), and after the
    # kill node A waits the whole last call alone.
    conf = "join_timeout=60,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"
    torchrun = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    torchrun += ["--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", RUN, "--max-restarts", "3"]
    script = [str(SCRIPT), "--steps", str(STEPS), "--step-sleep", "0.05", "--out", str(out)]
    logs = (tmp_path / "node_a.log", tmp_path / "node_b.log")
    served = ["--listen", listen] if listen is not None else []
    async with _node(
        ["--job", JOB, *served, *torchrun, "--rdzv-conf", f"{conf},is_host=1", *script], env, logs[0]
    ) as a:
        info = await until("node A's weaver (discovery file)", discovery.read, timeout_s=60, logs=logs)

        def join_file() -> str | None:
            found = re.search(r"other nodes join with: torchloom run --join (\S+) ", logs[0].read_text())
            return found.group(1) if found else None

        # Node B shares nothing with node A but the join file A wrote (another TORCHLOOM_HOME).
        joined = Path(await until("node A's join file", join_file, timeout_s=60, logs=logs))
        _check_private_and_unprinted(joined, logs[0])
        env_b = dict(env, TORCHLOOM_HOME=str(tmp_path / "home_b"))
        node_b = ["--join", str(joined), *torchrun]
        async with (
            _node([*node_b, "--rdzv-conf", f"{conf},is_host=0", *script], env_b, logs[1]) as b,
            ControlClient(info.grpc) as client,
            _event_feed(info) as events,
        ):

            async def both_training() -> StatusReply | None:
                reply = await _status(client)
                if reply is None or not reply.jobs:
                    return None
                job = reply.jobs[0]
                ranks = [r for r in job.ranks if r.alive and r.step >= 5]
                return reply if job.run_id == RUN and job.world_size == 2 and len(ranks) == 2 else None

            reply = await until(
                "both nodes' ranks training with world size 2", both_training, timeout_s=60, logs=logs
            )
            # Two launchers, one run: each node's rank is a worker of its own node's torchrun agent.
            agents = {r.rank: _agent_of(r.pid) for r in reply.jobs[0].ranks}
            assert {launcher for _, launcher in agents.values()} == {a.pid, b.pid}, agents
            outcome = await client.submit(
                SubmitRequest(
                    job=JOB,
                    issuer=Issuer(kind="test", identity="multinode"),
                    body=Action(kind=ActionKind.CHECKPOINT),
                )
            )
            assert outcome.status is OutcomeStatus.APPLIED, outcome
            assert len(outcome.results) == 2
            ckpt_step = int(outcome.results[0].detail["checkpoint_step"])
            # Node B goes away whole: its launcher, its torchrun agent and the agent's worker.
            lost_rank = next(r for r, (_, launcher) in agents.items() if launcher == b.pid)
            worker_b = next(r.pid for r in reply.jobs[0].ranks if r.rank == lost_rank)
            os.kill(agents[lost_rank][0], signal.SIGKILL)
            os.kill(worker_b, signal.SIGKILL)
            os.killpg(b.pid, signal.SIGKILL)
            await b.wait()
            if listen is not None:
                # While node A waits out the rendezvous's last call alone (seconds): what node A serves
                # is the same with or without node B, and a refused join stops before any rendezvous.
                await _only_tls_with_the_ca(info, joined, env, tmp_path)
                await _another_ca_is_refused(joined, ["--nnodes", "1:2", "--rdzv-id", RUN], env, tmp_path)

            def scaled_and_resumed() -> bool:
                kinds = {e.kind for e in events}
                return {"scale_down", "resumed"} <= kinds

            await until("scale_down and resumed events", scaled_and_resumed, timeout_s=60, logs=logs)
            async with asyncio.timeout(60):
                code = await a.wait()
    assert code == 0, logs[0].read_text(errors="replace")[-4000:]
    # Node A's run ended: its join file is gone (the job's credential is withdrawn too).
    assert not await asyncio.to_thread(joined.exists)

    seen = [(e.kind, e.run_id, dict(e.attrs)) for e in events]
    dead = [e for e in events if e.kind == "rank_dead" and e.run_id == RUN]
    assert str(lost_rank) in {e.attrs.get("rank") for e in dead}, seen
    scale = [e for e in events if e.kind == "scale_down"]
    assert [e.run_id for e in scale] == [f"{RUN}-a1"], seen
    attrs = scale[0].attrs
    assert (attrs["old_world_size"], attrs["new_world_size"], attrs["lost_ranks"]) == ("2", "1", "1"), attrs
    assert attrs["previous_run"] == RUN
    assert attrs["lost_hosts"] == socket.gethostname(), attrs  # both "nodes" ran on this host
    resumed = [e for e in events if e.kind == "resumed"]
    assert [e.run_id for e in resumed] == [f"{RUN}-a1"], seen
    assert int(resumed[0].attrs["resume_step"]) == ckpt_step

    recs = _records(out)
    first = [r for r in recs if r["run"] == RUN]
    again = [r["step"] for r in recs if r["run"] == f"{RUN}-a1"]
    # A checkpoint at step k holds the state after steps 0..k-1: the first attempt trained that far.
    assert {r["world"] for r in first} == {2} and max(r["step"] for r in first) >= ckpt_step - 1
    # Node A alone, from the checkpoint to the end.
    assert again == list(range(ckpt_step, STEPS)), (again[:5], again[-5:])
    assert {r["world"] for r in recs if r["run"] == f"{RUN}-a1"} == {1}
