"""Defaults every component shares, each defined once: the command timeout, where the weaver listens
and which NATS server it expects, the gRPC service name, the health policy, and the version.
"""

from __future__ import annotations

from torchloom.policy import PolicyMode

# How long a command waits for every rank's ack when the request names no timeout (CLI --timeout,
# the client's submit and the weaver's config all start from this).
COMMAND_TIMEOUT_S = 30.0
# The weaver's gRPC Control service, as named in proto/torchloom/v1/torchloom.proto.
GRPC_SERVICE = "torchloom.v1.Control"
# Where a weaver binds its gRPC service when not told (port 0: a free one).
GRPC_BIND_ADDR = "127.0.0.1:0"
# The NATS server a standalone weaver connects to when neither --nats nor TORCHLOOM_NATS_URL is given.
NATS_URL = "nats://127.0.0.1:4222"
# What a weaver does about rank health problems unless told otherwise: only report them.
HEALTH_POLICY = PolicyMode.ALERT
# JetStream replicas of the weaver's streams: 1 (one server) up to this (`--replicas`,
# TORCHLOOM_NATS_REPLICAS); the bound is JetStream's own.
MAX_STREAM_REPLICAS = 5


def version() -> str:
    """The installed distribution's version (pyproject.toml's `version`); "0+unknown" when torchloom
    runs from a source tree that was never installed."""
    from importlib import metadata  # here: only `--version` reads it (see torchloom.__getattr__)

    try:
        return metadata.version("torchloom")
    except metadata.PackageNotFoundError:
        return "0+unknown"
