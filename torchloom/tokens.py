"""Bearer tokens of the weaver's gRPC service: which identity each token stands for, and how a client
finds its own.

Whoever starts the weaver owns the token table, a 0600 JSON file in the control plane's 0700 secrets
directory (`$TORCHLOOM_HOME/controlplane/secrets/grpc-tokens.json`), created with random tokens on
first use: the local operator ("operator:<user>@<host>"), the web UI's operator ("ui-operator") and
the launcher ("launcher"). A client sends `authorization: Bearer <token>` on every call; its token
comes from an explicit argument, then TORCHLOOM_TOKEN, then the discovery file, then the table itself
(readable only by the user who owns the control plane), so a user's own CLI needs no flags.
"""

from __future__ import annotations

import getpass
import hmac
import json
import os
import secrets
import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from torchloom import discovery, env, private_files
from torchloom.errors import TorchloomError

FILE_NAME = "grpc-tokens.json"
METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
SCHEME = "Bearer"
_TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 512


class TokenError(TorchloomError, ValueError):
    """A token file that is missing, malformed or readable by other users."""


class TokenRole(StrEnum):
    """Who a gRPC token stands for (phase-2 design, section 3)."""

    OPERATOR = "operator"
    UI_OPERATOR = "ui-operator"
    LAUNCHER = "launcher"


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
                for r in TokenRole
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
        except (ValueError, KeyError, TypeError) as exc:
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

    def identify(self, token: str) -> str | None:
        """The identity `token` stands for, or None. Every entry is compared in constant time."""
        found: str | None = None
        given = token.encode()
        for e in self.entries:
            if hmac.compare_digest(given, e.token.encode()):
                found = e.identity
        return found


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


def grpc_ca_certificates() -> bytes | None:
    """The PEM CA certificates named by TORCHLOOM_GRPC_CA_FILE (a weaver serving TLS), else None.

    Raises:
        TokenError: the variable names a file that cannot be read.
    """
    path = env.get(env.GRPC_CA_FILE)
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TokenError(f"{env.GRPC_CA_FILE}={path!r}: cannot read it: {exc.strerror or exc}") from None
