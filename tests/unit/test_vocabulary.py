"""The shared vocabulary of the core: ids and attempt names, the checkpoint layout, the replay file,
health-policy names, defaults and the version; and the typed restart request on the wire (the Ack's
peer-refusal flag rides in test_subjects_and_wire's round trip of every field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchloom
from torchloom import defaults, layout, naming, replay_file, wire
from torchloom.app import cli
from torchloom.messages import RestartRequest, SetConfig
from torchloom.policy import PolicyMode, parse_mode
from torchloom.v1 import torchloom_pb2 as pb

# ---- naming -------------------------------------------------------------------------------------------


def test_checkpoint_and_branch_ids() -> None:
    assert naming.checkpoint_id(12) == "ckpt-12" and naming.branch_id(5) == "b5"
    assert naming.seq_of("ckpt-12") == 12 and naming.MAIN_BRANCH == "main"
    assert naming.is_checkpoint_id("ckpt-3") and not naming.is_checkpoint_id("ckpt-0")
    for bad in ("ckpt-0", "ckpt-x", "b5", "before-spike"):
        with pytest.raises(ValueError, match="expected ckpt-<seq>"):
            naming.seq_of(bad)
    for make in (naming.checkpoint_id, naming.branch_id):
        with pytest.raises(ValueError, match="seq=0 rejected: must be >= 1"):
            make(0)


@pytest.mark.parametrize(
    ("run_id", "base"),
    [("r1", "r1"), ("r1-a1", "r1"), ("r1-a1-a2", "r1"), ("r-abc", "r-abc"), ("r1-a0", "r1-a0")],
)
def test_base_run_id(run_id: str, base: str) -> None:
    assert naming.base_run_id(run_id) == base
    assert naming.is_attempt_id(run_id) is (run_id != base)


def test_attempt_run_ids() -> None:
    assert naming.attempt_run_id("r1", 0) == "r1"
    assert naming.attempt_run_id("r1", 2) == "r1-a2"
    assert naming.attempt_run_id("r1-a1", 1) == "r1-a1-a1"
    with pytest.raises(ValueError, match="attempt=-1 rejected"):
        naming.attempt_run_id("r1", -1)


@pytest.mark.parametrize(
    ("run_id", "current", "expected"),
    [
        ("r1", "r1", True),
        ("r1-a1", "r1", True),  # torchrun's elastic restart inside the attempt
        ("r1-a1-a3", "r1-a1", True),
        ("r1", "r1-a1", False),  # an older attempt: stale
        ("r1-a2", "r1-a1", False),
        ("r1-abc", "r1", False),  # not an attempt suffix, only a similar name
        ("r10-a1", "r1", False),
    ],
)
def test_is_attempt_of(run_id: str, current: str, expected: bool) -> None:
    assert naming.is_attempt_of(run_id, current) is expected


# ---- checkpoint layout ------------------------------------------------------------------------------


def test_default_root_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert layout.checkpoint_path(tmp_path, "job", "run", 3) == tmp_path / "job" / "run" / "ckpt-3"
    monkeypatch.delenv("TORCHLOOM_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("TORCHLOOM_HOME", str(tmp_path / "home"))
    assert layout.default_root() == tmp_path / "home" / "checkpoints"
    monkeypatch.setenv("TORCHLOOM_CHECKPOINT_DIR", str(tmp_path / "ck"))
    assert layout.default_root() == tmp_path / "ck"
    assert layout.default_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    # A child's environment, not this process's, when given.
    assert (
        layout.default_root(environ={"TORCHLOOM_HOME": str(tmp_path / "h2")}) == tmp_path / "h2/checkpoints"
    )
    assert layout.default_root(environ={"TORCHLOOM_CHECKPOINT_DIR": str(tmp_path / "c2")}) == tmp_path / "c2"


def test_marker_makes_a_checkpoint_complete(tmp_path: Path) -> None:
    assert layout.checkpoint_step(tmp_path) is None
    layout.mark_complete(tmp_path, step=31, branch="b4", world_size=2)
    assert layout.checkpoint_step(tmp_path) is None  # no DCP metadata yet: a save cut short
    (tmp_path / layout.DCP_METADATA).write_bytes(b"x")
    assert layout.checkpoint_step(tmp_path) == 31
    assert layout.read_marker(tmp_path) == {"step": 31, "branch": "b4", "world_size": 2}
    (tmp_path / layout.COMPLETE_MARKER).write_text(json.dumps({"step": "31"}))
    assert layout.read_marker(tmp_path) is None


def test_find_latest_looks_at_every_attempt(tmp_path: Path) -> None:
    for run, seq, step in (("r1", 2, 10), ("r1-a1", 5, 30), ("r2", 9, 99)):
        path = layout.checkpoint_path(tmp_path, "job", run, seq)
        path.mkdir(parents=True)
        (path / layout.DCP_METADATA).write_bytes(b"x")
        layout.mark_complete(path, step=step)
    (tmp_path / "job" / "r1" / "not-a-checkpoint").mkdir()
    found = layout.find_latest(tmp_path, "job", "r1-a1-a1")
    assert found is not None and (found.run_id, found.seq, found.step) == ("r1-a1", 5, 30)
    assert layout.find_latest(tmp_path, "other", "r1") is None


# ---- replay file ------------------------------------------------------------------------------------


def test_replay_file_written_is_read_back(tmp_path: Path) -> None:
    entries = [
        replay_file.ReplayEntry(seq=3, step=9, branch="b2", kind="rollback", args={"checkpoint": "ckpt-1"}),
        replay_file.ReplayEntry(seq=1, step=4, branch="main", kind="set", values={"betas": (0.9, 0.95)}),
    ]
    doc = replay_file.document("demo", entries)
    assert [c["seq"] for c in doc["commands"]] == [1, 3]
    assert doc["commands"][0]["values"] == {"betas": [0.9, 0.95]}  # JSON's form of a float list
    path = replay_file.write(tmp_path / "run", doc)
    assert path == (tmp_path / "run" / replay_file.FILE_NAME).resolve()
    job, back = replay_file.load(path)
    assert job == "demo" and back == sorted(entries, key=lambda e: e.seq)
    cmd = back[0].command("demo", "r9")
    assert cmd.command_id == "replay-1" and cmd.body == SetConfig(values={"betas": (0.9, 0.95)})


def test_replay_file_writer_refuses_what_the_reader_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seq=0 must be an integer >= 1"):
        replay_file.write(tmp_path, {"job": "j", "commands": [{"seq": 0, "step": 1, "branch": "main"}]})
    assert not (tmp_path / replay_file.FILE_NAME).exists()


# ---- policy names, defaults, version ----------------------------------------------------------------


def test_policy_names() -> None:
    assert [m.value for m in PolicyMode] == ["reconfigure", "pause", "alert"]
    assert parse_mode("pause", name="--health-policy") is PolicyMode.PAUSE
    with pytest.raises(ValueError, match="--health-policy='reboot' rejected: expected one of reconfigure"):
        parse_mode("reboot", name="--health-policy")


def test_grpc_service_name_matches_the_proto() -> None:
    assert pb.DESCRIPTOR.services_by_name["Control"].full_name == defaults.GRPC_SERVICE


def test_one_command_timeout_default() -> None:
    from torchloom.client import ControlClient
    from weaver.config import WeaverConfig

    assert WeaverConfig().command_timeout_s == defaults.COMMAND_TIMEOUT_S
    assert ControlClient("127.0.0.1:1").command_timeout_s == defaults.COMMAND_TIMEOUT_S
    args = cli.build_parser().parse_args(["pause"])
    assert args.timeout == defaults.COMMAND_TIMEOUT_S


def test_version_comes_from_the_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    assert torchloom.__version__ == defaults.version() != ""
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchloom {torchloom.__version__}"


# ---- typed messages on the wire ---------------------------------------------------------------------


def test_restart_request_round_trip() -> None:
    req = RestartRequest(
        job="j",
        run_id="r1-a1",
        world_size=3,
        exclude_ranks=(1, 4),
        grad_accum_steps=2,
        checkpoint_id="ckpt-7",
        checkpoint_path="/ck/j/r1-a1/ckpt-7",
        steps_lost=5,
        reason="unhealthy device: XID 79",
        time_s=1234.5,
    )
    assert wire.decode_restart_request(wire.encode(req)) == req
    assert wire.decode_restart_request(wire.encode(RestartRequest(job="j", run_id="r", world_size=1))) == (
        RestartRequest(job="j", run_id="r", world_size=1)
    )
    with pytest.raises(wire.WireError, match="malformed RestartRequest"):
        wire.decode_restart_request(b"\xff")
