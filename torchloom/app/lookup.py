"""How a CLI command finds the weaver it talks to: `--grpc`, then TORCHLOOM_GRPC, then the discovery
file; shared by every command so they fail with the same help when none is running."""

from __future__ import annotations

from torchloom import discovery
from torchloom.errors import WeaverUnavailable

NO_WEAVER_HELP = (
    "no weaver found: start a job with `torchloom run SCRIPT` (it starts one) or `torchloom weaver`, "
    "or point at one with --grpc HOST:PORT or TORCHLOOM_GRPC"
)


def weaver_address(grpc: str | None) -> str:
    """Return the weaver's gRPC address: `grpc`, then TORCHLOOM_GRPC, then the discovery file.

    Raises:
        WeaverUnavailable: when none is given and no live weaver wrote the discovery file.
        ValueError: when the given or environment address is not HOST:PORT.
    """
    addr = discovery.resolve_grpc(grpc)
    if addr is None:
        raise WeaverUnavailable(NO_WEAVER_HELP)
    return addr
