"""weaver.ui_server over real loopback sockets: the page, its assets, /config.json and the refusals."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from weaver.ui_server import UiServer, serve_ui

WS = "ws://127.0.0.1:4223"


async def _get(url_port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def test_serves_index_assets_and_config() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        assert ui.port > 0
        assert ui.url == f"http://127.0.0.1:{ui.port}/"
        status, headers, body = await _get(ui.port, "/")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b"assets/app.js" in body
        status, headers, body = await _get(ui.port, "/assets/app.js")
        assert status == 200
        assert headers["content-type"].startswith("text/javascript")
        assert int(headers["content-length"]) == len(body) > 1000
        status, _, body = await _get(ui.port, "/config.json?x=1")
        assert status == 200
        assert json.loads(body) == {"nats_ws_url": WS}
        status, headers, body = await _get(ui.port, "/assets/app.css", method="HEAD")
        assert status == 200
        assert body == b""
        assert int(headers["content-length"]) > 100


@pytest.mark.parametrize(
    "path", ["/assets/../ui_server.py", "/assets/%2e%2e/x", "/../weaver/ui_server.py", "/nope", "/assets/"]
)
async def test_unknown_and_escaping_paths_are_404(path: str) -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        status, _, _ = await _get(ui.port, path)
        assert status == 404


async def test_only_get_and_head() -> None:
    async with UiServer(nats_ws_url=WS) as ui:
        status, _, _ = await _get(ui.port, "/", method="POST")
        assert status == 405


async def test_refuses_non_loopback_bind_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"host='0.0.0.0' rejected: .*loopback only"):
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
        status, _, _ = await _get(ui.port, "/index.html")
        assert status == 200
    finally:
        await ui.close()
        await ui.close()
    with pytest.raises(OSError):
        await _get(ui.port, "/")


async def test_torchloom_ui_cli_serves_the_page_and_prints_its_url(subprocess_env: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "torchloom", "ui", "--nats-ws", WS, "--port", "0",
        env=subprocess_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode().strip()
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"expected the UI's URL on stdout, got {line!r}"
        port = int(match.group(1))
        assert port > 0
        status, headers, body = await _get(port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"assets/app.js" in body and b'id="checkpoints"' in body
        status, _, body = await _get(port, "/config.json")
        assert status == 200 and json.loads(body) == {"nats_ws_url": WS}
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
