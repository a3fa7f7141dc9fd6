"""The signed command's wire layout (issue 9, signing cost): the weaver publishes the signed bytes followed
by the signature's record, and a rank verifies the bytes as received and parses only them. Every way an
attacker could rearrange a signed message is refused or yields exactly the command the weaver signed;
other layouts (an older weaver's, another encoder's) still verify the old way."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import JOB, RUN, action, set_config
from tests.unit.test_untrusted_messages_property import _link, _mutate, _mutation
from torchloom import signing, wire
from torchloom.messages import ActionKind, Command, SetConfig

SIGNER = signing.Signer.generate()
VERIFIER = SIGNER.verifier()
SET_LR = set_config(7, lr=0.003)
COMMANDS = {
    "set lr": SET_LR,
    "8 knobs": set_config(
        7, lr=0.003, wd=0.1, betas=(0.9, 0.95), eps=1e-8, clip=1.0, batch=64, warm=True, mix="code:0.5"
    ),
    "rollback": action(7, ActionKind.ROLLBACK, checkpoint_id="ckpt-3"),
}


def _record(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf record (payloads here are under 128 bytes: one length byte)."""
    assert len(payload) < 128
    return bytes(((field << 3) | 2, len(payload))) + payload


def _received(data: bytes, signed: Command) -> str:
    """What a rank makes of `data`: "refused", or "signed" when it yields exactly `signed`."""
    try:
        cmd, verified = VERIFIER.decode_command(data)
    except wire.WireError:
        return "refused"
    if not verified:
        return "refused"
    assert cmd == signed, "a verified message yielded another command than the one signed"
    return "signed"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_published_bytes_are_the_signed_bytes_then_the_signature(name: str) -> None:
    cmd = COMMANDS[name]
    data = SIGNER.encode_signed(cmd)
    body = wire.signing_bytes(cmd)
    assert data[: len(body)] == body and data[len(body) : len(body) + 2] == b"\x3a\x40"
    assert len(data) == len(body) + wire.SIGNATURE_RECORD_LEN
    # Any protobuf parser reads them as the signed command, as the old encoding was read.
    signed = SIGNER.sign(cmd)
    assert wire.decode_command(data) == signed
    assert VERIFIER.verify(wire.decode_command(data))  # the rank's old path accepts the new layout
    assert VERIFIER.decode_command(data) == (signed, True)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_old_layout_still_verifies(name: str) -> None:
    signed = SIGNER.sign(COMMANDS[name])
    old = wire.encode(signed)  # signature (field 7) before the body (fields 10, 11)
    assert wire.split_signature(old) is None
    assert _received(old, signed) == "signed"


def test_a_string_that_ends_like_a_signature_record_takes_the_old_path() -> None:
    # ':' is 0x3a and '@' is 0x40: an older weaver's message whose last knob value ends with ":@" and
    # 64 more bytes looks like the new layout; its "signature" fails, and the whole message verifies.
    signed = SIGNER.sign(set_config(7, mix=":@" + "x" * 64))
    old = wire.encode(signed)
    assert wire.split_signature(old) is not None
    assert _received(old, signed) == "signed"


def test_extra_fields_appended_or_prepended_are_refused_or_ignored() -> None:
    signed = SIGNER.sign(SET_LR)
    data = SIGNER.encode_signed(SET_LR)
    body, record = data[: -wire.SIGNATURE_RECORD_LEN], data[-wire.SIGNATURE_RECORD_LEN :]
    other_job, other_run = _record(2, b"other"), _record(3, b"r9")
    unknown = _record(15, b"anything")
    # After the signature: the whole message is read, and its job is not the one signed.
    assert _received(data + other_job, signed) == "refused"
    assert _received(data + other_run, signed) == "refused"
    # Between the signed bytes and the signature: the signature no longer covers the bytes before it.
    assert _received(body + other_job + record, signed) == "refused"
    # Before a field the signed bytes set again, a parser keeps the later value: the signed command.
    assert _received(other_job + data, signed) == "signed"
    # Before a field the signed bytes do not carry (the issuer has no claimed identity): refused.
    issuer = _record(5, _record(3, b"root@h"))
    assert _received(issuer + data, signed) == "refused"
    # Unknown fields anywhere are never part of the applied command.
    assert _received(unknown + data, signed) == "signed"
    assert _received(data + unknown, signed) == "signed"
    assert _received(body + unknown + record, signed) == "signed"
    # A field that sets another body: the oneof ends on the appended one, which is not signed.
    rollback = wire.signing_bytes(action(7, ActionKind.ROLLBACK, checkpoint_id="ckpt-1"))
    assert _received(data + rollback, signed) == "refused"
    assert _received(rollback + data, signed) == "signed"


def test_a_signature_record_inside_another_fields_payload_is_refused() -> None:
    signed = SIGNER.sign(SET_LR)
    data = SIGNER.encode_signed(SET_LR)
    body, record = data[: -wire.SIGNATURE_RECORD_LEN], data[-wire.SIGNATURE_RECORD_LEN :]
    # The record ends the payload of an unknown field whose header follows the signed bytes: what is
    # in front of the record is not what was signed, and the whole message carries no signature.
    wrapped = body + bytes(((15 << 3) | 2, len(record))) + record
    assert wire.split_signature(wrapped) is not None
    assert _received(wrapped, signed) == "refused"
    # The same inside a string field (the job): the job changes, and no signature either.
    as_job = body + bytes(((2 << 3) | 2, len(record))) + record
    assert _received(as_job, signed) == "refused"


def test_a_truncated_prefix_is_refused() -> None:
    signed = SIGNER.sign(SET_LR)
    data = SIGNER.encode_signed(SET_LR)
    body, record = data[: -wire.SIGNATURE_RECORD_LEN], data[-wire.SIGNATURE_RECORD_LEN :]
    for cut in range(1, len(body)):
        assert _received(body[:-cut] + record, signed) == "refused", cut
        assert _received(body[cut:] + record, signed) == "refused", cut


def test_a_signature_over_another_command_or_of_another_kind_is_refused() -> None:
    signed = SIGNER.sign(SET_LR)
    body = wire.signing_bytes(SET_LR)
    other = SIGNER.encode_signed(set_config(7, lr=3.0))
    assert _received(body + other[-wire.SIGNATURE_RECORD_LEN :], signed) == "refused"
    stranger = signing.Signer.generate().encode_signed(SET_LR)  # the same command, another key
    assert _received(stranger, signed) == "refused"
    # The weaver's signature over the same bytes as a RestartRequest: the domain tags differ.
    restart = bytes.fromhex(SIGNER.sign_restart(body))
    assert _received(wire.append_signature(body, restart), signed) == "refused"
    assert _received(body, signed) == "refused"  # no signature at all


def test_field_seven_twice_yields_the_signed_command_or_nothing() -> None:
    signed = SIGNER.sign(SET_LR)
    data = SIGNER.encode_signed(SET_LR)
    record = data[-wire.SIGNATURE_RECORD_LEN :]
    junk = wire.append_signature(b"", b"\x01" * wire.SIGNATURE_BYTES)
    # A parser keeps the last signature: when it is the weaver's, the message is the signed command.
    assert _received(data + record, signed) == "signed"
    assert _received(junk + data, signed) == "signed"
    assert _received(data[: -wire.SIGNATURE_RECORD_LEN] + junk + record, signed) == "signed"
    assert _received(data + junk, signed) == "refused"
    assert _received(record + junk, signed) == "refused"


def test_the_checked_signature_replaces_any_inside_the_signed_bytes() -> None:
    sig = b"\x02" * wire.SIGNATURE_BYTES
    inner = wire.append_signature(wire.signing_bytes(SET_LR), b"\x01" * wire.SIGNATURE_BYTES)
    assert wire.decode_signed_command(inner, sig).signature == sig


def test_append_signature_names_the_expected_length() -> None:
    with pytest.raises(wire.WireError, match="64 bytes, not 3"):
        wire.append_signature(b"", b"abc")
    assert wire.split_signature(b"\x3a\x40" + b"\x00" * 64) is None  # nothing signed in front


@settings(max_examples=200, deadline=None)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_signed_bytes_never_verify_as_another_command(mutations: list[tuple[Any, ...]]) -> None:
    signed = SIGNER.sign(COMMANDS["8 knobs"])
    _received(_mutate(SIGNER.encode_signed(COMMANDS["8 knobs"]), mutations), signed)


def test_a_rank_files_the_new_layout_and_refuses_a_forgery() -> None:
    link = _link(weaver_pubkey=SIGNER.public_key)
    lax = _link(verify_commands=False)
    try:
        cmd, verified = link._decode(SIGNER.encode_signed(SET_LR))
        assert (cmd.job, cmd.run_id) == (JOB, RUN)
        assert verified and link._refusal(cmd, verified=verified) is None
        forged = (
            wire.encode(set_config(7, lr=3.0)) + SIGNER.encode_signed(SET_LR)[-wire.SIGNATURE_RECORD_LEN :]
        )
        cmd, verified = link._decode(forged)
        assert cmd.body == SetConfig(values={"lr": 3.0}) and not verified
        assert link._refusal(cmd, verified=verified) == "its signature does not match the weaver's key"
        # Told not to verify, a rank decodes without checking and files what it got.
        cmd, verified = lax._decode(forged)
        assert not verified and lax._refusal(cmd, verified=verified) is None
    finally:
        link.close()
        lax.close()
