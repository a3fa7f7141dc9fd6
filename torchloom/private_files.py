"""One home for private files: 0700 directories, 0600 files written atomically, secret files refused
when group or others may use them, and URLs with their `user:pass@` redacted for logs and errors.

The discovery file, the run records and leases, the NATS credentials and server config, the gRPC
token table and the command signing key are all written and read through here (docs/security.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from torchloom.errors import TorchloomError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^@/,\s]*@")


class PrivateFileError(TorchloomError, ValueError):
    """A secret file that is missing, unreadable, or open to other users."""


def redact_url(text: str) -> str:
    """`text` (a URL, a comma-separated list of them, or a message holding some) with the
    `user:pass@` part of every URL replaced by `***@`."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) and make it 0700; return it.

    Only a directory this user owns is tightened; another user's directory is left as it is (the
    files written into it are still 0600).
    """
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
            path.chmod(PRIVATE_DIR_MODE)
    return path


def write_private(target: Path, text: str, *, replace: bool = True) -> Path:
    """Write `text` to `target` atomically (a 0600 temp file, then a rename) in a 0700 directory.

    Args:
        replace: False to keep an existing `target` (the write then raises FileExistsError), so two
            processes creating the same key never overwrite each other's.

    Returns:
        `target`.

    Raises:
        FileExistsError: `replace` is False and `target` exists.
    """
    private_dir(target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails when the target exists, unlike a rename
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def write_private_json(target: Path, data: Any) -> Path:
    """`write_private` of `data` as indented JSON; returns `target`."""
    return write_private(target, json.dumps(data, indent=2) + "\n")


def check_private(path: Path, what: str, *, error: type[Exception] = PrivateFileError) -> None:
    """Refuse a secret file that group or others may read, write or execute.

    Args:
        what: how the message names the file ("signing key", "credential file", ...).
        error: the exception type to raise (the caller's own `TorchloomError` subclass).

    Raises:
        FileNotFoundError: there is no such file.
        error: the file is open to other users; the message says how to fix it.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _OPEN_TO_OTHERS:
        raise error(
            f"{what} {path} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {path})"
        )


def read_private(path: Path, what: str, *, error: type[Exception] = PrivateFileError) -> str:
    """The text of a secret file, after `check_private`.

    Raises:
        error: the file is missing, unreadable or open to other users.
    """
    try:
        check_private(path, what, error=error)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"cannot read {what} {path}: {why}") from None
