"""`torchloom run` and `torchloom replay`: their arguments are parsed apart from the other commands'
(`torchloom.app.run_args`), a replay's journal (a file, stdin or a stored run) becomes a replay file,
and the launcher runs the job. The launcher and run arguments are imported when a command needs them:
they bring NATS and the control plane (see `torchloom.app.cli`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torchloom import discovery, replay_file
from torchloom.app import actions as cli_actions
from torchloom.app import format as cli_format
from torchloom.app import runs
from torchloom.app.health_options import UsageError
from torchloom.errors import TorchloomError

if TYPE_CHECKING:
    from torchloom.app.run_args import RunSpec


def _stored_journal(run_id: str) -> list[dict[str, Any]]:
    """The `--json` journal entries of a stored run (for `torchloom replay --run ID`)."""
    from torchloom.app import history

    record = runs.find_run(run_id)
    entries = asyncio.run(history.read_entries(record))
    return [i for i in map(cli_format.journal_entry_json, entries) if i is not None]


def _split_run_option(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--run ID` / `--run=ID` at the front of `torchloom replay`'s arguments: (ID, the rest), else
    (None, argv).

    Raises:
        ValueError: `--run` without an id.
    """
    if not argv or argv[0].split("=", 1)[0] != "--run":
        return None, list(argv)
    if "=" in argv[0]:
        run_id, rest = argv[0].split("=", 1)[1], list(argv[1:])
    else:
        run_id, rest = (argv[1] if len(argv) > 1 else ""), list(argv[2:])
    if not run_id or run_id.startswith("-"):
        raise ValueError(f"--run expects a run id: {cli_actions.REPLAY_USAGE}")
    return run_id, rest


def main_replay(argv: Sequence[str]) -> int:
    """`torchloom replay ARGS`: write the replay file, then run the job; returns the exit status."""
    from torchloom.app import run_args

    try:
        run_id, argv = _split_run_option(argv)
        if run_id is not None:
            journal, job, rest = cli_actions.split_replay_args([f"run {run_id}", *argv])
            items = _stored_journal(run_id)
        else:
            journal, job, rest = cli_actions.split_replay_args(argv)
            items = cli_format.parse_journal_text(cli_actions.read_journal(journal))
        replay = cli_format.replay_from_journal(items, job)
        if job is None:  # the replay runs under the journal's job name unless told otherwise
            rest = ["--job", replay["job"], *rest]
        spec = run_args.split_run_args(rest)
        if spec.policy is not None:
            raise ValueError("--policy does not apply to a replay: it follows the journal's commands")
    except ValueError as exc:  # UsageError is a ValueError too
        print(f"torchloom replay: {exc}", file=sys.stderr)
        return 2
    except TorchloomError as exc:  # the run is not indexed, or its store cannot be read
        print(f"torchloom replay: {exc}", file=sys.stderr)
        return 1
    path = replay_file.write(discovery.home() / "replays" / run_args.new_run_id(), replay)
    print(
        f"torchloom replay: {len(replay['commands'])} applied commands of job {replay['job']} "
        f"from {journal} (replay file {path})",
        file=sys.stderr,
        flush=True,
    )
    return _main_run_spec(dataclasses.replace(spec, replay_path=str(path)))


def main_run(argv: Sequence[str]) -> int:
    """`torchloom run ARGS`: launch the job; returns its exit status (2 for bad arguments)."""
    from torchloom.app import run_args

    try:
        spec = run_args.split_run_args(argv)
    except UsageError as exc:
        print(f"torchloom run: {exc}", file=sys.stderr)
        return 2
    return _main_run_spec(spec)


def _main_run_spec(spec: RunSpec) -> int:
    from torchloom.app import launcher

    try:
        return asyncio.run(launcher.run(spec))
    except KeyboardInterrupt:
        return 130
    except TorchloomError as exc:
        print(f"torchloom run: {exc}", file=sys.stderr)
        return 1
