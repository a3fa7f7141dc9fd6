"""`python -m torchloom.app.torchrun_result FILE ARGS`: torchrun (`torch.distributed.run`) with ARGS
that, as it ends, writes what its elastic agent knows of the workers' end to FILE as JSON: the failed
ranks of its RunResult (rank, local rank, exit code or signal, pid, host), the first failure first,
or the signal that stopped torchrun itself. The launcher's supervisor runs torchrun through here and
reads FILE for the run's `run_ended` event; torchrun's output and exit status stay its own.

FILE's form (`read` parses it back):
    {"failures": [{"rank": 1, "local_rank": 1, "exitcode": -9, "signal": "SIGKILL", "pid": 123,
                   "host": "node-a", "time_s": 1700000000, "message": "..."}, ...],
     "signal": ""}
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODULE = "torchloom.app.torchrun_result"
TORCHRUN_MODULE = "torch.distributed.run"
_MESSAGE_MAX = 500  # characters of a failure's message kept (a traceback can be long)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One worker that failed, as torchrun's agent saw it."""

    rank: int
    local_rank: int
    exitcode: int  # negative: killed by signal -exitcode
    pid: int
    host: str
    time_s: int = 0
    message: str = ""

    @property
    def signal(self) -> str:
        """The signal's name when a signal ended the worker ("SIGKILL"), else ""."""
        return signal_name(-self.exitcode) if self.exitcode < 0 else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TorchrunResult:
    """How a torchrun ended: its failed workers (the first failure first) and the signal that stopped
    torchrun itself ("" when none did)."""

    failures: tuple[Failure, ...] = ()
    signal: str = ""

    @property
    def first(self) -> Failure | None:
        return self.failures[0] if self.failures else None


def signal_name(number: int) -> str:
    """Signal `number`'s name ("SIGKILL"), or "signal N" for a number that names none."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def wrap(argv: Sequence[str], result_file: Path) -> list[str]:
    """`argv` (`python -m torch.distributed.run ARGS`) run through this module so it writes
    `result_file`; any other command is returned as it is (its end is then not known in detail)."""
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == TORCHRUN_MODULE:
        return [argv[0], "-m", MODULE, str(result_file), *argv[3:]]
    return list(argv)


def read(path: Path) -> TorchrunResult | None:
    """The result a wrapped torchrun wrote to `path`; None when it wrote none (it was killed, or
    it was not wrapped) or the file is not this module's form."""
    try:
        data = json.loads(path.read_text())
        failures = tuple(
            Failure(
                rank=int(f["rank"]),
                local_rank=int(f["local_rank"]),
                exitcode=int(f["exitcode"]),
                pid=int(f["pid"]),
                host=str(f["host"]),
                time_s=int(f.get("time_s", 0)),
                message=str(f.get("message", "")),
            )
            for f in data["failures"]
        )
        return TorchrunResult(failures=failures, signal=str(data.get("signal", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _failures_json(exc: Any) -> list[dict[str, Any]]:
    """A ChildFailedError's failures, the first failure (torchrun's root cause) first."""
    host = socket.gethostname()
    first, _ = exc.get_first_failure()
    ranks = sorted(exc.failures, key=lambda r: (r != first, exc.failures[r].timestamp, r))
    out = []
    for rank in ranks:
        f = exc.failures[rank]
        message = f.message if isinstance(f.message, str) else json.dumps(f.message)
        out.append(
            {
                "rank": int(rank),
                "local_rank": int(f.local_rank),
                "exitcode": int(f.exitcode),
                "pid": int(f.pid),
                "host": host,
                "time_s": int(f.timestamp),
                "message": message[:_MESSAGE_MAX],
            }
        )
    return out


def _write(path: Path, failures: list[dict[str, Any]], sig: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"failures": failures, "signal": sig}))
    os.replace(tmp, path)


def main(argv: Sequence[str]) -> None:
    """Run torchrun with `argv[1:]`, writing the result file `argv[0]` as it ends; torchrun's own
    exception (and so its exit status and message) goes on as it would without this module."""
    if not argv:
        raise SystemExit(f"usage: python -m {MODULE} RESULT_FILE [torchrun arguments]")
    path, args = Path(argv[0]), list(argv[1:])
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(args)
    except ChildFailedError as exc:
        _write(path, _failures_json(exc))
        raise
    except SignalException as exc:
        _write(path, [], signal_name(int(exc.sigval)))
        raise
    _write(path, [])


if __name__ == "__main__":
    sys.argv[0] = TORCHRUN_MODULE  # what torchrun's own messages call the program
    main(sys.argv[1:])
