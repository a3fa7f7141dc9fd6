"""NATS credentials per role and the permission table the embedded nats-server enforces.

Programs (weaver, launcher, each job's threadlets) authenticate with an nkey: the server holds only
the public key, the seed stays in a 0600 file of a 0700 secrets directory and reaches a rank as a file
path (TORCHLOOM_NATS_CREDS_FILE), never on argv or in a URL. Browser roles (UI viewer, UI operator)
use a password that the server config holds bcrypt-hashed. Every role gets its own inbox prefix and
may subscribe only there, so nobody reads another client's replies. docs/security.md has the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import bcrypt
import nkeys

from torchloom import discovery, subjects, tls
from torchloom.errors import TorchloomError
from torchloom.private_files import private_dir, read_private, write_private, write_private_json

# Where the control plane keeps secrets, under $TORCHLOOM_HOME (docs/security.md).
SECRETS_SUBDIR = Path("controlplane") / "secrets"
SEED_SUFFIX = ".nk"
PASSWORD_SUFFIX = ".password.json"
_BCRYPT_ROUNDS = 11  # nats-server verifies on every browser connect; 11 is its `nats server passwd` default
_CREDS_JWT_MARK = "-----BEGIN NATS USER JWT-----"


class CredentialsError(TorchloomError, ValueError):
    """A credential file is missing, malformed or readable by other users."""


class Role(StrEnum):
    """Who a NATS client is; each role has one row in the permission table."""

    WEAVER = "weaver"
    LAUNCHER = "launcher"
    THREADLET = "threadlet"  # always of one job
    UI_VIEWER = "ui-viewer"
    UI_OPERATOR = "ui-operator"


NKEY_ROLES = (Role.WEAVER, Role.LAUNCHER, Role.THREADLET)
BROWSER_ROLES = (Role.UI_VIEWER, Role.UI_OPERATOR)


@dataclass(frozen=True, kw_only=True, slots=True)
class Permissions:
    """What one NATS user may do; anything not listed is refused by the server.

    Attributes:
        publish: subjects (with wildcards) the user may publish to.
        subscribe: subjects the user may subscribe to.
        allow_responses: may also publish one reply to the reply subject of a message it received
            (request-reply answers, JetStream flow-control replies) without naming that subject.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def _check_job(role: Role, job: str | None) -> str | None:
    if role is Role.THREADLET:
        if job is None:
            raise ValueError("a threadlet credential belongs to one job: pass job=NAME")
        return subjects.check_token("job", job)
    if job is not None:
        raise ValueError(f"role {role.value} is not per job: pass job=None (got {job!r})")
    return None


def inbox_prefix(role: Role, job: str | None = None) -> str:
    """The inbox prefix a client of `role` must use (nats-py `inbox_prefix`, nats.js `inboxPrefix`)."""
    checked = _check_job(role, job)
    return (
        subjects.inbox_prefix(role.value) if checked is None else subjects.inbox_prefix(role.value, checked)
    )


def _js_api(*tokens: str) -> str:
    return ".".join((subjects.JS_API, *tokens))


def permissions(role: Role, job: str | None = None) -> Permissions:
    """The permission table row of `role` (of `job` for a threadlet); docs/security.md mirrors it."""
    checked = _check_job(role, job)
    inbox = f"{inbox_prefix(role, checked)}.>"
    if role is Role.WEAVER:
        return Permissions(
            publish=(f"{subjects.PREFIX}.>", _js_api(">"), "$JS.ACK.>", "$JS.FC.>", "$KV.>"),
            subscribe=(f"{subjects.PREFIX}.>", inbox),
            allow_responses=True,
        )
    if role is Role.LAUNCHER:
        return Permissions(
            # Its events where the journal stores them (the capture subject, whose token it reads
            # from the journal stream's info) and, while there is no journal, where watchers see them.
            publish=(
                subjects.event_captures_all(),
                subjects.events_all(),
                _js_api("STREAM", "INFO", subjects.STREAM_JOURNAL),
            ),
            subscribe=(subjects.launcher_all(), subjects.heartbeats_all(), inbox),
            allow_responses=True,
        )
    if role is Role.THREADLET:
        assert checked is not None  # _check_job demands a job for threadlets
        stream = subjects.stream_commands_of(checked)
        return Permissions(
            publish=(
                subjects.heartbeats_of(checked),
                subjects.metrics_of(checked),
                # Acks on the capture subject the job's signed commands name (stored), refusals of
                # unverified commands on the public one (taken live by the weaver, stored nowhere).
                subjects.ack_captures_of(checked),
                subjects.acks(checked),
                # Pull (and look at, and acknowledge) the consumers the weaver made on the job's own
                # command stream, one per rank process; never create one, whose delivery subject
                # nats-server would not check against these permissions.
                _js_api("CONSUMER", "MSG", "NEXT", stream, "*"),
                _js_api("CONSUMER", "INFO", stream, "*"),
                f"$JS.ACK.{stream}.>",
            ),
            subscribe=(inbox,),
        )
    # Browser roles make no JetStream request at all: the page asks the weaver for a journal feed
    # (`api_feed`), which the weaver delivers to the role's own inbox (weaver/ui_feeds.py). A
    # consumer the page made would deliver where the page chose, which nats-server does not check.
    viewer_publish = (subjects.api_status(), subjects.api_feed(role.value))
    viewer_subscribe = (
        subjects.heartbeats_all(),
        subjects.metrics_all(),
        subjects.events_all(),
        subjects.journal_all(),
        subjects.acks_all(),
        inbox,
    )
    if role is Role.UI_VIEWER:
        return Permissions(publish=viewer_publish, subscribe=viewer_subscribe)
    return Permissions(
        publish=(subjects.api_submit(), subjects.api_decide(), *viewer_publish), subscribe=viewer_subscribe
    )


def _read_private(path: Path) -> str:
    """Read a secret file, refusing one that other users may read."""
    return read_private(path, "credential file", error=CredentialsError)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientAuth:
    """How one NATS client authenticates; `bus.connect(credentials=...)` takes it.

    Attributes:
        inbox_prefix: the client's inbox prefix (its role's, so the server lets it read its replies).
        seed_file: a file holding an nkey seed (SU...), or None.
        creds_file: a `.creds` file (user JWT and seed, for operator-mode servers), or None.
        tls_ca_file: the PEM CA the server's certificate must verify against (a control plane
            listening off loopback, torchloom/tls.py): the client then speaks TLS and trusts only
            that CA; None: plain NATS (or the system's CAs for a `tls://` URL).
    """

    inbox_prefix: str = "_INBOX"
    seed_file: Path | None = None
    creds_file: Path | None = None
    tls_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if self.seed_file is not None and self.creds_file is not None:
            raise ValueError("pass seed_file or creds_file, not both")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, inbox_prefix: str = "_INBOX") -> ClientAuth:
        """Read `path` (an nkey seed file or a `.creds` file, mode 0600) and say which it is.

        Raises:
            CredentialsError: when the file is missing, readable by others, or neither form.
        """
        p = Path(path)
        text = _read_private(p)
        if _CREDS_JWT_MARK in text:
            return cls(inbox_prefix=inbox_prefix, creds_file=p)
        if text.strip().startswith("SU"):
            return cls(inbox_prefix=inbox_prefix, seed_file=p)
        raise CredentialsError(
            f"credential file {p} is neither an nkey user seed (one line starting with SU) nor a "
            f".creds file (with {_CREDS_JWT_MARK})"
        )

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (the secret stays in its file until connect reads it)."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        if self.seed_file is not None:
            options["nkeys_seed"] = str(self.seed_file)
        if self.creds_file is not None:
            options["user_credentials"] = str(self.creds_file)
        if self.tls_ca_file is not None:
            # nats-py checks the certificate against the URL's host (the address it listens on).
            options["tls"] = tls.client_context(ca_file=self.tls_ca_file)
        return options


@dataclass(frozen=True, kw_only=True, slots=True)
class NkeyUser:
    """A program's identity: the public key goes into the server config, the seed stays in its file."""

    role: Role
    job: str | None
    public_key: str
    seed_file: Path

    def client_auth(self) -> ClientAuth:
        return ClientAuth(inbox_prefix=inbox_prefix(self.role, self.job), seed_file=self.seed_file)


@dataclass(frozen=True, kw_only=True, slots=True)
class PasswordUser:
    """A browser role: user name and password for the page; the config holds only the bcrypt hash."""

    role: Role
    user: str
    password: str
    bcrypt_hash: str

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"PasswordUser(role={self.role.value!r}, user={self.user!r}, password='***')"


def _quote(value: str) -> str:
    # nats-server's config strings accept JSON escapes; a quoted "$2b$..." is not a variable.
    return json.dumps(value)


def _quoted_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def _render_user(identity: str, perms: Permissions, connection_type: str) -> str:
    allow_responses = "\n      allow_responses: true" if perms.allow_responses else ""
    return (
        "  {\n"
        f"    {identity}\n"
        "    permissions: {\n"
        f"      publish: {{ allow: {_quoted_list(perms.publish)} }}\n"
        f"      subscribe: {{ allow: {_quoted_list(perms.subscribe)} }}{allow_responses}\n"
        "    }\n"
        f'    allowed_connection_types: ["{connection_type}"]\n'
        "  }\n"
    )


class CredentialStore:
    """The control plane's NATS secrets: one nkey per program role (one per job for threadlets) and
    a password per browser role, each a 0600 file in a 0700 directory.

    Args:
        directory: the secrets directory (default: $TORCHLOOM_HOME/controlplane/secrets).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else discovery.home() / SECRETS_SUBDIR

    @classmethod
    def open(cls, directory: str | os.PathLike[str] | None = None) -> CredentialStore:
        """Open (creating when missing) the store with the weaver, launcher and browser credentials."""
        store = cls(directory)
        private_dir(store.directory)
        for role in (Role.WEAVER, Role.LAUNCHER):
            store._ensure_nkey(role, None)
        for role in BROWSER_ROLES:
            store.password_user(role)
        return store

    def _seed_path(self, role: Role, job: str | None) -> Path:
        name = role.value if job is None else f"{role.value}-{job}"
        return self.directory / f"{name}{SEED_SUFFIX}"

    def _load_nkey(self, role: Role, job: str | None, path: Path) -> NkeyUser:
        seed = _read_private(path).strip().encode()
        try:
            public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        except Exception as exc:  # nkeys raises its own error types for every malformed seed
            raise CredentialsError(f"{path} holds no valid nkey seed: {type(exc).__name__}") from None
        return NkeyUser(role=role, job=job, public_key=public, seed_file=path)

    def _ensure_nkey(self, role: Role, job: str | None) -> NkeyUser:
        job = _check_job(role, job)
        path = self._seed_path(role, job)
        if not path.exists():
            seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
            write_private(path, seed + "\n")
        return self._load_nkey(role, job, path)

    def nkey_user(self, role: Role, job: str | None = None) -> NkeyUser:
        """The existing nkey identity of `role` (of `job` for a threadlet).

        Raises:
            CredentialsError: when it was never created (a threadlet's job was never granted).
        """
        job = _check_job(role, job)
        path = self._seed_path(role, job)
        if not path.exists():
            hint = (
                f"grant_job({job!r}) first" if job is not None else "open the store with CredentialStore.open"
            )
            raise CredentialsError(f"no {role.value} credential in {self.directory}: {hint}")
        return self._load_nkey(role, job, path)

    def grant_job(self, job: str) -> NkeyUser:
        """Mint (or return) the threadlet credential of `job`; reload the server to apply it."""
        return self._ensure_nkey(Role.THREADLET, job)

    def revoke_job(self, job: str) -> None:
        """Forget the threadlet credential of `job`; reload the server to apply it."""
        with contextlib.suppress(FileNotFoundError):
            self._seed_path(Role.THREADLET, subjects.check_token("job", job)).unlink()

    def jobs(self) -> tuple[str, ...]:
        """The jobs that hold a threadlet credential, sorted."""
        prefix = f"{Role.THREADLET.value}-"
        names = (p.name.removesuffix(SEED_SUFFIX) for p in self.directory.glob(f"{prefix}*{SEED_SUFFIX}"))
        return tuple(sorted(n.removeprefix(prefix) for n in names))

    def password_user(self, role: Role) -> PasswordUser:
        """The browser credential of `role`, created with a random password on first use."""
        if role not in BROWSER_ROLES:
            raise ValueError(f"role {role.value} uses an nkey, not a password: use nkey_user")
        path = self.directory / f"{role.value}{PASSWORD_SUFFIX}"
        if path.exists():
            data = json.loads(_read_private(path))
            return PasswordUser(
                role=role, user=data["user"], password=data["password"], bcrypt_hash=data["bcrypt"]
            )
        password = secrets.token_urlsafe(24)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=_BCRYPT_ROUNDS)).decode()
        data = {"user": role.value, "password": password, "bcrypt": hashed}
        write_private_json(path, data)
        return PasswordUser(role=role, user=role.value, password=password, bcrypt_hash=hashed)

    def client_auth(self, role: Role, job: str | None = None) -> ClientAuth:
        """Connect options source for a program role (browser roles connect from the page)."""
        return self.nkey_user(role, job).client_auth()

    def _nkey_users(self) -> Iterator[NkeyUser]:
        yield self.nkey_user(Role.WEAVER)
        yield self.nkey_user(Role.LAUNCHER)
        for job in self.jobs():
            yield self.nkey_user(Role.THREADLET, job)

    def authorization_block(self) -> str:
        """The `authorization { users = [...] }` block: every current identity with its permissions.

        Program roles may connect over plain NATS only, browser roles over WebSocket only; a client
        with no credential is refused (there is no `no_auth_user`).
        """
        users = [
            _render_user(f"nkey: {_quote(u.public_key)}", permissions(u.role, u.job), "STANDARD")
            for u in self._nkey_users()
        ]
        for role in BROWSER_ROLES:
            p = self.password_user(role)
            identity = f"user: {_quote(p.user)}\n    password: {_quote(p.bcrypt_hash)}"
            users.append(_render_user(identity, permissions(role), "WEBSOCKET"))
        return "authorization {\n  users = [\n" + "".join(users) + "  ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m torchloom.credentials DIR [--job J]...`: create (or reuse) the secrets in DIR and
    print the `authorization` block for a nats-server you run yourself (deploy/README.md)."""
    parser = argparse.ArgumentParser(
        prog="python -m torchloom.credentials",
        description="Generate torchloom's NATS role credentials and print the server's users block.",
    )
    parser.add_argument("directory", type=Path, help="secrets directory (created 0700; seeds stay here)")
    parser.add_argument("--job", action="append", default=[], help="a job whose threadlets get a credential")
    args = parser.parse_args(argv)
    store = CredentialStore.open(args.directory)
    for job in args.job:
        store.grant_job(job)
    sys.stdout.write(store.authorization_block())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
