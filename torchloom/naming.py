"""The ids everyone derives the same way: checkpoints (`ckpt-<seq>`), branches (`main`, `b<seq>`) and
run attempts (`<run>-a<N>`); the weaver, the threadlet and the launcher all name things through here.
"""

from __future__ import annotations

import re

MAIN_BRANCH = "main"  # the branch a run starts on; each rollback starts `b<seq>`
# The JobEvent kind a launcher publishes when `torchloom run` got SIGTERM/SIGINT (attr `signal`): the
# run is ending on purpose, so the weaver orders no restart or health command for it.
RUN_STOPPING = "run_stopping"
# The JobEvent kind a launcher publishes once its run ended, whatever the end (attrs: `exit_status`,
# and when torchrun knows it the first failed rank's `failed_*`): the weaver stops calling its ranks running.
RUN_ENDED = "run_ended"
# A follow-up ack whose detail has ACK_NOTICE reports something that went wrong with its command after
# it was decided: detail[ACK_NOTICE] is the notice kind, detail[ACK_NOTICE_MESSAGE] says what and how
# to fix it. The weaver journals each as a JobEvent of the same kind, naming the rank and command.
ACK_NOTICE = "notice"
ACK_NOTICE_MESSAGE = "message"
# Notice: an lr set by torchloom was changed outside the threadlet (a scheduler it was not given).
LR_OVERWRITTEN = "lr_overwritten"
NOTICE_KINDS = frozenset({LR_OVERWRITTEN})
# `torchloom search` ends with a rollback to its start checkpoint whose args carry the search's record
# under SEARCH_RESULT (a JSON object: knob, candidates, the metric of each, the winner); once that
# rollback's outcome is final the weaver journals the record as a JobEvent of kind SEARCH_RESULT.
# The search's commands carry issuer kind SEARCH_ISSUER.
SEARCH_RESULT = "search_result"
SEARCH_ISSUER = "search"
# A rank held at step 0 (`TORCHLOOM_START_HOLD_S`) reports metrics with HELD_AT_START = 1 until the
# hold ends: the weaver's autopilot then sends its policy's start commands and a resume.
HELD_AT_START = "held_at_start"
_CKPT_ID = re.compile(r"^ckpt-([1-9][0-9]*)$")
_ATTEMPT = re.compile(r"^(?P<base>.+)-a(?P<n>[1-9][0-9]*)$")


def _check_seq(seq: int) -> None:
    if seq < 1:
        raise ValueError(f"seq={seq} rejected: must be >= 1")


def checkpoint_id(seq: int) -> str:
    """The id every rank (and a replay) gives the checkpoint taken by command `seq`: `ckpt-<seq>`.

    Raises:
        ValueError: seq < 1.
    """
    _check_seq(seq)
    return f"ckpt-{seq}"


def branch_id(seq: int) -> str:
    """The id of the branch a rollback decided as command `seq` starts: `b<seq>`.

    Raises:
        ValueError: seq < 1.
    """
    _check_seq(seq)
    return f"b{seq}"


def seq_of(ckpt_id: str) -> int:
    """The command seq in a checkpoint id (`"ckpt-12"` -> 12).

    Raises:
        ValueError: when the id is not of the form ckpt-<seq>.
    """
    m = _CKPT_ID.match(ckpt_id)
    if m is None:
        raise ValueError(f"checkpoint id {ckpt_id!r} rejected: expected ckpt-<seq> such as ckpt-12")
    return int(m.group(1))


def is_checkpoint_id(name: str) -> bool:
    """Whether `name` has the form `ckpt-<seq>` (a checkpoint directory's name)."""
    return _CKPT_ID.match(name) is not None


def base_run_id(run_id: str) -> str:
    """The first attempt's run id: every `-a<N>` suffix removed (`"3f2a-a1-a2"` -> `"3f2a"`)."""
    while (m := _ATTEMPT.match(run_id)) is not None:
        run_id = m.group("base")
    return run_id


def attempt_run_id(run_id: str, attempt: int) -> str:
    """The run id of attempt `attempt` (0: `run_id` itself) restarted from run `run_id`: `<run_id>-a<N>`.

    Each attempt gets its own id so commands published to the previous attempt's subject are never
    applied again, while the weaver still sees the same job (a new run of it). A supervisor attempt
    `R-a1` restarted by torchrun becomes `R-a1-a1`, so the two kinds of restart never share an id.

    Raises:
        ValueError: attempt < 0.
    """
    if attempt < 0:
        raise ValueError(f"attempt={attempt} rejected: must be >= 0")
    return run_id if attempt == 0 else f"{run_id}-a{attempt}"


def is_attempt_id(run_id: str) -> bool:
    """Whether `run_id` ends in `-a<N>`, the form reserved for restarted attempts of a run."""
    return _ATTEMPT.match(run_id) is not None


def is_attempt_of(run_id: str, current: str) -> bool:
    """Whether `run_id` names `current` itself or an attempt restarted from it (`<current>-a<N>...`)."""
    while True:
        if run_id == current:
            return True
        m = _ATTEMPT.match(run_id)
        if m is None:
            return False
        run_id = m.group("base")
