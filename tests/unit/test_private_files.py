"""torchloom.private_files: the one home of private directories and files (0700 / 0600, atomic,
open-to-others refused) and of URL redaction, and every state or secret file going through it."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from torchloom import discovery, private_files, signing, tokens
from torchloom.app import runs
from torchloom.credentials import CredentialsError, CredentialStore
from torchloom.private_files import (
    PrivateFileError,
    check_private,
    private_dir,
    read_private,
    redact_url,
    write_private,
    write_private_json,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_creates_parents_0700_and_tightens_an_open_one(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "a" / "b")
    assert _mode(d) == 0o700
    d.chmod(0o755)
    private_dir(d)
    assert _mode(d) == 0o700


def test_write_private_is_0600_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "secrets" / "x.json"
    write_private_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert _mode(target) == 0o600 and _mode(target.parent) == 0o700
    write_private(target, "second\n")
    assert target.read_text() == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_write_private_without_replace_keeps_the_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "k"
    write_private(target, "first", replace=False)
    with pytest.raises(FileExistsError):
        write_private(target, "second", replace=False)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_concurrent_writers_in_one_process_never_share_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(50):
                write_private_json(target, {"writer": i})
        except BaseException as exc:  # collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text())["writer"] in range(4)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602])
def test_a_file_open_to_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    write_private(path, "s3cret")
    path.chmod(mode)
    with pytest.raises(PrivateFileError, match=f"mode {mode:04o}.*chmod 600 {path}"):
        read_private(path, "secret file")
    with pytest.raises(CredentialsError, match="credential file"):  # the caller's own error type
        check_private(path, "credential file", error=CredentialsError)


def test_read_private_reads_an_owner_only_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = write_private(tmp_path / "secret", "s3cret\n")
    assert read_private(path, "secret file") == "s3cret\n"
    with pytest.raises(PrivateFileError, match=f"secret file {tmp_path / 'gone'} does not exist"):
        read_private(tmp_path / "gone", "secret file")
    with pytest.raises(FileNotFoundError):  # check alone lets the caller tell "absent" apart
        check_private(tmp_path / "gone", "secret file")


def test_redact_url_hides_user_info_in_urls_lists_and_messages() -> None:
    assert redact_url("nats://u:p@h:4222") == "nats://***@h:4222"
    assert redact_url("nats://a:b@h1:1,nats://c@h2:2") == "nats://***@h1:1,nats://***@h2:2"
    assert redact_url("cannot reach WSS://tok@h:443/x now") == "cannot reach WSS://***@h:443/x now"
    assert redact_url("nats://127.0.0.1:4222 and mail a@b.c") == "nats://127.0.0.1:4222 and mail a@b.c"


def test_every_private_file_writer_goes_through_private_files(tmp_path: Path) -> None:
    """The discovery file, run records, the credential store, the token table and the signing key
    are 0600 in 0700 directories, and each refuses a copy opened to others."""
    info = discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://h:1", grpc="127.0.0.1:1")
    disc = discovery.write(info, tmp_path / "home" / "weaver.json")
    lease = runs.write_lease(runs.Lease(job="j", pid=os.getpid(), run_id="r"), tmp_path / "home")
    store = CredentialStore.open(tmp_path / "secrets")
    table = tokens.TokenTable.generate()
    table_path = table.save(tmp_path / "secrets" / tokens.FILE_NAME)
    key_path = tmp_path / "secrets" / signing.KEY_FILE_NAME
    signing.load_or_create(key_path)
    files = [disc, lease, table_path, key_path, *store.directory.iterdir()]
    for f in files:
        assert _mode(f) == private_files.PRIVATE_FILE_MODE, f
        assert _mode(f.parent) == private_files.PRIVATE_DIR_MODE, f.parent
    table_path.chmod(0o644)
    with pytest.raises(tokens.TokenError, match="chmod 600"):
        tokens.TokenTable.load(table_path)
    key_path.chmod(0o640)
    with pytest.raises(signing.SignatureError, match="chmod 600"):
        signing.load(key_path)
