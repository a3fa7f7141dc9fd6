"""The I/O side of the CLI's interactive-training commands: action bodies, the one-job lookups behind
knobs/checkpoints/branches, the journal stream, `torchloom ui` and `torchloom replay`.

Output shapes come from torchloom.app.format (pure); this module only fetches, submits and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from torchloom import discovery
from torchloom.app import format as cli_format
from torchloom.app.lookup import weaver_address
from torchloom.client import ControlClient
from torchloom.errors import JobNotFound, WeaverUnavailable
from torchloom.messages import Action, ActionKind, Issuer, JobStatus, Outcome

if TYPE_CHECKING:
    # Imported where used: every CLI call loads this module, few serve the UI (bcrypt, the UI server).
    from torchloom.credentials import CredentialStore
    from weaver.ui_server import UiServer

STATUS_TIMEOUT_S = 10.0
REPLAY_USAGE = "torchloom replay (JOURNAL | --run ID) [--job NAME] [torchrun options] -- SCRIPT [ARGS]"

# CLI command name -> the action it submits (pause/resume are handled the same way).
ACTION_COMMANDS: dict[str, ActionKind] = {
    "pause": ActionKind.PAUSE,
    "resume": ActionKind.RESUME,
    "checkpoint": ActionKind.CHECKPOINT,
    "rollback": ActionKind.ROLLBACK,
    "eval": ActionKind.EVAL,
    "stop": ActionKind.STOP,
}


def cli_issuer() -> Issuer:
    """Return who is submitting: `Issuer(kind="cli", identity="user@host")`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable (some containers)
        user = "unknown"
    return Issuer(kind="cli", identity=f"{user}@{socket.gethostname()}")


def action_body(args: argparse.Namespace) -> Action:
    """Return the Action a parsed action command submits (checkpoint, rollback, data add, ...)."""
    command = args.command
    if command in ACTION_COMMANDS:
        kind = ACTION_COMMANDS[command]
        if kind is ActionKind.CHECKPOINT and args.tag:
            return Action(kind=kind, args={"tag": args.tag})
        if kind is ActionKind.ROLLBACK:
            return Action(kind=kind, args={"checkpoint": args.checkpoint})
        return Action(kind=kind)
    if command == "data":
        # Ranks may run in another working directory: send the path as the user meant it, absolute.
        path = str(Path(args.path).expanduser().absolute())
        return Action(kind=ActionKind.DATA_ADD, args={"name": args.name, "path": path})
    if command == "fault":
        return Action(kind=ActionKind.FAULT_INJECT, args={"rank": str(args.rank), "xid": str(args.xid)})
    raise ValueError(f"{command!r} is not an action command")


async def fetch_job(grpc: str | None, job: str) -> JobStatus:
    """Return one job's status: the named one, or the only one the weaver knows.

    Raises:
        JobNotFound: no job yet, or several and none named (the message lists them).
        WeaverUnavailable: no weaver found or it did not answer.
    """
    async with ControlClient(weaver_address(grpc)) as client, asyncio.timeout(STATUS_TIMEOUT_S):
        reply = await client.status(job)
    jobs = [j for j in reply.jobs if not job or j.job == job]
    if not jobs:
        raise JobNotFound(
            f"job {job!r} not found" if job else "no jobs yet: no rank has reported to the weaver"
        )
    if len(jobs) > 1:
        names = ", ".join(j.job for j in jobs)
        raise JobNotFound(f"several jobs are running ({names}): pick one with --job NAME")
    return jobs[0]


async def print_journal(grpc: str | None, job: str, *, follow: bool, as_json: bool, out: TextIO) -> None:
    """Print the journal: `{"entries": [...]}` (or one JSON object per line with `follow`), else lines."""
    entries: list[dict[str, object]] = []
    async with ControlClient(weaver_address(grpc)) as client:
        async for event in client.journal(job, follow=follow):
            item = cli_format.journal_entry_json(event)
            if item is None:
                continue
            if as_json and not follow:
                entries.append(item)
            elif as_json:
                print(json.dumps(item), file=out, flush=True)
            else:
                print(cli_format.format_journal_entry(item), file=out, flush=True)
    if as_json and not follow:
        print(json.dumps({"entries": entries}), file=out, flush=True)


async def command_outcome(grpc: str | None, job: str, command_id: str, *, follow: bool) -> Outcome | None:
    """Return the journaled final outcome of one command (with `follow`, wait for it); None when the
    journal holds none yet: the command is in flight, or was never submitted."""
    found: Outcome | None = None
    async with ControlClient(weaver_address(grpc)) as client:
        async for event in client.journal(job, follow=follow, command_id=command_id):
            if isinstance(event, Outcome) and event.command_id == command_id:
                found = event
                break
    return found


def ui_credentials(info: discovery.WeaverInfo | None) -> CredentialStore | None:
    """The control plane's NATS credentials when it keeps browser passwords (else the NATS server
    takes anonymous pages). Never creates one: the running nats-server would not know it."""
    from torchloom.credentials import PASSWORD_SUFFIX, CredentialStore, Role

    if info is None or not info.secrets_dir:
        return None
    directory = Path(info.secrets_dir)
    if not (directory / f"{Role.UI_VIEWER.value}{PASSWORD_SUFFIX}").exists():
        return None
    return CredentialStore(directory)


def print_ui_urls(ui: UiServer, *, prefix: str, out: TextIO) -> None:
    """The page URLs with their tokens: the operator's (can steer) first, then the viewer's."""
    if ui.operator_url is not None:
        print(f"{prefix}: {ui.operator_url}", file=out, flush=True)
    print(f"{prefix} (read-only): {ui.viewer_url}", file=out, flush=True)


async def serve_ui(
    *, host: str, port: int | None, allow_remote: bool, nats_ws: str | None, read_only: bool = False
) -> None:
    """Serve the web UI until cancelled; the NATS WebSocket URL, the page credentials and the port
    (which nats-server's allowed origins name) come from the discovery file unless given."""
    from weaver.ui_server import UiServer

    info = discovery.read()
    ws = nats_ws or (info.ws_url if info is not None else "")
    if not ws:
        raise WeaverUnavailable(
            "no NATS WebSocket URL: start a job with `torchloom run` (its embedded server has one) "
            "or pass --nats-ws ws://HOST:PORT"
        )
    if port is None:
        port = info.ui_port if info is not None else 0
    async with UiServer(
        nats_ws_url=ws,
        host=host,
        port=port,
        allow_remote=allow_remote,
        credentials=ui_credentials(info),
        read_only=read_only,
    ) as ui:
        print_ui_urls(ui, prefix="torchloom UI", out=sys.stdout)
        await ui.serve_forever()


def read_journal(source: str) -> str:
    """Return the text of a journal file, or of stdin for `-`."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read journal {source!r}: {exc.strerror or exc}") from None


def split_replay_args(argv: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """Split `torchloom replay` arguments into (JOURNAL, --job or None, the `torchloom run` arguments).

    Raises:
        ValueError: when JOURNAL is missing (the message shows the usage).
    """
    if not argv or (argv[0].startswith("-") and argv[0] != "-"):
        raise ValueError(f"expected a JOURNAL file first: {REPLAY_USAGE}")
    journal, rest = argv[0], list(argv[1:])
    job: str | None = None
    for i, word in enumerate(rest):
        if word == "--" or not word.startswith("-"):
            break
        if word == "--job" and i + 1 < len(rest):
            job = rest[i + 1]
        elif word.startswith("--job="):
            job = word.split("=", 1)[1]
    return journal, job, rest
