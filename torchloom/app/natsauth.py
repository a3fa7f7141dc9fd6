"""How each party of a run authenticates to NATS (docs/security.md, NATS roles).

The embedded server enforces the role table of torchloom/credentials.py with the control plane's
credential store: the control plane (and its weaver) connects as the weaver role, `torchloom run`'s
supervisor as the launcher, each job's ranks with their job's threadlet credential, which the control
plane mints when the job's first lease appears and withdraws when its last one ends. A user's own
server (`--nats URL`) takes what the user gives with `--nats-creds PATH`: a torchloom secrets
directory (`python -m torchloom.credentials DIR --job J`, each party then uses its role's credential)
or one credential file that every party uses, each under its role's inbox prefix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torchloom.credentials import ClientAuth, CredentialsError, CredentialStore, Role, inbox_prefix
from torchloom.errors import NatsUnavailable
from torchloom.nats_server import EmbeddedNats

log = logging.getLogger(__name__)


def given_auth(path: str | os.PathLike[str], role: Role, job: str | None = None) -> ClientAuth:
    """The credential `role` (of `job` for a threadlet) connects with, from `--nats-creds PATH`.

    Raises:
        CredentialsError: PATH is missing, readable by others, or holds no credential for the role.
    """
    p = Path(path)
    if p.is_dir():
        return CredentialStore(p).client_auth(role, job)
    return ClientAuth.from_file(p, inbox_prefix=inbox_prefix(role, job))


def given_rank_file(path: str | os.PathLike[str], job: str) -> Path:
    """The file the ranks of `job` read their credential from (TORCHLOOM_NATS_CREDS_FILE), from
    `--nats-creds PATH`; checked here so a bad one fails the launch, not every rank.

    Raises:
        CredentialsError: as `given_auth`.
    """
    auth = given_auth(path, Role.THREADLET, job)
    found = auth.seed_file or auth.creds_file
    assert found is not None  # from_file and the store always name the file
    return found


class StoreAccess:
    """The embedded server secured by the control plane's credential store (the default).

    Args:
        store: the credential store (`CredentialStore.open()` under $TORCHLOOM_HOME).
    """

    def __init__(self, store: CredentialStore) -> None:
        self.store = store
        self._server: EmbeddedNats | None = None

    @property
    def secrets_dir(self) -> Path | None:
        return self.store.directory

    def prepare(self, server: EmbeddedNats) -> None:
        """Make `server` enforce the role table (its WebSocket origins are the control plane's choice)."""
        server.credentials = self.store
        self._server = server

    def client_auth(self, role: Role) -> ClientAuth | None:
        return self.store.client_auth(role)

    def granted(self) -> tuple[str, ...]:
        return self.store.jobs()

    def job_added(self, job: str) -> None:
        """Mint the job's threadlet credential and apply it to the running server."""
        self.store.grant_job(job)
        self._reload(f"granted job {job}")

    def job_removed(self, job: str) -> None:
        """Withdraw the job's threadlet credential: its ranks (all ended) can no longer connect."""
        self.store.revoke_job(job)
        self._reload(f"revoked job {job}")

    def _reload(self, what: str) -> None:
        server = self._server
        if server is None or not server.running():
            return  # the next start (or supervised restart) writes the config with it
        try:
            server.reload()
        except NatsUnavailable as exc:  # died meanwhile: its restart renders the store as it is now
            log.warning("%s, but nats-server did not reload: %s", what, exc)


class OpenAccess:
    """No NATS authentication: the embedded server on loopback accepts any local client (only for a
    test that says it needs an open server, or a user's own NATS that takes anonymous clients)."""

    @property
    def secrets_dir(self) -> Path | None:
        return None

    def prepare(self, server: EmbeddedNats) -> None:
        return None

    def client_auth(self, role: Role) -> ClientAuth | None:
        return None

    def granted(self) -> tuple[str, ...]:
        return ()

    def job_added(self, job: str) -> None:
        return None

    def job_removed(self, job: str) -> None:
        return None


class GivenAccess(OpenAccess):
    """A user's own NATS server with the credential(s) given by `--nats-creds PATH` (the user
    manages that server's users: nothing is granted or withdrawn here)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        given_auth(self.path, Role.WEAVER)  # a bad PATH fails now, naming the file

    def client_auth(self, role: Role) -> ClientAuth | None:
        return given_auth(self.path, role)


def store_of(secrets_dir: str) -> CredentialStore | None:
    """The credential store a control plane keeps in `secrets_dir` ("" or no weaver key: none)."""
    if not secrets_dir:
        return None
    store = CredentialStore(secrets_dir)
    try:
        store.nkey_user(Role.WEAVER)
    except CredentialsError:
        return None
    return store
