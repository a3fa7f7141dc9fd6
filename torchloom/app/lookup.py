"""How a CLI command finds the weaver it talks to: `--grpc`, then TORCHLOOM_GRPC, then the discovery
file and the announcements of weavers started on their own (an active one and its standbys: the client
moves on from a standby to the one that serves); shared by every command so they fail with the same
help when none is running."""

from __future__ import annotations

from torchloom import discovery
from torchloom.errors import WeaverUnavailable

NO_WEAVER_HELP = (
    "no weaver found: start a job with `torchloom run SCRIPT` (it starts one), `torchloom weaver` or "
    "`python -m weaver`, "
    "or point at one with --grpc HOST:PORT or TORCHLOOM_GRPC"
)


def weaver_address(grpc: str | None) -> str:
    """Return the weaver's gRPC address: `grpc`, then TORCHLOOM_GRPC, then the live weavers of
    `$TORCHLOOM_HOME` (`discovery.resolve_grpc`: possibly several, comma-separated).

    Raises:
        WeaverUnavailable: when none is given and no live weaver announced itself.
        ValueError: when the given or environment address is not HOST:PORT.
    """
    addr = discovery.resolve_grpc(grpc)
    if addr is None:
        raise WeaverUnavailable(NO_WEAVER_HELP)
    return addr
