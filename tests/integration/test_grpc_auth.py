"""The gRPC Control service only answers authenticated callers: a real nats-server, a real weaver
and its gRPC service, real clients (and the real CLI) with no token, a wrong token, the discovery
file's token and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.helpers import until, weaver_config
from torchloom import discovery, subjects, tokens, wire
from torchloom.client import ControlClient
from torchloom.errors import Unauthenticated, WeaverUnavailable
from torchloom.knobs import BUILTIN_SPECS
from torchloom.messages import Heartbeat, Issuer, JobEvent, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.app import RunningWeaver, open_weaver
from weaver.config import WeaverConfig
from weaver.grpc_api import ControlServer

JOB = "authjob"
RUN = "run1"


@contextlib.asynccontextmanager
async def one_rank(nc: Any) -> AsyncIterator[None]:
    """Rank 0 of a one-rank job heartbeating (it never acks: commands stay in flight)."""

    async def beat() -> None:
        while True:
            hb = Heartbeat(
                job=JOB,
                run_id=RUN,
                rank=0,
                world_size=1,
                incarnation="inc-0",
                step=1,
                knobs=(BUILTIN_SPECS["lr"],),
                sent_at_s=time.time(),
            )
            await nc.publish(subjects.heartbeat(JOB, 0), wire.encode(hb))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def refused_events(w: RunningWeaver) -> list[JobEvent]:
    return [
        e
        for e in [x async for x in w.weaver.streams.journal()]
        if isinstance(e, JobEvent) and e.kind == "refused" and e.attrs.get("what") == "call"
    ]


async def test_calls_without_a_valid_token_are_refused_and_journaled(
    nats_server: EmbeddedNats, tl_home: Path
) -> None:
    async with open_weaver(weaver_config(nats_server)) as w:
        addr = w.grpc_address
        async with ControlClient(addr, token="") as anonymous:
            with pytest.raises(Unauthenticated, match=r"refused the status request: no credential"):
                await anonymous.status()
        async with ControlClient(addr, token="not-a-token-of-this-weaver") as stranger:
            req = SubmitRequest(
                job=JOB,
                body=SetConfig(values={"lr": 0.5}),
                issuer=Issuer(kind="cli", identity="mallory@evil"),
                command_id="c0ffee",
            )
            with pytest.raises(Unauthenticated, match="unknown token"):
                await stranger.submit(req)
            with pytest.raises(Unauthenticated, match="unknown token"):
                async for _ in stranger.journal():
                    pass
        # A raw call with a malformed authorization value.
        async with grpc.aio.insecure_channel(addr) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Status")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"", metadata=(("authorization", "Basic dXNlcjpwYXNz"),), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "malformed authorization" in (err.value.details() or "")

        async def journaled() -> list[JobEvent]:
            return await refused_events(w)

        await until("three refusals in the journal", lambda: _count_at_least(journaled, 3))
        events = await refused_events(w)
        by_method = {e.attrs["method"]: e for e in events}
        assert set(by_method) >= {"Status", "Submit", "Journal"}, events
        for e in events:
            assert e.attrs["who"].startswith("unauthenticated ipv4:127.0.0.1:"), e
        assert by_method["Status"].attrs["why"].startswith("no credential")
        submit = by_method["Submit"]
        assert submit.attrs["why"] == "unknown token"
        assert submit.attrs["command_id"] == "c0ffee" and submit.attrs["claimed"] == "mallory@evil"
        assert "gRPC Submit from unauthenticated" in submit.message

        # With the operator token (found in $TORCHLOOM_HOME, no argument) the same calls work.
        async with ControlClient(addr) as client:
            assert (await client.status()).jobs == ()


async def test_an_agent_token_cannot_set_the_policy_or_answer_proposals(
    nats_server: EmbeddedNats, tl_home: Path, nc: Any
) -> None:
    """An agent whose token could set the policy or approve proposals would lift its own guardrails
    (or approve what approval mode holds for a person): both calls are refused and journaled, while
    the operator's token may make them."""
    async with open_weaver(weaver_config(nats_server)) as w, one_rank(nc):
        _, agent_token = tokens.add_agent("eager", tokens.default_path())
        async with ControlClient(w.grpc_address) as operator:
            await until("the job in status", lambda: _has_job(operator))
        async with ControlClient(w.grpc_address, token=agent_token) as agent:
            await until("the agent's token accepted", lambda: _has_job(agent))
            with pytest.raises(Unauthenticated, match="SetPolicy is for people and launchers, not agents"):
                await agent.set_policy(JOB, "")
            with pytest.raises(Unauthenticated, match="DecideProposal is for people and launchers"):
                await agent.decide_proposal("p-1", approve=True, job=JOB)
        await until("two refusals in the journal", lambda: _count_at_least(lambda: refused_events(w), 2))
        refused = {e.attrs["method"]: e for e in await refused_events(w)}
        assert refused["SetPolicy"].attrs["who"] == "agent:eager", refused
        assert refused["DecideProposal"].attrs["who"] == "agent:eager", refused
        async with ControlClient(w.grpc_address) as operator:
            assert (await operator.set_policy(JOB, "")).job == JOB


async def _has_job(client: ControlClient) -> bool:
    try:
        return bool((await client.status(JOB)).jobs)
    except Exception:
        return False


async def _count_at_least(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


SERVICE = "torchloom.v1.Control"


async def test_the_issuer_is_the_authenticated_identity_not_the_claimed_one(
    nats_server: EmbeddedNats, tl_home: Path, nc: Any
) -> None:
    async with (
        open_weaver(weaver_config(nats_server)) as w,
        one_rank(nc),
        ControlClient(w.grpc_address) as client,
    ):

        async def visible() -> bool:
            try:
                return bool((await client.status(JOB)).jobs)
            except Exception:
                return False

        await until("the job in status", visible)
        outcome = await client.submit(
            SubmitRequest(
                job=JOB,
                body=SetConfig(values={"lr": 0.01}),
                issuer=Issuer(kind="cli", identity="root@somewhere-else"),
                timeout_s=0.3,
            )
        )
        assert outcome.command is not None
        # The claim is journaled beside the authenticated identity, never in its place.
        issued = Issuer(
            kind="cli", identity=tokens.operator_identity(), claimed_identity="root@somewhere-else"
        )
        assert outcome.command.issuer == issued
        # What the ranks receive (and what the journal records) is the stored, signed command.
        stored = [c for c, _ in await w.weaver.streams.commands(JOB, RUN)]
        assert [c.issuer for c in stored] == [issued]
    # The UI's operator token stands for "ui-operator".
    table = tokens.TokenTable.load(tokens.default_path())
    assert table.identify(table.token(tokens.TokenRole.UI_OPERATOR)) == "ui-operator"
    assert table.identify(table.token(tokens.TokenRole.LAUNCHER)) == "launcher"
    assert table.identify("x" * 43) is None


async def test_the_cli_uses_the_discovery_files_token_with_no_flags(
    nats_server: EmbeddedNats, tl_home: Path, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    # The weaver's token table lives elsewhere: only the discovery file tells the CLI the token.
    table_file = tmp_path / "elsewhere" / "tokens.json"
    config = weaver_config(nats_server, grpc_tokens_file=str(table_file))
    async with open_weaver(config) as w:
        path = discovery.write(
            discovery.WeaverInfo(
                pid=os.getpid(), nats_url=nats_server.url, grpc=w.grpc_address, token=w.operator_token
            )
        )
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text())["token"] == w.operator_token

        def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "torchloom.app.cli", *args],
                env={**subprocess_env, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )

        ok = await asyncio.to_thread(cli, "status", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"jobs": []}
        bad = await asyncio.to_thread(cli, "status", "--json", TORCHLOOM_TOKEN="wrong-token-0123456789")
        assert bad.returncode == 1, (bad.stdout, bad.stderr)
        assert "refused the status request: unknown token" in bad.stderr
        token_file = tmp_path / "token"
        token_file.write_text(w.operator_token + "\n")
        token_file.chmod(0o644)
        loose = await asyncio.to_thread(cli, "status", "--token-file", str(token_file))
        assert loose.returncode == 1 and "chmod 600" in loose.stderr, loose.stderr
        token_file.chmod(0o600)
        explicit = await asyncio.to_thread(
            cli, "status", "--json", "--token-file", str(token_file), TORCHLOOM_TOKEN="wrong-token-0123456789"
        )
        assert explicit.returncode == 0, explicit.stderr


async def test_off_loopback_needs_tls(nats_server: EmbeddedNats, tl_home: Path) -> None:
    with pytest.raises(ValueError, match=r"grpc_addr='0.0.0.0:50051' rejected: off loopback .* needs TLS"):
        WeaverConfig(nats_url=nats_server.url, grpc_addr="0.0.0.0:50051")
    with pytest.raises(ValueError, match=r"give both"):
        WeaverConfig(nats_url=nats_server.url, grpc_tls_cert_file="cert.pem")
    async with open_weaver(weaver_config(nats_server)) as w:
        table = tokens.TokenTable.generate()
        for addr in ("0.0.0.0:0", "[::]:0", "example.com:50051"):
            with pytest.raises(ValueError, match="off loopback the Control service needs TLS"):
                ControlServer(w.weaver, addr, tokens=table)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1 and localhost (openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_and_plaintext_clients_fail(
    nats_server: EmbeddedNats, tl_home: Path, tmp_path: Path
) -> None:
    cert, key = await asyncio.to_thread(self_signed, tmp_path)
    config = weaver_config(nats_server, grpc_tls_cert_file=str(cert), grpc_tls_key_file=str(key))
    async with open_weaver(config) as w:
        async with ControlClient(w.grpc_address, root_certificates=cert.read_bytes()) as client:
            assert (await client.status()).jobs == ()
        async with ControlClient(w.grpc_address, timeout_s=2.0) as plain:
            with pytest.raises(WeaverUnavailable):
                await plain.status()


async def test_malformed_requests_and_ids_are_refused_naming_the_form_and_journaled(
    nats_server: EmbeddedNats, tl_home: Path
) -> None:
    """A request that does not parse is INVALID_ARGUMENT naming what was wrong (it was gRPC's
    UNKNOWN with a traceback in the weaver's log), and journaled; a command id or issuer kind outside
    the documented form is REJECTED under an id of the weaver's (it was accepted as is: 100 KB ids,
    terminal escapes that `torchloom journal` printed raw)."""
    from torchloom.v1 import torchloom_pb2 as pb

    async with open_weaver(weaver_config(nats_server)) as w:
        _, token = tokens.add_agent("tester", tokens.default_path())
        auth = (("authorization", f"Bearer {token}"),)
        empty_value = pb.SubmitRequest(job=JOB)
        empty_value.set.values["lr"].SetInParent()  # a Value with no kind set
        async with grpc.aio.insecure_channel(w.grpc_address) as channel:
            submit = channel.unary_unary(f"/{SERVICE}/Submit")
            journal = channel.unary_stream(f"/{SERVICE}/Journal")
            for call, payload in (
                (submit, empty_value.SerializeToString()),
                (submit, pb.SubmitRequest(job=JOB).SerializeToString()),  # no body
                (submit, b"\xff\xff\xff"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(payload, metadata=auth, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert (err.value.details() or "").startswith("malformed Submit request: "), err.value
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in journal(b"\xff\xff\xff", metadata=auth, timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith("malformed Journal request: ")
        # Journaled, rate-limited per method: Submit's first refusal and Journal's.
        await until(
            "the malformed calls journaled", lambda: _count_at_least(lambda: _refused_with(w, "malformed"), 2)
        )

        async with ControlClient(w.grpc_address) as client:
            for command_id in ("bad id\x1b[31m", "x" * 100_000):
                out = await client.submit(
                    SubmitRequest(job=JOB, body=SetConfig(values={"lr": 0.5}), command_id=command_id)
                )
                assert out.status.value == "rejected" and out.command_id != command_id
                assert "expected 1 to 64 characters from A-Z, a-z, 0-9 and '_.:-'" in out.reason, out.reason
                assert len(out.reason) < 400 and "\x1b" not in out.reason  # quoted, escaped
            odd = await client.submit(
                SubmitRequest(job=JOB, body=SetConfig(values={"lr": 0.5}), issuer=Issuer(kind="k" * 5000))
            )
            assert odd.status.value == "rejected" and "issuer kind" in odd.reason
            assert odd.issuer is not None and odd.issuer.kind == "?"


async def _refused_with(w: RunningWeaver, why: str) -> list[JobEvent]:
    return [e for e in await refused_events(w) if why in e.attrs.get("why", "")]
