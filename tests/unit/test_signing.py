"""Signed commands: a signature verifies only for the exact command the weaver signed, with its key; key
files are private (0600 in a 0700 directory) and malformed or shared ones are refused by name."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from torchloom import signing, wire
from torchloom.messages import Action, ActionKind, Command, Issuer, RestartRequest, SetConfig


def _command(**kw: object) -> Command:
    fields: dict[str, object] = {
        "command_id": "c1",
        "job": "j",
        "run_id": "r1",
        "seq": 3,
        "issuer": Issuer(kind="cli", identity="u@h"),
        "issued_at_s": 1.5,
        "body": SetConfig(values={"lr": 0.01, "betas": (0.9, 0.99), "mix": "a:1"}),
    }
    fields.update(kw)
    return Command(**fields)  # type: ignore[arg-type]


def test_signed_command_verifies_and_survives_the_wire() -> None:
    signer = signing.Signer.generate()
    signed = signer.sign(_command())
    assert len(signed.signature) == 64
    back = wire.decode_command(wire.encode(signed))
    assert signer.verifier().verify(back)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 4},
        {"job": "k"},
        {"run_id": "r2"},
        {"command_id": "c2"},
        {"issuer": Issuer(kind="ui", identity="u@h")},
        {"issued_at_s": 2.0},
        {"body": SetConfig(values={"lr": 0.02, "betas": (0.9, 0.99), "mix": "a:1"})},
        {"body": Action(kind=ActionKind.ROLLBACK, args={"checkpoint_id": "ckpt-1"})},
    ],
)
def test_any_change_breaks_the_signature(change: dict[str, object]) -> None:
    signer = signing.Signer.generate()
    forged = dataclasses.replace(signer.sign(_command()), **change)  # type: ignore[arg-type]
    assert not signer.verifier().verify(forged)


def test_unsigned_or_foreign_signatures_are_refused() -> None:
    ours, theirs = signing.Signer.generate(), signing.Signer.generate()
    cmd = _command()
    assert not ours.verifier().verify(cmd)
    assert not ours.verifier().verify(theirs.sign(cmd))
    assert not ours.verifier().verify(dataclasses.replace(cmd, signature=b"\x00" * 64))
    assert not ours.verifier().verify(dataclasses.replace(cmd, signature=b"short"))


def test_map_order_does_not_matter() -> None:
    signer = signing.Signer.generate()
    a = _command(body=SetConfig(values={"lr": 0.1, "momentum": 0.9}))
    b = _command(body=SetConfig(values={"momentum": 0.9, "lr": 0.1}))
    assert signer.verifier().verify(dataclasses.replace(b, signature=signer.sign(a).signature))


def test_key_file_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "signing.key"
    first = signing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert signing.load_or_create(path).public_key == first.public_key
    assert len(first.public_key) == 64


def test_shared_or_malformed_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    signing.Signer.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(signing.SignatureError, match="chmod 600"):
        signing.load(path)
    os.chmod(path, 0o600)
    path.write_text("not hex\n")
    with pytest.raises(signing.SignatureError, match="64 hex characters"):
        signing.load(path)


def test_a_malformed_public_key_is_refused_naming_the_form() -> None:
    with pytest.raises(signing.SignatureError, match="expected 64 hex characters"):
        signing.Verifier("abc")


def test_default_key_path_is_under_home(tmp_path: Path) -> None:
    path = signing.default_key_path({"TORCHLOOM_HOME": str(tmp_path)})
    assert path == tmp_path / "controlplane" / "secrets" / "signing.key"


def test_restart_requests_are_signed_over_their_exact_bytes() -> None:
    signer = signing.Signer.generate()
    data = wire.encode(RestartRequest(job="j", run_id="r", world_size=1, reason="rank 1 dead"))
    sig = signer.sign_restart(data)
    verifier = signer.verifier()
    assert verifier.verify_restart(data, sig)
    assert not verifier.verify_restart(data + b"\x00", sig)  # other bytes
    assert not verifier.verify_restart(data, None) and not verifier.verify_restart(data, "zz")
    assert not signing.Signer.generate().verifier().verify_restart(data, sig)  # another key


def test_the_ranks_verifier_agrees_with_libsodium_and_refuses_every_altered_signature() -> None:
    """Ranks verify with ed25519-zebra, the weaver signs with libsodium: a libsodium signature
    verifies, and any flipped bit in it, a non-canonical scalar (s + L, the malleated twin libsodium
    refuses too), or another key (or bytes that are no curve point) fails as a plain "not signed"."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    signer = signing.Signer.generate()
    cmd = _command()
    signed = signer.sign(cmd)
    verifier = signer.verifier()
    assert verifier.verify(signed)
    sig = signed.signature
    libsodium = VerifyKey(bytes.fromhex(signer.public_key))
    for bit in range(0, 512, 7):
        bad = bytearray(sig)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not verifier.verify(dataclasses.replace(cmd, signature=bytes(bad)))
    order = 2**252 + 27742317777372353535851937790883648493  # the group order L
    s = int.from_bytes(sig[32:], "little")
    malleated = sig[:32] + (s + order).to_bytes(32, "little")
    assert not verifier.verify(dataclasses.replace(cmd, signature=malleated))
    with pytest.raises(BadSignatureError):
        libsodium.verify(b"torchloom.v1.Command\x00" + wire.signing_bytes(cmd), malleated)
    for public in ("00" * 32, "ff" * 32):  # not the weaver's key; not a point at all
        assert not signing.Verifier(public).verify(signed)
