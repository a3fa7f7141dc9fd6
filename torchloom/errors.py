"""The torchloom error hierarchy: one base, subclasses that also inherit the matching builtin."""

from __future__ import annotations


class TorchloomError(Exception):
    """Base of every error torchloom raises on purpose."""


class CommandRejected(TorchloomError, ValueError):
    """A command failed validation; nothing was applied anywhere.

    Attributes:
        key: the knob or action the error is about, when there is one.
        reason: the user-facing explanation (what was wrong and what would be right).
    """

    def __init__(self, reason: str, *, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


class JobNotFound(TorchloomError, LookupError):
    """No job of that name is known to the weaver (or none runs, or several do)."""


class WeaverUnavailable(TorchloomError, ConnectionError):
    """The weaver cannot be reached at the configured address."""


class NatsUnavailable(TorchloomError, ConnectionError):
    """The NATS server cannot be reached or could not be started."""


class NatsRefused(NatsUnavailable):
    """The NATS server answered and refused the connection's credentials ("Authorization
    Violation"): trying again with the same ones cannot help."""


class CommandTimeout(TorchloomError, TimeoutError):
    """Not every rank answered a command before the deadline."""


class Unauthenticated(TorchloomError, PermissionError):
    """The weaver refused a call: no bearer token, or one it does not know."""
