"""Names of every TORCHLOOM_* environment variable, in one place.

Precedence everywhere: an explicit argument, then the variable, then the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

NATS_URL = "TORCHLOOM_NATS_URL"  # nats://127.0.0.1:4222; unset: embedded server
GRPC_ADDR = "TORCHLOOM_GRPC"  # host:port of the weaver's gRPC Control service
# The NATS credential this process connects with: an nkey seed file or a .creds file, mode 0600
# (torchloom/credentials.py). `torchloom run` hands each rank its job's threadlet credential here.
NATS_CREDS_FILE = "TORCHLOOM_NATS_CREDS_FILE"
# JetStream replicas of the weaver's streams on a NATS cluster of yours, 1 to 5 (default 1): 3 keeps
# the journal, acks and commands through the loss of one server. Ignored on the embedded server.
NATS_REPLICAS = "TORCHLOOM_NATS_REPLICAS"
TOKEN = "TORCHLOOM_TOKEN"  # bearer token for the weaver's gRPC service (torchloom/tokens.py)
GRPC_CA_FILE = "TORCHLOOM_GRPC_CA_FILE"  # PEM CA of a weaver serving gRPC over TLS (off loopback)
# PEM CA a NATS client verifies the server with (a control plane's `--listen HOST`, torchloom/tls.py):
# set, the client speaks TLS and trusts only that CA. `torchloom run` hands it to each rank.
NATS_CA_FILE = "TORCHLOOM_NATS_CA_FILE"
JOB = "TORCHLOOM_JOB"  # job name the threadlets of a run report under
RUN_ID = "TORCHLOOM_RUN_ID"  # unique per `torchloom run` launch
HOME = "TORCHLOOM_HOME"  # run-state directory; default ~/.torchloom
HEARTBEAT_INTERVAL_S = "TORCHLOOM_HEARTBEAT_INTERVAL_S"
ALLOW_FAULT_INJECTION = "TORCHLOOM_ALLOW_FAULT_INJECTION"
CHECKPOINT_DIR = "TORCHLOOM_CHECKPOINT_DIR"  # checkpoint root; default $TORCHLOOM_HOME/checkpoints
FAKE_NVML = "TORCHLOOM_FAKE_NVML"  # a FakeNvml fault spec (threadlet/nvml_fake.from_spec), for demos
REPLAY = "TORCHLOOM_REPLAY"  # JSON command list: the threadlet replays it instead of following the bus
TEST_DELIVERY_DELAY_S = "TORCHLOOM_TEST_DELIVERY_DELAY_S"  # test-only: random delay before filing
TEST_DELIVERY_SEED = "TORCHLOOM_TEST_DELIVERY_SEED"  # test-only: seed of those delays
# `torchloom agent`: the key of its OpenAI-compatible endpoint (never on the command line), then the
# variable OpenAI's own clients read.
AGENT_API_KEY = "TORCHLOOM_AGENT_API_KEY"
OPENAI_API_KEY = "OPENAI_API_KEY"
AGREEMENT = "TORCHLOOM_AGREEMENT"  # "auto" (ride DDP's all-reduce when there is one) or "gloo"
# Ranks: hold a fresh run at step 0 (paused, before the first optimizer step) for at most this many
# seconds until the weaver sends its policy's start commands; set by `torchloom run --policy`.
START_HOLD_S = "TORCHLOOM_START_HOLD_S"


_N = TypeVar("_N", int, float)


def get(name: str, default: str | None = None) -> str | None:
    """Return the variable's value, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value else default


def get_float(name: str, default: float) -> float:
    """Return the variable as a float, or `default`; a malformed value is a clear ValueError."""
    return _parsed(name, default, float, "a number")


def get_int(name: str, default: int, *, within: tuple[int, int] | None = None) -> int:
    """Return the variable as an int, or `default`; a malformed value, or one outside the inclusive
    bounds `within`, is a clear ValueError naming the variable."""
    value = _parsed(name, default, int, "a whole number")
    if within is not None and not within[0] <= value <= within[1]:
        raise ValueError(f"{name}={value} rejected: must be in [{within[0]}, {within[1]}]")
    return value


def _parsed(name: str, default: _N, parse: Callable[[str], _N], expected: str) -> _N:
    raw = get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {expected}") from None


# Restart and resume: set by the launcher's supervisor on a relaunched attempt, read by the threadlet.
RESUME_FROM = "TORCHLOOM_RESUME_FROM"  # checkpoint directory the new attempt's ranks load at attach
KNOB_OVERRIDES = "TORCHLOOM_KNOB_OVERRIDES"  # JSON object of knob values applied after that load
BASE_RUN_ID = "TORCHLOOM_BASE_RUN_ID"  # the first attempt's run id; attempts are `<base>-a<N>`

# Signed commands (docs/security.md): the weaver's signing key file, and the public key ranks verify with.
SIGNING_KEY_FILE = "TORCHLOOM_SIGNING_KEY_FILE"  # weaver: path of its Ed25519 seed (0600); default in HOME
WEAVER_PUBKEY = "TORCHLOOM_WEAVER_PUBKEY"  # ranks: the weaver's public key, 64 hex characters (not secret)
# Ranks: "0" turns signature checks off (only for a bus the user fully trusts); unset with no
# WEAVER_PUBKEY, every command is refused.
VERIFY_COMMANDS = "TORCHLOOM_VERIFY_COMMANDS"
# Ranks: the directories `data add` may read from, os.pathsep-separated; default the working directory.
DATA_ROOTS = "TORCHLOOM_DATA_ROOTS"

# The control plane `torchloom run` starts exits this many seconds after its last job ended (default 10).
CONTROLPLANE_IDLE_S = "TORCHLOOM_CONTROLPLANE_IDLE_S"
