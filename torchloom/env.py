"""Names of every TORCHLOOM_* environment variable, in one place.

Precedence everywhere: an explicit argument, then the variable, then the default.
"""

from __future__ import annotations

import os

NATS_URL = "TORCHLOOM_NATS_URL"  # nats://127.0.0.1:4222; unset: embedded server
GRPC_ADDR = "TORCHLOOM_GRPC"  # host:port of the weaver's gRPC Control service
JOB = "TORCHLOOM_JOB"  # job name the threadlets of a run report under
RUN_ID = "TORCHLOOM_RUN_ID"  # unique per `torchloom run` launch
HOME = "TORCHLOOM_HOME"  # run-state directory; default ~/.torchloom
HEARTBEAT_INTERVAL_S = "TORCHLOOM_HEARTBEAT_INTERVAL_S"
ALLOW_FAULT_INJECTION = "TORCHLOOM_ALLOW_FAULT_INJECTION"


def get(name: str, default: str | None = None) -> str | None:
    """Return the variable's value, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value else default


def get_float(name: str, default: float) -> float:
    """Return the variable as a float, or `default`; a malformed value is a clear ValueError."""
    raw = get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
