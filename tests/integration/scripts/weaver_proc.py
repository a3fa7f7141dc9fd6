"""A weaver process for tests that kill it: `python weaver_proc.py NATS_URLS GRPC_ADDR REPLICAS`.

It runs until SIGTERM or SIGKILL (a test kills it mid-stream and starts it again on the same
gRPC address); NATS_URLS is a comma-separated list of the cluster's servers. Like `python -m weaver`,
it keeps trying a start that fails on NATS for `weaver.app.DEFAULT_START_GIVE_UP_S`.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from weaver.app import RunningWeaver, StandbyWeaver, serve_retrying
from weaver.config import WeaverConfig


def main() -> None:
    nats_urls, grpc_addr, replicas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = WeaverConfig(nats_url=nats_urls, grpc_addr=grpc_addr, replicas=replicas, nats_timeout_s=3.0)

    def ready(running: RunningWeaver | StandbyWeaver) -> None:
        print(f"weaver ready: grpc {running.grpc_address}", flush=True)

    # As `python -m weaver`: a start that fails while the cluster re-forms is tried again.
    asyncio.run(serve_retrying(config, ready=ready, handle_sigterm=True))


if __name__ == "__main__":
    main()
