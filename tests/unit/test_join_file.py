"""The join file of a multi-node run (torchloom/app/join.py): a joining node refuses a file others may
read, a malformed one, an expired one and one of another job or run, each with a message naming what
was wrong and what is expected; a good one round-trips and its credentials become 0600 files."""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from pathlib import Path

import nkeys
import pytest

from torchloom.app import join
from torchloom.credentials import ClientAuth, CredentialStore, Role


def _seed() -> str:
    return nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()


def _info(**changes: object) -> join.JoinInfo:
    fields: dict[str, object] = {
        "job": "train",
        "run_id": "r1",
        "expires_at_s": time.time() + 60,
        "nats_url": "nats://127.0.0.1:4222",
        "threadlet_seed": _seed(),
        "launcher_seed": _seed(),
        "weaver_pubkey": "ab" * 32,
        "grpc": "127.0.0.1:50051",
        "grpc_token": "t0ken",
    }
    fields.update(changes)
    return join.JoinInfo(**fields)  # type: ignore[arg-type]


def test_a_written_join_file_is_private_and_reads_back(tmp_path: Path) -> None:
    info = _info()
    path = join.write(info, home=tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert join.read(path, job="train", run_id="r1") == info
    assert "t0ken" not in repr(info) and info.threadlet_seed not in repr(info)


def test_a_join_file_readable_by_others_is_refused_naming_its_mode(tmp_path: Path) -> None:
    path = join.write(_info(), home=tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(join.JoinError, match=r"has mode 0644: .*chmod 600"):
        join.read(path)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json", "is not JSON"),
        ('{"format": 1, "job": "train"}', "is not a torchloom join file"),  # before tls_ca_pem
        ('{"format": 3}', "is not a torchloom join file"),
        ('{"format": 2, "job": "train"}', "has no valid 'run_id'"),
    ],
)
def test_a_malformed_join_file_is_refused_naming_the_expected_form(
    tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "join.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(join.JoinError, match=why) as raised:
        join.read(path)
    assert '"format": 2' in str(raised.value) and "tls_ca_pem" in str(raised.value)


def test_a_bad_seed_is_refused(tmp_path: Path) -> None:
    path = join.write(_info(), home=tmp_path)
    data = json.loads(path.read_text())
    data["threadlet_seed"] = "SUnot-a-seed"
    path.write_text(json.dumps(data))
    with pytest.raises(join.JoinError, match=r"malformed 'threadlet_seed': expected an nkey user seed"):
        join.read(path)


def test_an_expired_or_foreign_join_file_is_refused(tmp_path: Path) -> None:
    old = join.write(_info(expires_at_s=time.time() - 1), home=tmp_path)
    with pytest.raises(join.JoinError, match="expired at"):
        join.read(old)
    path = join.write(_info(run_id="r2"), home=tmp_path)
    with pytest.raises(join.JoinError, match="is for job 'train', not 'other'"):
        join.read(path, job="other")
    with pytest.raises(join.JoinError, match="is for run 'r2' of job 'train', not run 'r1'"):
        join.read(path, run_id="r1")


def test_taken_credentials_are_a_secrets_directory_each_party_reads(tmp_path: Path) -> None:
    info = _info()
    directory = join.take_credentials(info, home=tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    store = CredentialStore(directory)
    launcher = store.client_auth(Role.LAUNCHER)
    ranks = store.client_auth(Role.THREADLET, "train")
    assert launcher.seed_file is not None and ranks.seed_file is not None
    assert ranks.seed_file.read_text().strip() == info.threadlet_seed
    assert ClientAuth.from_file(ranks.seed_file).seed_file == ranks.seed_file  # 0600, a seed


def test_run_join_takes_the_job_run_and_addresses_from_the_file_and_refuses_its_own(tmp_path: Path) -> None:
    from torchloom.app.health_options import UsageError
    from torchloom.app.run_args import split_run_args

    path = join.write(_info(), home=tmp_path)
    spec = split_run_args(["--join", str(path), "--nnodes", "2", "--rdzv-id", "r1", "train.py"])
    assert (spec.job, spec.run_id, spec.nats_url, spec.grpc) == (
        "train",
        "r1",
        "nats://127.0.0.1:4222",
        "127.0.0.1:50051",
    )
    assert spec.join is not None and spec.join.weaver_pubkey == "ab" * 32
    with pytest.raises(UsageError, match="drop --grpc, --nats"):
        split_run_args(["--join", str(path), "--nats", "nats://x:1", "--grpc", "127.0.0.1:1", "train.py"])
    with pytest.raises(UsageError, match="is for run 'r1' of job 'train', not run 'r9'"):
        split_run_args(["--join", str(path), "--nnodes", "2", "--rdzv-id", "r9", "train.py"])
    # --listen serves a control plane: the first node's business, and only for the embedded server.
    with pytest.raises(UsageError, match=r"--listen is for the first node .*: drop it with --join"):
        split_run_args(["--join", str(path), "--listen", "127.0.0.2", "train.py"])
    with pytest.raises(UsageError, match="--listen is for the embedded NATS server"):
        split_run_args(["--nats", "nats://127.0.0.1:4222", "--listen", "127.0.0.2", "train.py"])


def _tls_info(tmp_path: Path, **changes: object) -> join.JoinInfo:
    from torchloom import certs

    ca = certs.ensure_server_tls(tmp_path / "first-node-tls", "127.0.0.2").ca_pem()
    fields: dict[str, object] = {
        "nats_url": "tls://127.0.0.2:4222",
        "grpc": "127.0.0.2:50051",
        "tls_ca_pem": ca,
    }
    return _info(**{**fields, **changes})


def test_a_tls_join_file_carries_the_ca_which_the_joining_node_keeps_beside_its_seeds(tmp_path: Path) -> None:
    info = _tls_info(tmp_path)
    path = join.write(info, home=tmp_path)
    back = join.read(path)
    assert back == info and back.uses_tls and back.tls_ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    directory = join.take_credentials(back, home=tmp_path)
    ca = join.ca_file(directory, back)
    assert ca == directory / "ca.pem" and ca.read_text() == info.tls_ca_pem
    assert stat.S_IMODE(ca.stat().st_mode) == 0o600
    assert join.ca_file(directory, _info()) is None  # a loopback file has none
    spec_args = ["--join", str(path), "--nnodes", "2", "--rdzv-id", "r1", "train.py"]
    from torchloom.app.run_args import split_run_args

    spec = split_run_args(spec_args)
    assert (spec.nats_url, spec.grpc, spec.join_path) == (
        "tls://127.0.0.2:4222",
        "127.0.0.2:50051",
        str(path),
    )


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        (
            {"tls_ca_pem": "-----BEGIN CERTIFICATE-----\nbroken\n"},
            r"malformed 'tls_ca_pem': expected a PEM CA",
        ),
        ({"nats_url": "nats://127.0.0.2:4222"}, r"carries a CA but its nats_url .* is not tls://HOST:PORT"),
        ({"tls_ca_pem": ""}, r"names a tls:// NATS URL without 'tls_ca_pem'"),
        (
            {"tls_ca_pem": "", "nats_url": "nats://10.0.0.5:4222", "grpc": "10.0.0.5:1"},
            r"names nats_url 'nats://10.0.0.5:4222', grpc '10.0.0.5:1' without 'tls_ca_pem': off loopback",
        ),
    ],
)
def test_a_join_file_never_sends_secrets_off_loopback_in_clear(
    tmp_path: Path, changes: dict[str, object], why: str
) -> None:
    path = join.write(_tls_info(tmp_path, **changes), home=tmp_path)
    with pytest.raises(join.JoinError, match=why):
        join.read(path)
