"""Signed commands: the weaver signs every Command with an Ed25519 key (PyNaCl), every rank verifies it
against the weaver's public key it received at launch (TORCHLOOM_WEAVER_PUBKEY), so a message that
reached a command subject without passing the weaver is never filed (docs/security.md, "Signed
commands").

Ranks verify with ed25519-zebra (Rust, via py-ed25519-zebra-bindings): standard Ed25519 under the
ZIP-215 validation rules, about a third faster than libsodium's verify on the same CPU (docs/
benchmarks.md, "Signed commands"); a signature libsodium makes always verifies, and a malformed
signature or key is simply invalid. Signing stays with libsodium, whose sign is the faster one.

The signature covers `wire.signing_bytes(command)` (the Command with `signature` empty, serialized
deterministically) behind a domain tag, so it cannot be replayed as a signature of anything else.
The weaver serializes a command once: it publishes the signed bytes followed by the signature's
record (`Signer.encode_signed`), and a rank verifies those bytes as received and parses only them
(`Verifier.decode_command`), so neither side serializes the command again.
The weaver's RestartRequests to a launcher are signed too: over the exact bytes published, behind
their own domain tag, carried in the `SIGNATURE_HEADER` NATS header; the launcher verifies them with
the same public key it hands its ranks, so a request that did not come from the weaver restarts
nothing.
The private key is a 32-byte seed stored hex-encoded in a 0600 file inside a 0700 directory; the
public key is not secret and travels as 64 hex characters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import ed25519_zebra
from nacl.signing import SigningKey

from torchloom import discovery, wire
from torchloom.errors import TorchloomError
from torchloom.messages import Command
from torchloom.private_files import check_private, write_private

# Prepended to the signed bytes: a signature over a command is valid for nothing else.
_DOMAIN = b"torchloom.v1.Command\x00"
_RESTART_DOMAIN = b"torchloom.v1.RestartRequest\x00"
SIGNATURE_HEADER = "Torchloom-Signature"  # NATS header of a signed RestartRequest: hex Ed25519
KEY_FILE_NAME = "signing.key"
_SEED_BYTES = 32
_HEX_PUBLIC_LEN = 64


class SignatureError(TorchloomError, ValueError):
    """A key that cannot be used (malformed, unreadable, readable by others)."""


def default_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where a weaver keeps its signing key unless told otherwise:
    `$TORCHLOOM_HOME/controlplane/secrets/signing.key` (of `environ`, default this process's)."""
    return discovery.home(environ) / "controlplane" / "secrets" / KEY_FILE_NAME


@dataclasses.dataclass(frozen=True, slots=True)
class Signer:
    """The weaver's side: signs commands. Build it with `Signer.generate()` or `load_or_create`."""

    _key: SigningKey

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @property
    def public_key(self) -> str:
        """The public key as 64 hex characters (what TORCHLOOM_WEAVER_PUBKEY carries)."""
        return bytes(self._key.verify_key).hex()

    def verifier(self) -> Verifier:
        return Verifier(self.public_key)

    def sign(self, cmd: Command) -> Command:
        """`cmd` with its signature set (any signature it had is replaced), for a caller that needs
        the signed Command itself; the weaver publishes `encode_signed(cmd)`."""
        return dataclasses.replace(cmd, signature=self._signature(wire.signing_bytes(cmd)))

    def encode_signed(self, cmd: Command) -> bytes:
        """`cmd` signed, as the weaver publishes it: `wire.signing_bytes(cmd)` (serialized once), then
        the record of the signature over them (`wire.append_signature`). Any protobuf parser reads
        these bytes as `sign(cmd)`; a rank verifies them without serializing again."""
        signed = wire.signing_bytes(cmd)
        return wire.append_signature(signed, self._signature(signed))

    def _signature(self, signed: bytes) -> bytes:
        return bytes(self._key.sign(_DOMAIN + signed).signature)

    def sign_restart(self, data: bytes) -> str:
        """The signature (hex, for `SIGNATURE_HEADER`) over an encoded RestartRequest, as published."""
        return bytes(self._key.sign(_RESTART_DOMAIN + data).signature).hex()

    def save(self, path: Path) -> None:
        """Write the seed to `path` (mode 0600, directory 0700), atomically; an existing file is kept
        only if it holds this same key.

        Raises:
            SignatureError: `path` exists and holds another key.
        """
        try:
            write_private(path, bytes(self._key).hex() + "\n", replace=False)
        except FileExistsError:  # another process created the key first
            if load(path).public_key != self.public_key:
                raise SignatureError(f"signing key {path} already exists and holds another key") from None


def load(path: Path) -> Signer:
    """Read a signing key written by `Signer.save`.

    Raises:
        SignatureError: the file is readable or writable by group or others, or does not hold 64 hex
            characters (a 32-byte Ed25519 seed).
        FileNotFoundError: there is no such file.
    """
    check_private(path, "signing key", error=SignatureError)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != _SEED_BYTES:
        raise SignatureError(
            f"signing key {path} is malformed: expected {2 * _SEED_BYTES} hex characters (an Ed25519 seed)"
        )
    return Signer(SigningKey(seed))


def load_or_create(path: Path | None = None) -> Signer:
    """The key at `path` (default `default_key_path()`), generated and saved there when absent.

    Raises:
        SignatureError: see `load`.
    """
    path = path if path is not None else default_key_path()
    try:
        return load(path)
    except FileNotFoundError:
        signer = Signer.generate()
        signer.save(path)
        return load(path)  # another process may have won the race: use what is on disk


@dataclasses.dataclass(frozen=True, slots=True)
class Verifier:
    """A rank's side: checks commands against the weaver's public key (64 hex characters).

    Raises:
        SignatureError: on construction, when the key is not 64 hex characters.
    """

    public_key: str
    _raw: bytes = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            raw = bytes.fromhex(self.public_key)
        except ValueError:
            raw = b""
        if len(raw) != _HEX_PUBLIC_LEN // 2:
            raise SignatureError(
                f"weaver public key {self.public_key[:80]!r} rejected: expected {_HEX_PUBLIC_LEN} hex "
                "characters (an Ed25519 public key)"
            )
        object.__setattr__(self, "_raw", raw)

    def verify_restart(self, data: bytes, signature: str | None) -> bool:
        """Whether `signature` (the `SIGNATURE_HEADER` value) is the weaver's over the bytes `data`."""
        try:
            raw = bytes.fromhex(signature or "")
        except ValueError:
            return False
        return self._ed25519(_RESTART_DOMAIN + data, raw)

    def verify(self, cmd: Command) -> bool:
        """Whether `cmd.signature` is the weaver's signature over `cmd`."""
        return bool(cmd.signature) and self._valid(wire.signing_bytes(cmd), cmd.signature)

    def decode_command(self, data: bytes) -> tuple[Command, bool]:
        """The command in `data` (bytes received on a command subject) and whether the weaver signed it.

        Bytes in the weaver's layout (`Signer.encode_signed`: signed bytes, then the signature's
        record) are verified as received and only the signed bytes are parsed. Any other layout (an
        older weaver's, another protobuf encoder's, a forgery) is parsed whole, serialized again and
        verified (`verify`), as before; so is a message whose last record only looks like a signature.

        Raises:
            wire.WireError: `data` is not a Command.
        """
        split = wire.split_signature(data)
        if split is not None:
            signed, signature = split
            if self._valid(signed, signature):
                # Sound whatever else an attacker puts in `data`: the weaver signs only the domain tag
                # plus `wire.signing_bytes` of a command it issued, so bytes this signature verifies
                # over are such a command, and the command returned is parsed from exactly those
                # bytes (a signature field inside them is overwritten by the checked one). Anything
                # prepended, appended, or cut from them changes the bytes the signature must cover, so
                # it fails here and the whole message takes the path below like any unsigned one.
                return wire.decode_signed_command(signed, signature), True
        cmd = wire.decode_command(data)
        return cmd, self.verify(cmd)

    def _valid(self, signed: bytes, signature: bytes) -> bool:
        """Whether `signature` is the weaver's over the command bytes `signed`."""
        return self._ed25519(_DOMAIN + signed, signature)

    def _ed25519(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is a valid Ed25519 signature of the weaver's key over `message`; a
        signature of the wrong length is invalid (ed25519-zebra answers False for any malformed one)."""
        return len(signature) == wire.SIGNATURE_BYTES and bool(
            ed25519_zebra.ed_verify(signature, message, self._raw)
        )
