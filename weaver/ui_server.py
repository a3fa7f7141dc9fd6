"""A tiny stdlib HTTP server for the web UI: the built page from weaver/static and /config.json.

The page talks to nats-server's WebSocket listener directly; this server only hands it the files and
the WebSocket URL. It binds loopback unless a non-loopback bind is explicitly allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_REQUEST_BYTES = 16 * 1024
_READ_TIMEOUT_S = 10.0


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_ws_url(url: str) -> str:
    if not re.match(r"^wss?://[^\s/]+(/\S*)?$", url):
        raise ValueError(f"nats_ws_url={url!r} is not a WebSocket URL: expected ws://HOST:PORT")
    return url


class UiServer:
    """Serves the UI: GET / (index.html), /assets/NAME and /config.json; HEAD too.

    Use as an async context manager, or `await start()` / `await close()`.

    Args:
        nats_ws_url: the nats-server WebSocket URL the page connects to (ws://127.0.0.1:PORT).
        host: the address to bind; loopback unless `allow_remote` is true.
        port: the TCP port; 0 picks a free one (read it back from `.port` or `.url`).
        static_dir: the built UI (index.html and assets/); defaults to the packaged weaver/static.
        allow_remote: permit a non-loopback bind. The UI can steer training and has no auth.
    """

    def __init__(
        self,
        *,
        nats_ws_url: str,
        host: str = "127.0.0.1",
        port: int = 0,
        static_dir: Path | None = None,
        allow_remote: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port={port} rejected: must be in [0, 65535]")
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"host={host!r} rejected: the UI can steer training and has no authentication, so it "
                "binds loopback only (127.0.0.1, ::1, localhost); allow a remote bind explicitly to override"
            )
        self.nats_ws_url = _check_ws_url(nats_ws_url)
        self.host = host
        self.port = port
        self.static_dir = (static_dir or STATIC_DIR).resolve()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The page's address, e.g. http://127.0.0.1:8765/."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> Self:
        """Bind and start serving; raises FileNotFoundError when the UI was never built."""
        if self._server is not None:
            return self
        index = self.static_dir / "index.html"
        if not index.is_file():
            raise FileNotFoundError(
                f"{index} is missing: build the UI with `make ui-setup` (npm run build in ui/)"
            )
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("torchloom UI on %s (NATS WebSocket %s)", self.url, self.nats_ws_url)
        return self

    async def close(self) -> None:
        """Stop serving; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- HTTP ------------------------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[int, bytes, str]:
        """Map a request path to (status, body, content type); no filesystem path escapes."""
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            return self._file(self.static_dir / "index.html")
        if path == "/config.json":
            body = json.dumps({"nats_ws_url": self.nats_ws_url}).encode()
            return 200, body, _CONTENT_TYPES[".json"]
        if path.startswith("/assets/"):
            name = path[len("/assets/") :]
            if _ASSET_NAME.match(name) and ".." not in name:
                return self._file(self.static_dir / "assets" / name)
        return 404, b"not found\n", "text/plain; charset=utf-8"

    def _file(self, file: Path) -> tuple[int, bytes, str]:
        try:
            body = file.read_bytes()
        except OSError:
            return 404, b"not found\n", "text/plain; charset=utf-8"
        return 200, body, _CONTENT_TYPES.get(file.suffix, "application/octet-stream")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            if len(head) > _MAX_REQUEST_BYTES:
                await self._respond(writer, 431, b"request header too large\n", "text/plain", False)
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, b"bad request\n", "text/plain", False)
                return
            method, target, _version = parts
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"only GET and HEAD\n", "text/plain", False)
                return
            status, body, ctype = self._resolve(target)
            await self._respond(writer, status, body, ctype, method == "HEAD")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str, head_only: bool
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Error"
        )
        headers = (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(headers.encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()


async def serve_ui(
    *,
    nats_ws_url: str,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
) -> UiServer:
    """Start a UiServer and return it (call `await server.close()` when done).

    Args:
        nats_ws_url: the nats-server WebSocket URL for the page.
        host: the bind address; loopback unless `allow_remote`.
        port: the TCP port; 0 picks a free one.
        allow_remote: permit a non-loopback bind.

    Returns:
        The started server; `.url` is the page's address.
    """
    return await UiServer(nats_ws_url=nats_ws_url, host=host, port=port, allow_remote=allow_remote).start()
