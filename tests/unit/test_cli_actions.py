"""Unit tests of the action commands' arguments: bodies submitted, run/replay options, the issuer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from torchloom import env
from torchloom.app import actions as cli_actions
from torchloom.app import cli, run_args
from torchloom.app.health_options import UsageError
from torchloom.messages import Action, ActionKind


def _body(*argv: str) -> Action:
    return cli_actions.action_body(cli.build_parser().parse_args(list(argv)))


def test_action_bodies() -> None:
    assert _body("checkpoint") == Action(kind=ActionKind.CHECKPOINT)
    assert _body("checkpoint", "--tag", "warm") == Action(kind=ActionKind.CHECKPOINT, args={"tag": "warm"})
    assert _body("rollback", "warm") == Action(kind=ActionKind.ROLLBACK, args={"checkpoint": "warm"})
    assert _body("eval").kind is ActionKind.EVAL
    assert _body("stop").kind is ActionKind.STOP
    assert _body("fault", "inject", "--rank", "1", "--xid", "79") == Action(
        kind=ActionKind.FAULT_INJECT, args={"rank": "1", "xid": "79"}
    )


def test_data_add_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    body = _body("data", "add", "extra", "shards/x")
    assert body.kind is ActionKind.DATA_ADD
    assert body.args == {"name": "extra", "path": str(tmp_path / "shards" / "x")}


def test_fault_inject_needs_integer_rank(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fault", "inject", "--rank", "one", "--xid", "79"])
    assert "invalid int value" in capsys.readouterr().err


def test_issuer_is_cli_user_at_host() -> None:
    issuer = cli_actions.cli_issuer()
    assert issuer.kind == "cli"
    user, _, host = issuer.identity.partition("@")
    assert user and host


def test_run_options_ui_faults_and_health() -> None:
    spec = run_args.split_run_args(
        [
            "--ui-port",
            "8765",
            "--allow-fault-injection",
            "--hung-after",
            "5",
            "--straggler-factor=3",
            "--health-policy",
            "pause",
            "--nproc-per-node",
            "2",
            "train.py",
            "--ui",
        ]
    )
    assert spec.ui and spec.ui_port == 8765 and spec.allow_fault_injection
    assert spec.script_args == ("--ui",)  # after SCRIPT everything is the script's
    assert spec.health.config_kwargs() == {
        "hung_after_s": 5.0,
        "straggler_factor": 3.0,
        "health_policy": "pause",
    }
    plain = run_args.split_run_args(["train.py"])
    assert not plain.ui and not plain.allow_fault_injection and plain.health.config_kwargs() == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--health-policy", "reboot", "t.py"], "expected one of reconfigure, pause, alert"),
        (["--straggler-factor", "1", "t.py"], r"must be a number in \(1, 1000\]"),
        (["--hung-after", "nan", "t.py"], r"--hung-after 'nan' rejected"),
        (["--ui-port", "70000", "t.py"], r"\[0, 65535\]"),
    ],
)
def test_run_options_bad_values_name_the_bound(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run_args.split_run_args(argv)


def test_child_env_grants_fault_injection_and_replay_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.ALLOW_FAULT_INJECTION, "1")  # inherited from the shell: must not leak
    spec = run_args.split_run_args(["t.py"])
    out = run_args.child_env(spec, run_id="r", nats_url="nats://x:1", grpc="h:1")
    assert env.ALLOW_FAULT_INJECTION not in out and env.REPLAY not in out
    spec = run_args.split_run_args(["--allow-fault-injection", "t.py"])
    spec = dataclasses.replace(spec, replay_path="/r/replay.json")
    out = run_args.child_env(spec, run_id="r", nats_url="nats://x:1", grpc="h:1")
    assert out[env.ALLOW_FAULT_INJECTION] == "1" and out[env.REPLAY] == "/r/replay.json"


def test_split_replay_args() -> None:
    assert cli_actions.split_replay_args(["j.json", "--", "t.py", "--job", "x"]) == (
        "j.json",
        None,
        ["--", "t.py", "--job", "x"],
    )
    assert cli_actions.split_replay_args(["-", "--job=demo", "t.py"])[:2] == ("-", "demo")
    assert cli_actions.split_replay_args(["j.json", "--job", "demo", "t.py"])[1] == "demo"
    with pytest.raises(ValueError, match="expected a JOURNAL file first"):
        cli_actions.split_replay_args(["--job", "x"])


def test_replay_with_bad_journal_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "j.json"
    bad.write_text('{"entries": []}')
    assert cli.main(["replay", str(bad), "--", "t.py"]) == 2
    assert "expected exactly one" in capsys.readouterr().err
    assert cli.main(["replay", str(tmp_path / "missing.json"), "t.py"]) == 2
    assert "cannot read journal" in capsys.readouterr().err
