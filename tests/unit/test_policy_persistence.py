"""A job's autopilot policy is journaled when set and recovered from the journal (the latest
`policy_set` event of each job wins; "" turns the rules off), and `torchloom weaver --policy` checks
the default policy it is given before anything starts."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from torchloom.app import cli
from torchloom.messages import JobEvent, Outcome, SubmitRequest
from weaver import rules
from weaver.model import WeaverState
from weaver.steering import POLICY_SET, Steering

POLICY = '[[rule]]\nname = "ckpt"\nwhen = "every_steps"\ndo = [{action = "checkpoint"}]\n'


def steering(announced: list[JobEvent], default: rules.Policy | None = None) -> Steering:
    async def submit(req: SubmitRequest) -> Outcome:
        raise AssertionError("nothing is submitted here")

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        coro.close()

    return Steering(WeaverState(), default, announce=announced.append, submit=submit, spawn=spawn)


def test_set_policy_is_journaled_and_a_new_weaver_recovers_the_latest_per_job() -> None:
    journal: list[JobEvent] = []
    first = steering(journal)
    first.set_policy("a", POLICY)
    first.set_policy("b", POLICY)
    first.set_policy("b", "")  # off: journaled too
    assert [(e.job, e.kind, e.attrs["policy"]) for e in journal] == [
        ("a", POLICY_SET, "policy of job a"),
        ("b", POLICY_SET, "policy of job b"),
        ("b", POLICY_SET, "none"),
    ]
    assert journal[0].attrs["text"] == POLICY and journal[2].attrs["text"] == ""
    default = rules.load("default")
    second = steering([], default)
    # Events of other kinds and outcomes pass by; a policy that no longer parses is skipped.
    broken = JobEvent(job="c", kind=POLICY_SET, attrs={"policy": "x", "text": "not = [toml"})
    second.recover([JobEvent(job="a", kind="run_started"), *journal, broken])
    assert second.view("a").text == POLICY
    assert second.view("b").name == ""  # turned off, although the weaver has a default
    assert second.view("c").name == "default"  # the weaver's default stands


def test_weaver_policy_option_refuses_a_bad_file_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCHLOOM_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nwhen = "sometimes"\ndo = [{action = "checkpoint"}]\n')
    assert cli.main(["weaver", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "torchloom weaver:" in err and "'sometimes' rejected: expected one of" in err
    assert cli.main(["weaver", "--policy", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read it" in capsys.readouterr().err
