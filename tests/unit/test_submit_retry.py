"""The client side of idempotent submission: one command id across retries, and exit codes that say
what is known (applied, rejected, not known yet, nothing submitted)."""

from __future__ import annotations

import pytest

from torchloom.app import submit_cmd
from torchloom.client import SubmitResult, new_command_id, submit_until
from torchloom.messages import Outcome, OutcomeStatus, SetConfig, SubmitRequest


def _result(status: OutcomeStatus | None, *, reached: bool = True) -> SubmitResult:
    outcome = None if status is None else Outcome(command_id="c1", job="j", status=status)
    return SubmitResult(command_id="c1", outcome=outcome, reached=reached, attempts=1 if reached else 0)


@pytest.mark.parametrize(
    ("status", "reached", "code"),
    [
        (OutcomeStatus.APPLIED, True, submit_cmd.EXIT_OK),
        (OutcomeStatus.REJECTED, True, submit_cmd.EXIT_REJECTED),
        (OutcomeStatus.TIMEOUT, True, submit_cmd.EXIT_TIMEOUT),
        # A weaver was reached but no answer came: the command may be in flight, never "no weaver".
        (None, True, submit_cmd.EXIT_TIMEOUT),
        (None, False, submit_cmd.EXIT_NO_WEAVER),
    ],
)
def test_submit_exit_code_says_what_is_known(status: OutcomeStatus | None, reached: bool, code: int) -> None:
    assert submit_cmd.submit_exit_code(_result(status, reached=reached)) == code


def test_command_ids_are_fresh_uuid4_hex() -> None:
    a, b = new_command_id(), new_command_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


async def test_no_weaver_known_returns_at_once_with_nothing_submitted() -> None:
    req = SubmitRequest(body=SetConfig(values={"lr": 0.1}), job="j")
    result = await submit_until(req, lambda: None, deadline_s=30.0)
    assert result.outcome is None and not result.reached and result.attempts == 0
    assert result.command_id  # named even when nothing was sent, so the caller can say which


async def test_a_given_command_id_is_kept() -> None:
    req = SubmitRequest(body=SetConfig(values={"lr": 0.1}), command_id="abc123")
    result = await submit_until(req, lambda: None, deadline_s=1.0)
    assert result.command_id == "abc123"


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
async def test_deadline_must_be_positive(bound: float) -> None:
    req = SubmitRequest(body=SetConfig(values={"lr": 0.1}))
    with pytest.raises(ValueError, match="deadline_s"):
        await submit_until(req, lambda: None, deadline_s=bound)
