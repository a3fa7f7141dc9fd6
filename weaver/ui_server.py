"""A tiny stdlib HTTP server for the web UI: the built page from weaver/static and /config.json.

The page talks to nats-server's WebSocket listener directly; this server hands it the files, the
WebSocket URL and the NATS credential of its role. It follows Jupyter: it binds loopback (unless a
remote bind is explicitly allowed), makes a fresh token per role when it starts (a viewer token, and
an operator token unless read-only) and serves nothing to a request that brings neither a token
(`/?token=...`, which opens a session cookie) nor that session. Every request's Host and Origin must
name this server, so another site (or a DNS-rebound name) gets 403 even from the user's own browser.
A viewer page gets the ui-viewer NATS credential, which may not publish on api.submit; only an
operator page gets the ui-operator one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import secrets
from collections import OrderedDict
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, urlsplit

from torchloom.credentials import CredentialStore, Role, inbox_prefix
from weaver.grpc_api import is_loopback

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
_NO_TOKEN = b"forbidden: open the URL with ?token=... that `torchloom ui` or `torchloom run --ui` printed\n"
_MAX_SESSIONS = 256  # the oldest session is forgotten past this (its page must be reopened by URL)
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class UiRole(StrEnum):
    """What a page may do: watch (viewer) or also steer (operator)."""

    VIEWER = "viewer"
    OPERATOR = "operator"


_NATS_ROLE = {UiRole.VIEWER: Role.UI_VIEWER, UiRole.OPERATOR: Role.UI_OPERATOR}


def _check_ws_url(url: str) -> str:
    if not re.match(r"^wss?://[^\s/]+(/\S*)?$", url):
        raise ValueError(f"nats_ws_url={url!r} is not a WebSocket URL: expected ws://HOST:PORT")
    return url


class UiServer:
    """Serves the UI to token holders: GET / (index.html), /assets/NAME and /config.json; HEAD too.

    Use as an async context manager, or `await start()` / `await close()`; then hand out
    `operator_url` (can steer) or `viewer_url` (read-only).

    Args:
        nats_ws_url: the nats-server WebSocket URL the page connects to (ws://127.0.0.1:PORT).
        host: the address to bind; loopback unless `allow_remote` is true.
        port: the TCP port; 0 picks a free one (read it back from `.port` or `.url`). A nats-server
            with `allowed_origins` accepts only the page origins of the port it was started with.
        static_dir: the built UI (index.html and assets/); defaults to the packaged weaver/static.
        allow_remote: permit a non-loopback bind (the tokens still guard it; the traffic is plain
            HTTP, so only on a network you trust).
        credentials: the control plane's NATS credentials; a page gets the ui-viewer or ui-operator
            user and password of its role. None: a NATS server without authentication (the page
            connects anonymously; only the page itself then keeps a viewer from steering).
        read_only: make no operator token at all: every page is a viewer.
    """

    def __init__(
        self,
        *,
        nats_ws_url: str,
        host: str = "127.0.0.1",
        port: int = 0,
        static_dir: Path | None = None,
        allow_remote: bool = False,
        credentials: CredentialStore | None = None,
        read_only: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port={port} rejected: must be in [0, 65535]")
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"host={host!r} rejected: the UI binds loopback only (127.0.0.1, ::1, localhost), as "
                "Jupyter does; allow a remote bind explicitly to override"
            )
        self.nats_ws_url = _check_ws_url(nats_ws_url)
        self.host = host
        self.port = port
        self.static_dir = (static_dir or STATIC_DIR).resolve()
        self.allow_remote = allow_remote
        self.credentials = credentials
        self._tokens = {UiRole.VIEWER: secrets.token_urlsafe(32)}
        if not read_only:
            self._tokens[UiRole.OPERATOR] = secrets.token_urlsafe(32)
        self._sessions: OrderedDict[str, UiRole] = OrderedDict()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The server's address, e.g. http://127.0.0.1:8765/ (it answers 403 without a token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def viewer_url(self) -> str:
        """The read-only page: `url` with the viewer token."""
        return f"{self.url}?token={self._tokens[UiRole.VIEWER]}"

    @property
    def operator_url(self) -> str | None:
        """The page that can steer: `url` with the operator token (None when read-only)."""
        token = self._tokens.get(UiRole.OPERATOR)
        return f"{self.url}?token={token}" if token is not None else None

    @property
    def origins(self) -> tuple[str, ...]:
        """The origins of this server's pages: what nats-server's `allowed_origins` must list."""
        hosts = ["127.0.0.1", "localhost", "[::1]"]
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            hosts.append(f"[{self.host}]" if ":" in self.host else self.host)
        return tuple(f"http://{h}:{self.port}" for h in hosts)

    @property
    def _cookie(self) -> str:
        # Cookies are shared across ports of one host: name it after this server's port.
        return f"torchloom_ui_{self.port}"

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
        log.info("torchloom UI on %s (NATS WebSocket %s)", self.url, self.nats_ws_url)  # no token
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

    def _host_ok(self, host_header: str) -> bool:
        """Whether a Host header names this server (a DNS-rebound name does not)."""
        if self.allow_remote:
            return True
        return any(host_header == o.removeprefix("http://") for o in self.origins)

    def _role_of_token(self, token: str) -> UiRole | None:
        found: UiRole | None = None
        for role, expected in self._tokens.items():
            if hmac.compare_digest(token.encode(), expected.encode()):
                found = role
        return found

    def _new_session(self, role: UiRole) -> str:
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = role
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid

    def _session_role(self, cookie_header: str) -> UiRole | None:
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self._cookie and value:
                for sid, role in self._sessions.items():
                    if hmac.compare_digest(sid.encode(), value.encode()):
                        return role
        return None

    def _config(self, role: UiRole) -> bytes:
        config: dict[str, str] = {"nats_ws_url": self.nats_ws_url, "role": role.value}
        if self.credentials is not None:
            user = self.credentials.password_user(_NATS_ROLE[role])
            config |= {
                "nats_user": user.user,
                "nats_password": user.password,
                "inbox_prefix": inbox_prefix(_NATS_ROLE[role]),
            }
        return json.dumps(config).encode()

    def _resolve(self, path: str, role: UiRole) -> tuple[int, bytes, str]:
        """Map a request path to (status, body, content type); no filesystem path escapes."""
        if path in ("/", "/index.html"):
            return self._file(self.static_dir / "index.html")
        if path == "/config.json":
            return 200, self._config(role), _CONTENT_TYPES[".json"]
        if path.startswith("/assets/"):
            name = path[len("/assets/") :]
            if _ASSET_NAME.match(name) and ".." not in name:
                return self._file(self.static_dir / "assets" / name)
        return 404, b"not found\n", _TEXT

    def _file(self, file: Path) -> tuple[int, bytes, str]:
        try:
            body = file.read_bytes()
        except OSError:
            return 404, b"not found\n", _TEXT
        return 200, body, _CONTENT_TYPES.get(file.suffix, "application/octet-stream")

    def _answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes, str, str]:
        """(status, body, content type, Set-Cookie value or "") of one request."""
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", _TEXT, ""
        if not self._host_ok(headers.get("host", "")):
            return 403, b"forbidden: the Host header does not name this server\n", _TEXT, ""
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return 403, b"forbidden: cross-origin request\n", _TEXT, ""
        parts = urlsplit(target)
        role, cookie = self._session_role(headers.get("cookie", "")), ""
        token = (parse_qs(parts.query).get("token") or [""])[0]
        if token:
            by_token = self._role_of_token(token)
            if by_token is None:
                return 403, b"forbidden: unknown token\n", _TEXT, ""
            role = by_token
            cookie = f"{self._cookie}={self._new_session(role)}; Path=/; HttpOnly; SameSite=Strict"
        if role is None:
            return 403, _NO_TOKEN, _TEXT, ""
        return (*self._resolve(parts.path, role), cookie)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            if len(head) > _MAX_REQUEST_BYTES:
                await self._respond(writer, 431, b"request header too large\n", _TEXT, False)
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, b"bad request\n", _TEXT, False)
                return
            method, target, _version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            status, body, ctype, cookie = self._answer(method, target, headers)
            await self._respond(writer, status, body, ctype, method == "HEAD", cookie=cookie)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        head_only: bool,
        *,
        cookie: str = "",
    ) -> None:
        set_cookie = f"Set-Cookie: {cookie}\r\n" if cookie else ""
        headers = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{set_cookie}"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "X-Frame-Options: DENY\r\n"
            "Referrer-Policy: no-referrer\r\n"
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
    credentials: CredentialStore | None = None,
) -> UiServer:
    """Start a UiServer and return it (call `await server.close()` when done).

    Args:
        nats_ws_url: the nats-server WebSocket URL for the page.
        host: the bind address; loopback unless `allow_remote`.
        port: the TCP port; 0 picks a free one.
        allow_remote: permit a non-loopback bind.
        credentials: the control plane's NATS credentials (see `UiServer`).

    Returns:
        The started server; `.operator_url` and `.viewer_url` are the pages' addresses.
    """
    return await UiServer(
        nats_ws_url=nats_ws_url, host=host, port=port, allow_remote=allow_remote, credentials=credentials
    ).start()
