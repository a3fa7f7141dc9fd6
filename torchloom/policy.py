"""Names of the weaver's health policies: what rank health problems (dead, hung, straggling, a failed
device) trigger. The weaver applies them; the launcher and `python -m weaver` let a user choose one.
"""

from __future__ import annotations

from enum import StrEnum


class PolicyMode(StrEnum):
    """What rank health problems trigger."""

    RECONFIGURE = "reconfigure"  # checkpoint, restart on the healthy ranks, rescale the batch
    PAUSE = "pause"  # pause the job and alert
    ALERT = "alert"  # events only


def parse_mode(text: str, *, name: str) -> PolicyMode:
    """Return the policy named `text`; `name` is the option or field it came from, for the error.

    Raises:
        ValueError: `<name>='<text>' rejected: expected one of reconfigure, pause, alert`.
    """
    try:
        return PolicyMode(text)
    except ValueError:
        choices = ", ".join(m.value for m in PolicyMode)
        raise ValueError(f"{name}={text!r} rejected: expected one of {choices}") from None
