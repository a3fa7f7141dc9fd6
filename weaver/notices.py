"""Ack notices: a rank's follow-up ack saying something went wrong with a command after it was
decided (`naming.ACK_NOTICE` in its detail, e.g. a set lr that a scheduler the threadlet was not given
overwrote). It changes no outcome; the weaver journals it as a JobEvent of the notice's kind, naming
the rank, the command and the fix, at most one per (job, rank, kind) per interval. Pure: the service
feeds acks in and announces what comes out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchloom import naming
from torchloom.messages import Ack, JobEvent

# One event per (job, rank, notice kind) at most this often; the next says how many it stands for.
NOTICE_EVENT_INTERVAL_S = 10.0
# A rank's text is cut to this many characters before it reaches the journal.
MAX_MESSAGE_CHARS = 1000
# Keys remembered at most; past it the ones no longer limiting anything are forgotten.
_MAX_KEYS = 4096


def is_notice(ack: Ack) -> bool:
    """Whether `ack` is a follow-up notice rather than the rank's answer to its command."""
    return naming.ACK_NOTICE in ack.detail


def check_notice(ack: Ack) -> str | None:
    """Why the notice `ack` carries cannot be journaled; None when it names a known kind."""
    kind = ack.detail.get(naming.ACK_NOTICE, "")
    if kind not in naming.NOTICE_KINDS:
        known = ", ".join(sorted(naming.NOTICE_KINDS))
        return f"notice kind {kind[:64]!r} is unknown (expected one of: {known})"
    return None


@dataclass(slots=True)
class Notices:
    """Turns notice acks into events, rate-limited per (job, rank, kind) by `interval_s`."""

    interval_s: float = NOTICE_EVENT_INTERVAL_S
    _last_at: dict[tuple[str, int, str], float] = field(default_factory=dict)
    _since: dict[tuple[str, int, str], int] = field(default_factory=dict)

    def note(self, ack: Ack, now: float) -> JobEvent | None:
        """Count the notice `ack` carries (its kind checked by `check_notice`) and return the event
        to journal, or None while its key is rate-limited."""
        kind = ack.detail[naming.ACK_NOTICE]
        key = (ack.job, ack.rank, kind)
        self._since[key] = self._since.get(key, 0) + 1
        if now - self._last_at.get(key, -1e18) < self.interval_s:
            return None
        if len(self._last_at) >= _MAX_KEYS:
            self._forget_before(now - self.interval_s)
        count, self._since[key] = self._since[key], 0
        self._last_at[key] = now
        text = ack.detail.get(naming.ACK_NOTICE_MESSAGE, "")[:MAX_MESSAGE_CHARS] or kind
        more = f" ({count - 1} more like it since the last report)" if count > 1 else ""
        return JobEvent(
            job=ack.job,
            run_id=ack.run_id,
            kind=kind,
            message=f"rank {ack.rank}, command seq {ack.seq} ({ack.command_id[:64]}): {text}{more}",
            time_s=now,
            command_id=ack.command_id[:64],
            attrs={
                "rank": str(ack.rank),
                "seq": str(ack.seq),
                "step": str(ack.step),
                "count": str(count),
            },
        )

    def _forget_before(self, cutoff: float) -> None:
        for key in [k for k, t in self._last_at.items() if t < cutoff]:
            del self._last_at[key]
            self._since.pop(key, None)


def msg_id(ack: Ack) -> str:
    """The Nats-Msg-Id of the event a notice ack became: a redelivered ack is journaled once."""
    kind = ack.detail.get(naming.ACK_NOTICE, "")
    return f"notice:{ack.job}:{ack.run_id}:{ack.seq}:{ack.rank}:{ack.incarnation}:{kind}"
