"""`torchloom set` and the action commands (pause, checkpoint, rollback, ...): submit a command under
a fresh command id, retried through weaver and NATS restarts, print its outcome (under --json the
`outcome_json` shape, a contract: see the README) and exit with what is known of it (0 applied, 2
rejected, 3 not known yet, 4 no weaver). `torchloom journal --command ID` reports one command's
outcome the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from torchloom import discovery
from torchloom.app import actions as cli_actions
from torchloom.app import format as cli_format
from torchloom.app import lookup
from torchloom.app.interrupt import run_until_interrupted
from torchloom.app.lookup import NO_WEAVER_HELP
from torchloom.client import SubmitResult, submit_until
from torchloom.errors import WeaverUnavailable
from torchloom.messages import AckStatus, Body, Outcome, OutcomeStatus, SubmitRequest

EXIT_OK = 0
EXIT_REJECTED = 2
EXIT_TIMEOUT = 3  # not known yet: still in flight, or no answer came; the command id is printed
EXIT_NO_WEAVER = 4  # no weaver reachable and nothing was submitted
_MIN_ATTEMPT_S = 0.1  # the least time a submit gets once a weaver is announced


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """Return the `--json` shape of set and actions: command_id, status, reason, applied ranks (with
    each rank's ack `detail` where it has one)."""
    applied: list[dict[str, Any]] = []
    for r in sorted(outcome.results, key=lambda r: r.rank):
        if r.status is AckStatus.APPLIED:
            item: dict[str, Any] = {"rank": r.rank, "step": r.step}
            if r.detail:
                item["detail"] = dict(r.detail)
            applied.append(item)
    return {
        "command_id": outcome.command_id,
        "status": str(outcome.status),
        "reason": outcome.reason or None,
        "applied": applied,
    }


def exit_code(outcome: Outcome) -> int:
    """Return the exit status for a command's outcome: 0 applied everywhere, 2 rejected (nothing
    applied anywhere), 3 not known yet (timeout: the command stays in flight)."""
    if outcome.status is OutcomeStatus.APPLIED:
        return EXIT_OK
    if outcome.status is OutcomeStatus.REJECTED:
        return EXIT_REJECTED
    return EXIT_TIMEOUT


def submit_exit_code(result: SubmitResult) -> int:
    """Return the exit status of a retried submit: the outcome's, else 3 when some attempt reached a
    weaver (the command may be in flight) and 4 when none did (nothing was submitted)."""
    if result.outcome is not None:
        return exit_code(result.outcome)
    return EXIT_TIMEOUT if result.reached else EXIT_NO_WEAVER


def format_outcome(outcome: Outcome) -> str:
    """Return the human form of a command's outcome: a summary line, then one line per rank."""
    lines = [f"{outcome.status}: command {outcome.command_id} on job {outcome.job or '-'}"]
    for r in sorted(outcome.results, key=lambda r: r.rank):
        line = f"  rank {r.rank}: {r.status} at step {r.step}"
        lines.append(f"{line} ({r.reason})" if r.reason else line)
    details = cli_format.rank_detail_lines(outcome)
    if details:
        lines.append("  detail:")
        lines += [f"  {line}" for line in details]
    if outcome.reason:
        lines.append(f"  reason: {outcome.reason}")
    return "\n".join(lines)


async def submit(grpc: str | None, body: Body, *, job: str, timeout_s: float) -> SubmitResult:
    """Submit a command under a fresh command id and retry it through weaver and NATS restarts
    until an answer or `timeout_s` (the weaver decides the id once, so a retry never doubles it).

    A running job's control plane that is gone and being restarted (a live lease, no weaver
    announced) is waited for within `timeout_s`.

    Raises:
        WeaverUnavailable: no weaver is known and no job runs (at once), or the running job's control
            plane did not come back within `timeout_s`; nothing was submitted either way.
    """
    start = time.monotonic()
    await lookup.find_weaver(grpc, wait_s=timeout_s)
    # What the wait left (a weaver announced at the deadline still gets one short attempt).
    left = max(_MIN_ATTEMPT_S, timeout_s - (time.monotonic() - start))
    request = SubmitRequest(body=body, job=job, issuer=cli_actions.cli_issuer(), timeout_s=timeout_s)
    # Re-read the discovery file on every attempt: a restarted control plane may use other ports.
    result = await submit_until(request, lambda: discovery.resolve_grpc(grpc), deadline_s=left)
    leases = [] if result.outcome is not None or result.reached else lookup.restarting_jobs(grpc)
    if leases:  # no weaver reached while a job runs: its control plane is not back, not "start a job"
        waited = round(time.monotonic() - start, 1)
        raise WeaverUnavailable(f"{lookup.not_back_message(leases, waited)} (last error: {result.error})")
    return result


def report(result: SubmitResult, as_json: bool) -> int:
    """Print a submit's outcome, or what is known of it, and return the command's exit status."""
    outcome = result.outcome
    code = submit_exit_code(result)
    if outcome is None:
        if as_json:
            status = "unknown" if result.reached else "not_submitted"
            print(json.dumps({"command_id": result.command_id, "status": status, "reason": result.error}))
        if code == EXIT_NO_WEAVER:
            print(f"torchloom: {NO_WEAVER_HELP} (last error: {result.error})", file=sys.stderr)
            return code
    elif as_json:
        print(json.dumps(outcome_json(outcome)), flush=True)
    else:
        print(format_outcome(outcome), flush=True)
    follow = f"`torchloom journal --command {result.command_id} --follow`"
    if code == EXIT_REJECTED and outcome is not None:
        print(f"torchloom: rejected: {outcome.reason}", file=sys.stderr)
    elif code == EXIT_TIMEOUT and outcome is not None:
        print(
            f"torchloom: timed out waiting for every rank's ack; command {result.command_id} stays in "
            f"flight: {follow} shows its outcome",
            file=sys.stderr,
        )
    elif code == EXIT_TIMEOUT:
        print(
            f"torchloom: no answer from the weaver before the deadline ({result.error}); command "
            f"{result.command_id} may have been submitted: {follow} shows its outcome",
            file=sys.stderr,
        )
    return code


def report_command(args: argparse.Namespace) -> int:
    """`torchloom journal --command ID [--follow]`: the command's outcome and the exit code of `set`."""
    found: list[Outcome | None] = [None]

    async def _lookup() -> None:
        found[0] = await cli_actions.command_outcome(args.grpc, args.job, args.command_id, follow=args.follow)

    # Ctrl-C ends a --follow with "unknown" (EXIT_TIMEOUT), even where SIGINT was inherited ignored.
    run_until_interrupted(_lookup(), code=EXIT_TIMEOUT)
    outcome = found[0]
    if outcome is None:
        if args.json:
            print(json.dumps({"command_id": args.command_id, "status": "unknown", "reason": None}))
        print(
            f"torchloom: no outcome of command {args.command_id} in the journal yet: it is in flight or "
            "was never submitted (`--follow` waits for it)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    print(json.dumps(outcome_json(outcome)) if args.json else format_outcome(outcome), flush=True)
    return exit_code(outcome)
