"""Supervisor decisions without processes: torchrun options per attempt, devices, restart requests, env."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from torchloom import env, signing, wire
from torchloom.app.supervisor import (
    DISABLE_SHARED_STORE,
    attempt_env,
    checkpoint_dir,
    nproc_of,
    parse_restart,
    surviving_devices,
    verified_restart,
    weaver_verifier,
    with_nproc,
)
from torchloom.messages import RestartRequest


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--standalone", "--nproc-per-node", "2"), ("--standalone", "--nproc-per-node", "1")),
        (("--nproc_per_node=2", "--max-restarts", "1"), ("--max-restarts", "1", "--nproc-per-node", "1")),
        ((), ("--nproc-per-node", "1")),
    ],
)
def test_with_nproc_replaces_or_adds(args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert with_nproc(args, 1) == expected
    assert nproc_of(expected) == 1


def test_with_nproc_rejects_empty_world() -> None:
    with pytest.raises(ValueError, match="at least 1 rank"):
        with_nproc((), 0)


def test_nproc_of() -> None:
    assert nproc_of(("--nproc-per-node", "4")) == 4
    assert nproc_of(("--nproc_per_node=3",)) == 3
    assert nproc_of(("--nproc-per-node", "gpu")) == 1


def test_surviving_devices_skip_the_failed_local_rank() -> None:
    assert surviving_devices(["0", "1", "2", "3"], {1}) == ["0", "2", "3"]
    assert surviving_devices(["3", "5"], {0}) == ["5"]


def test_parse_restart_decodes_the_typed_request() -> None:
    sent = RestartRequest(
        job="j",
        run_id="r1",
        world_size=1,
        exclude_ranks=(1,),
        grad_accum_steps=2,
        checkpoint_id="ckpt-3",
        checkpoint_path="/x/ckpt-3",
        steps_lost=4,
        reason="device 1 failed",
    )
    assert parse_restart(wire.encode(sent)) == sent


@pytest.mark.parametrize(
    "fields",
    [{"world_size": 0}, {"world_size": 1, "grad_accum_steps": -1}, {"world_size": 1, "exclude_ranks": (-1,)}],
)
def test_parse_restart_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="world_size"):
        parse_restart(wire.encode(RestartRequest(job="j", run_id="r1", **fields)))


def test_parse_restart_rejects_other_messages() -> None:
    with pytest.raises(ValueError, match="malformed RestartRequest"):
        parse_restart(b"\xff\xff")


def test_checkpoint_dir_layout(tmp_path: Path) -> None:
    assert (
        checkpoint_dir("j", "r1", "ckpt-3", {env.CHECKPOINT_DIR: str(tmp_path)}) == tmp_path / "j/r1/ckpt-3"
    )
    assert (
        checkpoint_dir("j", "r1", "ckpt-3", {env.HOME: str(tmp_path)}) == tmp_path / "checkpoints/j/r1/ckpt-3"
    )
    with pytest.raises(ValueError, match="expected ckpt-<seq>"):
        checkpoint_dir("j", "r1", "/abs/ckpt-3", {})  # a path from a request is never used


def test_attempt_env() -> None:
    base = {"PATH": "/bin", env.RESUME_FROM: "/old", env.KNOB_OVERRIDES: "{}"}
    out = attempt_env(
        base, run_id="r1-a1", base_run_id="r1", resume_from=Path("/c/ckpt-3"), grad_accum_steps=2
    )
    assert out[env.RUN_ID] == "r1-a1" and out[env.BASE_RUN_ID] == "r1"
    assert out[env.RESUME_FROM] == "/c/ckpt-3"
    assert json.loads(out[env.KNOB_OVERRIDES]) == {"grad_accum_steps": 2}
    assert out[DISABLE_SHARED_STORE] == "1" and "CUDA_VISIBLE_DEVICES" not in out
    plain = attempt_env(base, run_id="r1-a2", base_run_id="r1", devices=["0", "2"])
    assert env.RESUME_FROM not in plain and env.KNOB_OVERRIDES not in plain
    assert plain["CUDA_VISIBLE_DEVICES"] == "0,2"


def test_only_a_restart_request_the_weaver_signed_is_carried_out() -> None:
    weaver = signing.Signer.generate()
    verifier = weaver_verifier({env.WEAVER_PUBKEY: weaver.public_key})
    data = wire.encode(RestartRequest(job="j", run_id="r", world_size=1, checkpoint_id="ckpt-3"))
    req = verified_restart(data, weaver.sign_restart(data), verifier)
    assert (req.run_id, req.world_size, req.checkpoint_id) == ("r", 1, "ckpt-3")
    with pytest.raises(ValueError, match="unsigned"):
        verified_restart(data, None, verifier)
    with pytest.raises(ValueError, match="not the weaver's"):
        verified_restart(data, signing.Signer.generate().sign_restart(data), verifier)
    forged = wire.encode(RestartRequest(job="j", run_id="r", world_size=2, checkpoint_id="ckpt-3"))
    with pytest.raises(ValueError, match="not the weaver's"):
        verified_restart(forged, weaver.sign_restart(data), verifier)  # a signature of other bytes
    # No key, or a malformed one: nothing can be checked, so nothing is carried out.
    for environ in ({}, {env.WEAVER_PUBKEY: "not-hex"}):
        assert weaver_verifier(environ) is None
        with pytest.raises(ValueError, match="no weaver public key"):
            verified_restart(data, weaver.sign_restart(data), weaver_verifier(environ))
