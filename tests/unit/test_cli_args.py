"""Unit tests of `torchloom` argument handling: the torchrun/script split and input errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchloom.app import cli, launcher, run_args
from torchloom.app.health_options import UsageError
from torchloom.app.run_args import split_run_args


def test_run_splits_torchrun_options_from_script_args() -> None:
    spec = split_run_args(
        ["--job", "j1", "--nproc-per-node", "2", "--max-restarts=3", "train.py", "--steps", "5", "--job", "x"]
    )
    assert spec.job == "j1"
    assert spec.script == "train.py"
    # Options after SCRIPT are the script's, even when they look like ours.
    assert spec.script_args == ("--steps", "5", "--job", "x")
    assert spec.torchrun_args == ("--standalone", "--nproc-per-node", "2", "--max-restarts", "3")


def test_run_defaults_job_to_script_stem_and_one_process() -> None:
    spec = split_run_args(["examples/train_tiny.py"])
    assert spec.job == "train_tiny"
    assert spec.nats_url is None and spec.grpc is None
    assert spec.torchrun_args == ("--standalone", "--nproc-per-node", "1")
    assert run_args.torchrun_command(spec)[1:4] == ["-m", "torch.distributed.run", "--standalone"]


def test_run_keeps_user_rendezvous_and_flags() -> None:
    spec = split_run_args(
        [
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "h:29400",
            "--nats",
            "nats://h:4222",
            "--no-python",
            "prog",
            "-x",
        ]
    )
    assert "--standalone" not in spec.torchrun_args
    assert spec.torchrun_args[:5] == ("--nnodes", "2", "--rdzv-endpoint", "h:29400", "--no-python")
    assert spec.nats_url == "nats://h:4222"
    assert spec.script == "prog" and spec.script_args == ("-x",)


def test_run_double_dash_starts_script() -> None:
    spec = split_run_args(["--standalone", "--", "train.py", "a"])
    assert spec.script == "train.py" and spec.script_args == ("a",)
    assert spec.torchrun_args.count("--standalone") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no SCRIPT"),
        (["--nproc-per-node"], "expects a value"),
        (["--bogus", "train.py"], "unknown option '--bogus'"),
        (["--job", "bad name", "train.py"], "job 'bad name' is not valid"),
        (["--grpc", "nohost", "train.py"], "expected HOST:PORT"),
    ],
)
def test_run_usage_errors_name_the_problem(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        split_run_args(argv)


def test_exit_status_maps_signals() -> None:
    assert launcher.exit_status(0) == 0
    assert launcher.exit_status(3) == 3
    assert launcher.exit_status(-15) == 143


def test_child_env_sets_torchloom_variables() -> None:
    spec = split_run_args(["--job", "demo", "t.py"])
    out = run_args.child_env(spec, run_id="abc", nats_url="nats://127.0.0.1:1", grpc="127.0.0.1:2")
    assert out["TORCHLOOM_JOB"] == "demo"
    assert out["TORCHLOOM_RUN_ID"] == "abc"
    assert out["TORCHLOOM_NATS_URL"] == "nats://127.0.0.1:1"
    assert out["TORCHLOOM_GRPC"] == "127.0.0.1:2"


def test_new_run_id_is_12_hex() -> None:
    rid = run_args.new_run_id()
    assert len(rid) == 12 and int(rid, 16) >= 0
    assert rid != run_args.new_run_id()


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["lr"], "expected KEY=VALUE"),
        (["=3"], "expected KEY=VALUE"),
        (["lr=1", "lr=2"], "assigned twice"),
    ],
)
def test_set_bad_assignment_exits_2_before_any_lookup(
    words: list[str], message: str, tl_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["set", *words]) == cli.EXIT_REJECTED
    assert message in capsys.readouterr().err


def test_no_weaver_exits_4_and_says_how_to_start_one(
    tl_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TORCHLOOM_GRPC", raising=False)
    assert cli.main(["set", "lr=0.1"]) == cli.EXIT_NO_WEAVER
    err = capsys.readouterr().err
    assert "torchloom run" in err and "--grpc" in err


@pytest.mark.parametrize(
    "argv",
    [["set", "lr=1", "--timeout", "0"], ["set", "lr=1", "--timeout", "abc"], ["status", "--grpc", "x"]],
)
def test_parser_rejects_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "seconds > 0" in err or "HOST:PORT" in err


def test_parser_accepts_the_contract() -> None:
    args = cli.build_parser().parse_args(
        ["set", "lr=1e-4", "wd@head=0.1", "--job", "j", "--json", "--timeout", "5"]
    )
    assert (args.assignments, args.job, args.json, args.timeout) == (
        ["lr=1e-4", "wd@head=0.1"],
        "j",
        True,
        5.0,
    )
    args = cli.build_parser().parse_args(["pause", "--grpc", "127.0.0.1:5"])
    assert (args.command, args.grpc, args.json) == ("pause", "127.0.0.1:5", False)
    args = cli.build_parser().parse_args(["weaver"])
    assert args.nats is None and args.grpc is None


def test_run_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--bogus", "x.py"]) == 2
    assert "unknown option" in capsys.readouterr().err
