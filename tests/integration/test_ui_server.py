"""weaver.ui_server over real loopback sockets: the page only for token holders, its assets,
/config.json with the NATS credential of the page's role, the Host/Origin refusals, and the NATS
WebSocket that accepts only the UI's origin and lets only the operator's credential submit."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from tests.integration.helpers import ws_handshake
from torchloom import bus, subjects, wire
from torchloom.credentials import ClientAuth, CredentialStore, Role
from torchloom.errors import NatsUnavailable
from torchloom.messages import Issuer, Outcome, OutcomeStatus, SetConfig, SubmitRequest
from torchloom.nats_server import EmbeddedNats
from weaver.ui_server import UiServer, serve_ui

WS = "ws://127.0.0.1:4223"


async def _get(
    url_port: int, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    extra = {"Host": f"127.0.0.1:{url_port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
        writer.write(f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines_out = head.decode("latin-1").split("\r\n")
    status = int(lines_out[0].split(" ")[1])
    hdrs = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines_out[1:])}
    return status, hdrs, body


def _path(url: str) -> str:
    """The request target of an absolute URL (`/?token=...`)."""
    return "/" + url.split("/", 3)[3]


async def _session(ui: UiServer, url: str) -> str:
    """Open `url` (with its token) and return the session cookie the page got."""
    status, headers, body = await _get(ui.port, _path(url))
    assert status == 200 and b"assets/app.js" in body
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    return cookie.split(";", 1)[0]


async def test_nothing_is_served_without_a_token() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        assert ui.url == f"http://127.0.0.1:{ui.port}/"
        for path in ("/", "/index.html", "/assets/app.js", "/config.json", "/?token=wrong"):
            status, headers, body = await _get(ui.port, path)
            assert status == 403, path
            assert "set-cookie" not in headers and b"app.js" not in body
        status, _, body = await _get(ui.port, "/", Cookie=f"torchloom_ui_{ui.port}=forged")
        assert status == 403 and b"token" in body


async def test_the_viewer_token_opens_a_read_only_session() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        assert ui.viewer_url.startswith(f"http://127.0.0.1:{ui.port}/?token=")
        cookie = await _session(ui, ui.viewer_url)
        status, headers, body = await _get(ui.port, "/assets/app.js", Cookie=cookie)
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert int(headers["content-length"]) == len(body) > 1000
        status, _, body = await _get(ui.port, "/config.json?x=1", Cookie=cookie)
        assert status == 200
        assert json.loads(body) == {"nats_ws_url": WS, "role": "viewer"}
        status, headers, body = await _get(ui.port, "/assets/app.css", method="HEAD", Cookie=cookie)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 100


async def test_the_operator_token_opens_an_operator_session_and_read_only_has_none() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        assert ui.operator_url is not None and ui.operator_url != ui.viewer_url
        cookie = await _session(ui, ui.operator_url)
        status, _, body = await _get(ui.port, "/config.json", Cookie=cookie)
        assert status == 200 and json.loads(body)["role"] == "operator"
    async with UiServer(nats_ws_url=WS, read_only=True) as ui:
        assert ui.operator_url is None
        cookie = await _session(ui, ui.viewer_url)
        status, _, body = await _get(ui.port, "/config.json", Cookie=cookie)
        assert json.loads(body)["role"] == "viewer"


async def test_host_and_origin_must_name_the_ui() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        path = _path(ui.operator_url or "")
        # DNS rebinding: another name that resolves to 127.0.0.1.
        status, _, _ = await _get(ui.port, path, Host=f"evil.example:{ui.port}")
        assert status == 403
        status, _, _ = await _get(ui.port, path, Origin="http://evil.example")
        assert status == 403
        status, _, _ = await _get(ui.port, path, Origin=f"http://127.0.0.1:{ui.port + 1}")
        assert status == 403
        for origin in ui.origins:
            status, _, _ = await _get(ui.port, path, Origin=origin)
            assert status == 200, origin
        status, _, _ = await _get(ui.port, path, Host=f"localhost:{ui.port}")
        assert status == 200


@pytest.mark.parametrize(
    "path", ["/assets/../ui_server.py", "/assets/%2e%2e/x", "/../weaver/ui_server.py", "/nope", "/assets/"]
)
async def test_unknown_and_escaping_paths_are_404(path: str) -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        cookie = await _session(ui, ui.viewer_url)
        status, _, _ = await _get(ui.port, path, Cookie=cookie)
        assert status == 404


async def test_only_get_and_head() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        status, _, _ = await _get(ui.port, "/", method="POST")
        assert status == 405


async def test_refuses_non_loopback_bind_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"host='0.0.0.0' rejected: the UI binds loopback only"):
        UiServer(nats_ws_url=WS, host="0.0.0.0")
    # Allowed explicitly: constructing is fine (we do not bind a public address in tests).
    assert UiServer(nats_ws_url=WS, host="0.0.0.0", allow_remote=True).host == "0.0.0.0"


async def test_bad_arguments_name_the_expected_form(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected ws://HOST:PORT"):
        UiServer(nats_ws_url="nats://127.0.0.1:4222")
    with pytest.raises(ValueError, match=r"port=70000 rejected: must be in \[0, 65535\]"):
        UiServer(nats_ws_url=WS, port=70000)
    with pytest.raises(FileNotFoundError, match="make ui-setup"):
        await UiServer(nats_ws_url=WS, static_dir=tmp_path).start()


async def test_serve_ui_returns_a_started_server_and_close_is_idempotent() -> None:
    ui = await serve_ui(nats_ws_url=WS)
    try:
        status, _, _ = await _get(ui.port, _path(ui.viewer_url).replace("/?", "/index.html?"))
        assert status == 200
    finally:
        await ui.close()
        await ui.close()
    with pytest.raises(OSError):
        await _get(ui.port, "/")


async def test_torchloom_ui_cli_serves_the_page_and_prints_its_urls(subprocess_env: dict[str, str]) -> None:
    # Started with SIGINT ignored, as a background job of a non-interactive shell is: Ctrl-C ends it.
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", 'trap "" INT; exec torchloom ui --nats-ws "$0" --port 0', WS,
        env=subprocess_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            lines = [(await proc.stdout.readline()).decode().strip() for _ in range(2)]
        urls = r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{40,})"
        operator = re.fullmatch(rf"torchloom UI: {urls}", lines[0])
        viewer = re.fullmatch(rf"torchloom UI \(read-only\): {urls}", lines[1])
        assert operator and viewer, f"expected the operator and viewer URLs on stdout, got {lines!r}"
        port = int(operator.group(1))
        assert port == int(viewer.group(1)) > 0 and operator.group(2) != viewer.group(2)
        status, _, _ = await _get(port, "/")
        assert status == 403
        status, headers, body = await _get(port, f"/?token={viewer.group(2)}")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"assets/app.js" in body and b'id="checkpoints"' in body and b'id="control-note"' in body
        cookie = headers["set-cookie"].split(";", 1)[0]
        status, _, body = await _get(port, "/config.json", Cookie=cookie)
        assert status == 200 and json.loads(body) == {"nats_ws_url": WS, "role": "viewer"}
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the NATS side: nats-server with the control plane's credentials ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[EmbeddedNats, CredentialStore, int]]:
    """nats-server with the role table and a WebSocket listener for the UI's port only."""
    store = CredentialStore.open(tmp_path / "secrets")
    ui_port = _free_port()
    origins = UiServer(nats_ws_url=WS, port=ui_port).origins
    server = EmbeddedNats(tmp_path / "nats", credentials=store, allowed_origins=origins).start()
    try:
        yield server, store, ui_port
    finally:
        server.stop()


async def _page_config(ui: UiServer, url: str) -> dict[str, Any]:
    cookie = await _session(ui, url)
    status, _, body = await _get(ui.port, "/config.json", Cookie=cookie)
    assert status == 200
    config: dict[str, Any] = json.loads(body)
    return config


async def _connect_like_the_page(config: dict[str, Any], errors: list[str]) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    url = config["nats_ws_url"].replace("ws://", f"ws://{config['nats_user']}:{config['nats_password']}@")
    return await bus.connect(
        url,
        name="page",
        credentials=ClientAuth(inbox_prefix=config["inbox_prefix"]),
        on_error=on_error,
        connect_timeout_s=5.0,
    )


async def test_the_nats_websocket_refuses_other_origins_and_only_the_operator_page_submits(
    secured: tuple[EmbeddedNats, CredentialStore, int],
) -> None:
    server, store, ui_port = secured
    assert server.ws_port is not None
    assert ws_handshake(server.ws_port, "http://evil.example") == 403
    assert ws_handshake(server.ws_port, f"http://127.0.0.1:{ui_port + 1}") == 403
    assert ws_handshake(server.ws_port, f"http://127.0.0.1:{ui_port}") == 101

    # A stand-in weaver answers api.submit (it connects with the weaver's own nkey).
    weaver = await bus.connect(server.url, name="weaver", credentials=store.client_auth(Role.WEAVER))
    asked: list[SubmitRequest] = []

    async def answer(msg: Any) -> None:
        req = wire.decode_submit_request(msg.data)
        asked.append(req)
        await msg.respond(wire.encode(Outcome(command_id="x", job=req.job, status=OutcomeStatus.REJECTED)))

    await weaver.subscribe(subjects.api_submit(), cb=answer)
    await weaver.flush()
    req = SubmitRequest(
        job="j", body=SetConfig(values={"lr": 0.1}), issuer=Issuer(kind="ui", identity="page")
    )
    try:
        async with UiServer(nats_ws_url=server.ws_url, port=ui_port, credentials=store) as ui:
            assert ui.operator_url is not None
            viewer_cfg = await _page_config(ui, ui.viewer_url)
            operator_cfg = await _page_config(ui, ui.operator_url)
        assert viewer_cfg["role"] == "viewer" and viewer_cfg["nats_user"] == "ui-viewer"
        assert viewer_cfg["inbox_prefix"] == "_INBOX.ui-viewer"
        assert operator_cfg["role"] == "operator" and operator_cfg["nats_user"] == "ui-operator"
        assert viewer_cfg["nats_password"] != operator_cfg["nats_password"]

        errors: list[str] = []
        viewer = await _connect_like_the_page(viewer_cfg, errors)
        try:
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await viewer.request(subjects.api_submit(), wire.encode(req), timeout=2)
            assert any("permissions violation" in e and subjects.api_submit() in e for e in errors), errors
        finally:
            await viewer.close()
        assert asked == []

        operator = await _connect_like_the_page(operator_cfg, [])
        try:
            reply = await operator.request(subjects.api_submit(), wire.encode(req), timeout=10)
        finally:
            await operator.close()
        assert wire.decode_outcome(reply.data).status is OutcomeStatus.REJECTED
        assert [r.job for r in asked] == ["j"]
        # Anonymous pages are refused outright.
        with pytest.raises(NatsUnavailable, match=r"Authorization Violation|Connection reset by peer"):
            await bus.connect(server.ws_url, name="anonymous", connect_timeout_s=1.0)
    finally:
        await weaver.close()
