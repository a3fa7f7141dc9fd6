"""Where a message may point a rank: data paths only under the job's data roots (symlinks resolved), and
rollback targets only as checkpoint ids under the rank's own root; the threadlet config carries the
roots and the weaver's public key, refusing malformed ones by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from threadlet import roots
from threadlet.config import ThreadletConfig, from_env
from torchloom import signing


def test_paths_under_a_root_resolve(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.pt").write_bytes(b"")
    allowed = roots.parse_roots(str(tmp_path / "data"))
    assert roots.data_path(str(tmp_path / "data" / "a.pt"), allowed) == tmp_path / "data" / "a.pt"
    assert roots.data_path("a.pt", allowed, cwd=tmp_path / "data") == tmp_path / "data" / "a.pt"


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.pt", "data/../../x.pt"])
def test_paths_outside_every_root_are_refused_naming_the_roots(tmp_path: Path, path: str) -> None:
    (tmp_path / "data").mkdir()
    allowed = roots.parse_roots(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"outside the job's data roots \(.*data\).*--data-root DIR"):
        roots.data_path(path, allowed, cwd=tmp_path / "data")


def test_a_symlink_cannot_lead_outside(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.pt").write_bytes(b"")
    os.symlink(tmp_path / "secret.pt", tmp_path / "data" / "link.pt")
    with pytest.raises(ValueError, match="outside the job's data roots"):
        roots.data_path(str(tmp_path / "data" / "link.pt"), roots.parse_roots(str(tmp_path / "data")))


def test_default_root_is_the_working_directory(tmp_path: Path) -> None:
    assert roots.parse_roots(None, cwd=tmp_path) == (str(tmp_path.resolve()),)
    assert roots.parse_roots(f"a{os.pathsep}b", cwd=tmp_path) == (str(tmp_path / "a"), str(tmp_path / "b"))


def test_rollback_resolves_an_id_under_the_own_root_only(tmp_path: Path) -> None:
    path = roots.rollback_path(str(tmp_path), "job", "run", "ckpt-3")
    assert path == tmp_path / "job" / "run" / "ckpt-3"
    with pytest.raises(ValueError, match="expected ckpt-<seq>"):
        roots.rollback_path(str(tmp_path), "job", "run", "/tmp/evil")


def test_config_takes_roots_and_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = signing.Signer.generate().public_key
    monkeypatch.setenv("TORCHLOOM_WEAVER_PUBKEY", key)
    monkeypatch.setenv("TORCHLOOM_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("TORCHLOOM_VERIFY_COMMANDS", "0")
    cfg = from_env()
    assert (cfg.weaver_pubkey, cfg.data_roots, cfg.verify_commands) == (
        key,
        (str(tmp_path.resolve()),),
        False,
    )
    monkeypatch.delenv("TORCHLOOM_VERIFY_COMMANDS")
    assert from_env().verify_commands is True


def test_a_malformed_public_key_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="expected 64 hex characters"):
        ThreadletConfig(weaver_pubkey="not-a-key")


def test_run_takes_repeatable_data_roots_and_hands_ranks_the_weaver_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchloom.app.run_args import child_env, split_run_args

    monkeypatch.setenv("TORCHLOOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHLOOM_VERIFY_COMMANDS", "0")  # the launcher's own environment never leaks it
    spec = split_run_args(["--data-root", str(tmp_path / "a"), f"--data-root={tmp_path / 'b'}", "train.py"])
    assert spec.data_roots == (str(tmp_path / "a"), str(tmp_path / "b"))
    out = child_env(spec, run_id="r1", nats_url="nats://127.0.0.1:4222", grpc="127.0.0.1:1")
    assert out["TORCHLOOM_DATA_ROOTS"] == os.pathsep.join(spec.data_roots)
    key = signing.load_or_create(signing.default_key_path()).public_key
    assert out["TORCHLOOM_WEAVER_PUBKEY"] == key and "TORCHLOOM_VERIFY_COMMANDS" not in out
