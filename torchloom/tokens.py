"""Bearer tokens of the weaver's gRPC service: which identity each token stands for, and how a client
finds its own.

Whoever starts the weaver owns the token table, a 0600 JSON file in the control plane's 0700 secrets
directory (`$TORCHLOOM_HOME/controlplane/secrets/grpc-tokens.json`), created with random tokens on
first use: the local operator ("operator:<user>@<host>"), the web UI's operator ("ui-operator") and
the launcher ("launcher"). Agents get tokens of their own, added one by one (`add_agent`, the CLI's
`torchloom token add-agent NAME`): identity "agent:<name>", and the weaver puts their submits through
the guardrails of the job's policy. A running weaver reads the table again when the file changes
(`TokenFile`). A client sends `authorization: Bearer <token>` on every call; its token
comes from an explicit argument, then TORCHLOOM_TOKEN, then the discovery file, then the table itself
(readable only by the user who owns the control plane), so a user's own CLI needs no flags.
"""

from __future__ import annotations

import getpass
import hmac
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from torchloom import discovery, env, private_files
from torchloom.errors import TorchloomError

log = logging.getLogger(__name__)

FILE_NAME = "grpc-tokens.json"
METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
SCHEME = "Bearer"
_TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 512
AGENT_PREFIX = "agent:"
_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TokenError(TorchloomError, ValueError):
    """A token file that is missing, malformed or readable by other users."""


class TokenRole(StrEnum):
    """Who a gRPC token stands for (phase-2 design, section 3)."""

    OPERATOR = "operator"
    UI_OPERATOR = "ui-operator"
    LAUNCHER = "launcher"
    AGENT = "agent"  # one entry per agent, added by `add_agent`; never generated


# The roles every table holds from its creation.
BUILT_IN_ROLES = (TokenRole.OPERATOR, TokenRole.UI_OPERATOR, TokenRole.LAUNCHER)


def agent_identity(name: str) -> str:
    """The identity "agent:<name>" of an agent called `name`.

    Raises:
        TokenError: `name` is not [A-Za-z0-9][A-Za-z0-9_.-]{0,63}.
    """
    if not _AGENT_NAME.fullmatch(name):
        raise TokenError(
            f"agent name {name!r} rejected: expected 1 to 64 of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return f"{AGENT_PREFIX}{name}"


def default_path() -> Path:
    """`$TORCHLOOM_HOME/controlplane/secrets/grpc-tokens.json`."""
    return discovery.home() / "controlplane" / "secrets" / FILE_NAME


def operator_identity() -> str:
    """The local operator's identity: "operator:<user>@<host>" of this process."""
    return f"operator:{getpass.getuser()}@{socket.gethostname()}"


def _identity_of(role: TokenRole) -> str:
    return operator_identity() if role is TokenRole.OPERATOR else role.value


def read_private_text(path: Path, what: str) -> str:
    """Read a secret file, refusing one that group or others may read.

    Raises:
        TokenError: the file is missing, unreadable or readable by others.
    """
    return private_files.read_private(path, what, error=TokenError)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token and the identity the weaver gives its calls."""

    role: TokenRole
    identity: str
    token: str

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"TokenEntry(role={self.role.value!r}, identity={self.identity!r}, token='***')"


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The tokens a weaver accepts. Build it with `load_or_create` (or `generate` for a private one)."""

    entries: tuple[TokenEntry, ...]

    @classmethod
    def generate(cls) -> TokenTable:
        """A table of fresh random tokens, one per role, kept in memory only."""
        return cls(
            tuple(
                TokenEntry(role=r, identity=_identity_of(r), token=secrets.token_urlsafe(_TOKEN_BYTES))
                for r in BUILT_IN_ROLES
            )
        )

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read a table written by `save`.

        Raises:
            TokenError: the file is missing, malformed or readable by others.
        """
        text = read_private_text(path, "gRPC token file")
        try:
            data = json.loads(text)
            entries = tuple(
                TokenEntry(role=TokenRole(e["role"]), identity=str(e["identity"]), token=str(e["token"]))
                for e in data["tokens"]
            )
            for e in entries:
                if e.role is TokenRole.AGENT:
                    if not e.identity.startswith(AGENT_PREFIX):
                        raise ValueError(f"agent identity {e.identity!r} must start with {AGENT_PREFIX!r}")
                    agent_identity(e.identity.removeprefix(AGENT_PREFIX))
        except (ValueError, KeyError, TypeError) as exc:  # TokenError is a ValueError
            raise TokenError(
                f"gRPC token file {path} is malformed ({type(exc).__name__}: {exc}): expected "
                '{"tokens": [{"role": "operator", "identity": "...", "token": "..."}, ...]}'
            ) from None
        if any(len(e.token) < 16 for e in entries):
            raise TokenError(f"gRPC token file {path} holds a token shorter than 16 characters")
        return cls(entries)

    @classmethod
    def load_or_create(cls, path: Path | None = None) -> TokenTable:
        """The table at `path` (default `default_path()`), written with fresh tokens when absent.

        Raises:
            TokenError: the file exists but is malformed or readable by others.
        """
        target = path or default_path()
        if not target.exists():
            table = cls.generate()
            table.save(target)
            return table
        return cls.load(target)

    def save(self, path: Path) -> Path:
        """Write the table to `path` atomically, 0600 in a 0700 directory."""
        data = {
            "tokens": [{"role": e.role.value, "identity": e.identity, "token": e.token} for e in self.entries]
        }
        return private_files.write_private_json(path, data)

    def token(self, role: TokenRole) -> str:
        """The token of `role` (the first one when several share it)."""
        for e in self.entries:
            if e.role is role:
                return e.token
        raise KeyError(f"no {role.value} token in the table")

    def entry(self, token: str) -> TokenEntry | None:
        """The entry of `token` (its role and identity), or None. Every entry is compared in
        constant time."""
        found: TokenEntry | None = None
        given = token.encode()
        for e in self.entries:
            if hmac.compare_digest(given, e.token.encode()):
                found = e
        return found

    def identify(self, token: str) -> str | None:
        """The identity `token` stands for, or None."""
        found = self.entry(token)
        return found.identity if found is not None else None

    def with_agent(self, name: str) -> tuple[TokenTable, str]:
        """This table with a fresh token for agent `name` (replacing its old one), and that token.

        Raises:
            TokenError: `name` is not a valid agent name (`agent_identity`).
        """
        identity = agent_identity(name)
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        kept = tuple(e for e in self.entries if e.identity != identity)
        return TokenTable((*kept, TokenEntry(role=TokenRole.AGENT, identity=identity, token=token))), token

    def without_agent(self, name: str) -> TokenTable:
        """This table without agent `name`'s token (the same table when it has none)."""
        identity = agent_identity(name)
        return TokenTable(tuple(e for e in self.entries if e.identity != identity))


def table_path() -> Path:
    """The token table of the live control plane (its discovery file names its secrets directory),
    else `default_path()`."""
    info = discovery.read()
    if info is not None and info.secrets_dir:
        return Path(info.secrets_dir) / FILE_NAME
    return default_path()


def add_agent(name: str, path: Path | None = None) -> tuple[str, str]:
    """Give agent `name` a fresh token in the table at `path` (default `table_path()`; created with
    the built-in roles when absent), replacing any it had; return its identity and token.

    Raises:
        TokenError: a bad name, or a table that is malformed or readable by others.
    """
    target = path or table_path()
    table, token = TokenTable.load_or_create(target).with_agent(name)
    table.save(target)
    return agent_identity(name), token


def remove_agent(name: str, path: Path | None = None) -> bool:
    """Drop agent `name`'s token from the table; True when it had one.

    Raises:
        TokenError: a bad name, or a table that is malformed or readable by others.
    """
    target = path or table_path()
    table = TokenTable.load(target)
    kept = table.without_agent(name)
    if kept == table:
        return False
    kept.save(target)
    return True


class TokenFile:
    """The token table a running weaver accepts: `table` as given, read again from `path` whenever
    the file changes (an agent added or removed while the weaver runs). A file that has become
    unreadable or malformed keeps the last good table (and is logged once per change).

    Args:
        table: the table loaded at start.
        path: the file it came from; None: `table` never changes.
    """

    def __init__(self, table: TokenTable, path: Path | None = None) -> None:
        self._table = table
        self._path = path
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @property
    def table(self) -> TokenTable:
        """The current table (one `stat` of the file per call)."""
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen and self._path is not None:
            self._seen = stamp
            try:
                self._table = TokenTable.load(self._path)
            except TokenError as exc:
                log.error("keeping the previous gRPC tokens: %s", exc)
        return self._table


def parse_authorization(value: str) -> str | None:
    """The token of an `authorization: Bearer <token>` value, or None when it has another form."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME.lower() or not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A token stored alone in a 0600 file (`--token-file`).

    Raises:
        TokenError: the file is missing, empty or readable by others.
    """
    token = read_private_text(Path(path), "token file").strip()
    if not token:
        raise TokenError(f"token file {path} is empty: expected the token on one line")
    return token


def resolve_token(explicit: str | None = None) -> str | None:
    """The token a client sends: `explicit`, then TORCHLOOM_TOKEN, then the live discovery file's,
    then the operator token of the table in `$TORCHLOOM_HOME` (when this user can read it); None
    when there is none."""
    if explicit:
        return explicit
    from_env = env.get(env.TOKEN)
    if from_env:
        return from_env.strip()
    info = discovery.read()
    if info is not None and info.token:
        return info.token
    candidates = [Path(info.secrets_dir) / FILE_NAME] if info is not None and info.secrets_dir else []
    for path in (*candidates, default_path()):
        try:
            return TokenTable.load(path).token(TokenRole.OPERATOR)
        except (TokenError, KeyError):
            continue
    return None


def grpc_ca_certificates(addresses: Sequence[str] = ()) -> bytes | None:
    """The PEM CA certificates named by TORCHLOOM_GRPC_CA_FILE (a weaver serving TLS), else the CA
    of the live control plane of the discovery file when it serves TLS (`torchloom run --listen`)
    and `addresses` name its gRPC address (so a user's own CLI needs no flag), else None.

    Raises:
        TokenError: the variable names a file that cannot be read.
    """
    path = env.get(env.GRPC_CA_FILE)
    if path is None:
        info = discovery.read()
        if info is None or not info.tls_ca_file or info.grpc not in addresses:
            return None
        path = info.tls_ca_file
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TokenError(f"{env.GRPC_CA_FILE}={path!r}: cannot read it: {exc.strerror or exc}") from None
