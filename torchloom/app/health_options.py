"""The rank-health options of `torchloom run` and of the control plane it starts (`--hung-after`,
`--straggler-factor`, `--health-policy`), checked and turned into WeaverConfig settings. A module of
its own so the control plane's entry point imports these without the whole launcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torchloom.policy import PolicyMode, parse_mode


class UsageError(ValueError):
    """A `torchloom run` command line that cannot be split into torchrun options and a script."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthOptions:
    """Rank-health thresholds for a weaver started here; None keeps WeaverConfig's default.

    Attributes:
        hung_after_s: `--hung-after`: a running rank whose step has not moved this long is hung.
        straggler_factor: `--straggler-factor`: step time above this multiple of the median.
        health_policy: `--health-policy`: reconfigure, pause or alert.
    """

    hung_after_s: float | None = None
    straggler_factor: float | None = None
    health_policy: PolicyMode | None = None

    def config_kwargs(self) -> dict[str, Any]:
        """The WeaverConfig keyword arguments these options set."""
        out: dict[str, Any] = {}
        if self.hung_after_s is not None:
            out["hung_after_s"] = self.hung_after_s
        if self.straggler_factor is not None:
            out["straggler_factor"] = self.straggler_factor
        if self.health_policy is not None:
            out["health_policy"] = self.health_policy
        return out

    def argv(self) -> list[str]:
        """These options as command-line words (for the control plane `torchloom run` starts)."""
        out: list[str] = []
        if self.hung_after_s is not None:
            out += ["--hung-after", repr(self.hung_after_s)]
        if self.straggler_factor is not None:
            out += ["--straggler-factor", repr(self.straggler_factor)]
        if self.health_policy is not None:
            out += ["--health-policy", str(self.health_policy)]
        return out


def parse_health(
    hung_after: str | None, straggler_factor: str | None, health_policy: str | None
) -> HealthOptions:
    """Check the health options' text and return them.

    Raises:
        UsageError: naming the bound or the expected values.
    """

    def number(name: str, text: str | None, low: float, high: float) -> float | None:
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise UsageError(f"{name} {text!r} rejected: must be a number in ({low:g}, {high:g}]")
        return value

    try:
        policy = None if health_policy is None else parse_mode(health_policy, name="--health-policy")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return HealthOptions(
        hung_after_s=number("--hung-after", hung_after, 0.0, 24 * 3600.0),
        straggler_factor=number("--straggler-factor", straggler_factor, 1.0, 1000.0),
        health_policy=policy,
    )
