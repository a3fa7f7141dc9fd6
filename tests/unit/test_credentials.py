"""Role credentials: the permission table, inbox prefixes, private files and the rendered server block."""

from __future__ import annotations

import stat
from pathlib import Path

import bcrypt
import nkeys
import pytest

from torchloom import subjects
from torchloom.credentials import (
    ClientAuth,
    CredentialsError,
    CredentialStore,
    Role,
    inbox_prefix,
    permissions,
)
from torchloom.nats_server import EmbeddedNats, check_origin, loopback_origins
from torchloom.private_files import redact_url


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_each_role_subscribes_only_below_its_own_inbox() -> None:
    assert inbox_prefix(Role.WEAVER) == "_INBOX.weaver"
    assert inbox_prefix(Role.THREADLET, "A") == "_INBOX.threadlet.A"
    for role, job in [
        (Role.WEAVER, None),
        (Role.LAUNCHER, None),
        (Role.THREADLET, "A"),
        (Role.UI_VIEWER, None),
    ]:
        inboxes = [s for s in permissions(role, job).subscribe if s.startswith(subjects.INBOX)]
        assert inboxes == [f"{inbox_prefix(role, job)}.>"]


def test_a_threadlet_is_confined_to_its_job() -> None:
    perms = permissions(Role.THREADLET, "A")
    assert set(perms.publish) == {
        "torchloom.v1.hb.A.*",
        "torchloom.v1.metrics.A.*",
        "torchloom.v1.ack.A",
        # Acks on the capture subject of the token its job's signed commands carry (any token: the
        # acks stream stores only the weaver's).
        "torchloom.v1.wack.*.A",
        # Pull from, look at and acknowledge the consumers the weaver made; never create one.
        "$JS.API.CONSUMER.MSG.NEXT.TORCHLOOM_CMD_A.*",
        "$JS.API.CONSUMER.INFO.TORCHLOOM_CMD_A.*",
        "$JS.ACK.TORCHLOOM_CMD_A.>",
    }
    assert perms.subscribe == ("_INBOX.threadlet.A.>",)
    assert not perms.allow_responses
    assert not any("B" in s or s.endswith("CONSUMER.>") or "CREATE" in s for s in perms.publish)


def test_the_launcher_reads_only_the_journals_capture_token_of_jetstream() -> None:
    perms = permissions(Role.LAUNCHER)
    assert set(perms.publish) == {
        "torchloom.v1.wj.*.events.*",  # its events, where the journal stores them
        "torchloom.v1.events.*",  # before there is a journal stream: live only
        "$JS.API.STREAM.INFO.TORCHLOOM_JOURNAL",  # the capture token
    }
    assert not any(s.startswith("torchloom.v1.wj.*.journal") for s in perms.publish)


def test_browser_roles_never_publish_commands_and_only_the_operator_submits_and_decides() -> None:
    viewer, operator = permissions(Role.UI_VIEWER), permissions(Role.UI_OPERATOR)
    for perms in (viewer, operator):
        assert not any(s.startswith("torchloom.v1.cmd") or s == "torchloom.v1.>" for s in perms.publish)
        assert not any("DELETE" in s or "PURGE" in s for s in perms.publish)
    assert subjects.api_submit() not in viewer.publish and subjects.api_decide() not in viewer.publish
    own_feed = {subjects.api_feed(Role.UI_OPERATOR.value)}
    assert set(operator.publish) - set(viewer.publish) == {
        subjects.api_submit(),
        subjects.api_decide(),
        *own_feed,
    }
    # No JetStream request at all: the weaver makes their journal feeds (weaver/ui_feeds.py).
    for perms in (viewer, operator):
        assert not any(s.startswith(subjects.JS_API) or s.startswith("$JS.") for s in perms.publish)


@pytest.mark.parametrize(
    ("role", "job", "match"),
    [
        (Role.THREADLET, None, "belongs to one job"),
        (Role.WEAVER, "A", "not per job"),
        (Role.THREADLET, "a.b", "job"),
    ],
)
def test_a_role_and_job_that_do_not_fit_are_refused(role: Role, job: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        permissions(role, job)


def test_store_files_are_private_and_survive_a_reopen(tmp_path: Path) -> None:
    store = CredentialStore.open(tmp_path / "secrets")
    granted = store.grant_job("A")
    assert _mode(store.directory) == 0o700
    files = list(store.directory.iterdir())
    assert files and all(_mode(f) == 0o600 for f in files)
    assert granted.public_key.startswith("U")
    seed = granted.seed_file.read_text().strip().encode()
    assert nkeys.from_seed(bytearray(seed)).public_key.decode() == granted.public_key
    again = CredentialStore.open(store.directory)
    assert again.nkey_user(Role.THREADLET, "A") == granted
    assert again.password_user(Role.UI_VIEWER).password == store.password_user(Role.UI_VIEWER).password
    assert again.jobs() == ("A",)
    again.revoke_job("A")
    assert again.jobs() == ()
    with pytest.raises(CredentialsError, match="grant_job"):
        again.nkey_user(Role.THREADLET, "A")


def test_the_server_block_holds_public_keys_and_hashes_never_secrets(tmp_path: Path) -> None:
    store = CredentialStore.open(tmp_path / "secrets")
    store.grant_job("A")
    block = store.authorization_block()
    for role, job in [(Role.WEAVER, None), (Role.LAUNCHER, None), (Role.THREADLET, "A")]:
        user = store.nkey_user(role, job)
        assert user.public_key in block
        assert user.seed_file.read_text().strip() not in block
    for role in (Role.UI_VIEWER, Role.UI_OPERATOR):
        pw = store.password_user(role)
        assert pw.password not in block and pw.bcrypt_hash in block
        assert bcrypt.checkpw(pw.password.encode(), pw.bcrypt_hash.encode())
        assert pw.password not in repr(pw)
    assert block.count('allowed_connection_types: ["STANDARD"]') == 3
    assert block.count('allowed_connection_types: ["WEBSOCKET"]') == 2
    assert "no_auth_user" not in block


def test_client_auth_reads_a_seed_or_creds_file_and_refuses_a_shared_one(tmp_path: Path) -> None:
    seed = tmp_path / "a.nk"
    seed.write_text(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER).decode() + "\n")
    seed.chmod(0o600)
    auth = ClientAuth.from_file(seed, inbox_prefix="_INBOX.threadlet.A")
    assert auth.nats_options() == {"inbox_prefix": "_INBOX.threadlet.A", "nkeys_seed": str(seed)}
    creds = tmp_path / "u.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ...\n------END NATS USER JWT------\n")
    creds.chmod(0o600)
    assert ClientAuth.from_file(creds).nats_options()["user_credentials"] == str(creds)
    seed.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        ClientAuth.from_file(seed)
    junk = tmp_path / "junk"
    junk.write_text("hello")
    junk.chmod(0o600)
    with pytest.raises(CredentialsError, match="neither an nkey user seed"):
        ClientAuth.from_file(junk)
    with pytest.raises(CredentialsError, match="does not exist"):
        ClientAuth.from_file(tmp_path / "missing")


def test_urls_lose_their_credentials_in_logs() -> None:
    assert redact_url("nats://threadlet:s3cret@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://a:b@h1:1,nats://c@h2:2") == "nats://***@h1:1,nats://***@h2:2"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_origins_name_the_ui_and_nothing_else() -> None:
    assert loopback_origins(8765) == ("http://127.0.0.1:8765", "http://localhost:8765")
    with pytest.raises(ValueError, match="port"):
        loopback_origins(0)
    for bad in ("evil.example", "ftp://x", "http://x/path"):
        with pytest.raises(ValueError, match="expected http"):
            check_origin(bad)


def test_the_embedded_config_is_private_and_secured_with_credentials(tmp_path: Path) -> None:
    store = CredentialStore.open(tmp_path / "secrets")
    server = EmbeddedNats(tmp_path / "run", credentials=store)
    assert not server.websocket  # no origins given: no WebSocket listener at all
    conf = server._write_config()
    assert _mode(conf) == 0o600
    text = conf.read_text()
    assert "authorization {" in text and "websocket" not in text
    secured_ws = EmbeddedNats(tmp_path / "run2", credentials=store, allowed_origins=loopback_origins(9000))
    assert (
        'allowed_origins: ["http://127.0.0.1:9000", "http://localhost:9000"]' in secured_ws._render_config()
    )
    with pytest.raises(ValueError, match="grant_job needs"):
        EmbeddedNats(tmp_path / "open").grant_job("A")
