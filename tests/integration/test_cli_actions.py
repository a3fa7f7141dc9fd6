"""The interactive-training CLI against a real 2-rank `torchloom run --ui` job: knobs, devices, journal,
rejected rollback and fault injection, checkpoint listing. Every CLI call is a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import EXAMPLE, unbound_env, wait_status
from tests.integration.helpers import cli as _cli


def _poll_json(args: list[str], env: dict[str, str], proc: subprocess.Popen[str], ok: Any) -> dict[str, Any]:
    """Run a `--json` CLI command until `ok(result)` holds (deadline 120 s)."""
    deadline = time.monotonic() + 120.0
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"torchloom run exited early with {proc.returncode}"
        res = _cli(*args, env=env, timeout_s=30)
        last = res.stdout + res.stderr
        if res.returncode == 0:
            data: dict[str, Any] = json.loads(res.stdout)
            if ok(data):
                return data
        time.sleep(0.2)
    raise AssertionError(f"{args} never satisfied the condition: {last}")


def _follow_then_ctrl_c(env: dict[str, str], command_id: str) -> None:
    """`journal --follow` and `journal --command ID --follow` end on Ctrl-C, even started with SIGINT
    ignored (as a background job of a non-interactive shell is): the first with 0 once it printed the
    journal so far, the second (an id never submitted) with 3 and "unknown"."""
    for args, code in ((["--follow", "--json"], 0), (["--command", "0" * 32, "--follow", "--json"], 3)):
        follower = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                'trap "" INT; exec "$0" -m torchloom.app.cli journal "$@"',
                sys.executable,
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follower.stdout is not None
            if code == 0:  # following: the entries so far came first
                line = follower.stdout.readline()
                while line and command_id not in line:
                    line = follower.stdout.readline()
                assert command_id in line, follower.stderr.read() if follower.stderr else ""
            else:
                time.sleep(1.0)  # connected and waiting (an early Ctrl-C ends it the same way)
            follower.send_signal(signal.SIGINT)
            out, err = follower.communicate(timeout=30)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.communicate(timeout=10)
        assert follower.returncode == code, (args, follower.returncode, err)
        if code == 3:
            assert json.loads(out)["status"] == "unknown", out


@pytest.fixture
def run_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return unbound_env(subprocess_env, "TORCHLOOM_ALLOW_FAULT_INJECTION", OMP_NUM_THREADS="1")


@pytest.mark.timeout(300)
def test_action_commands_against_a_running_job(tmp_path: Path, run_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "torchloom.app.cli", "run", "--ui"),
            *("--job", "acts", "--nproc-per-node", "2"),
            *(str(EXAMPLE), "--steps", "100000", "--step-sleep", "0.03", "--out", str(tmp_path / "out")),
        ],
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Waited for in this process (a CLI per poll takes a core from the starting job); the CLI
        # polls below then see what they wait for at once.
        wait_status(
            run_env,
            "two ranks with knobs and device health",
            lambda s: (
                s.jobs
                and len(s.jobs[0].ranks) == 2
                and s.jobs[0].knobs
                and all(r.device is not None for r in s.jobs[0].ranks)
            ),
            proc=proc,
        )
        _poll_json(
            ["status", "--json"], run_env, proc, lambda d: bool(d["jobs"]) and len(d["jobs"][0]["ranks"]) == 2
        )

        knobs = _poll_json(["knobs", "--json"], run_env, proc, lambda d: bool(d["knobs"]))
        lr = next(k for k in knobs["knobs"] if k["name"] == "lr")
        assert {"name", "type", "min", "max", "value", "description"} <= set(lr)
        assert lr["type"] == "float" and lr["value"] == pytest.approx(1e-3)
        assert lr["max"] is not None and lr["min"] is not None

        # The first heartbeats may precede the first device sample: wait for both ranks' health.
        devices = _poll_json(
            ["devices", "--json"],
            run_env,
            proc,
            lambda d: len(d["devices"]) == 2 and all(x["health"] for x in d["devices"]),
        )
        assert [d["rank"] for d in devices["devices"]] == [0, 1]
        for d in devices["devices"]:
            assert d["job"] == "acts" and d["state"] == "healthy" and d["pid"] > 0 and d["host"]
            assert {"device", "local_rank", "reason", "health"} <= set(d)
            assert "healthy" in d["health"] and "xids" in d["health"]

        res = _cli("set", "lr=0.002", "--json", env=run_env)
        assert res.returncode == 0, res.stdout + res.stderr
        set_outcome = json.loads(res.stdout)
        journal = _poll_json(
            ["journal", "--json"],
            run_env,
            proc,
            lambda d: any(e.get("command_id") == set_outcome["command_id"] for e in d["entries"]),
        )
        entry = next(e for e in journal["entries"] if e.get("command_id") == set_outcome["command_id"])
        assert entry["type"] == "outcome" and entry["kind"] == "set" and entry["status"] == "applied"
        assert entry["values"] == {"lr": 0.002} and entry["job"] == "acts" and entry["seq"] >= 1
        assert entry["issuer"]["kind"] == "cli" and "@" in entry["issuer"]["identity"]
        steps = {a["rank"]: a["step"] for a in set_outcome["applied"]}
        assert [(r["rank"], r["step"], r["status"]) for r in entry["results"]] == [
            (0, steps[0], "applied"),
            (1, steps[1], "applied"),
        ]

        _follow_then_ctrl_c(run_env, set_outcome["command_id"])

        res = _cli("rollback", "nosuch", "--json", env=run_env)
        assert res.returncode == 2, res.stdout + res.stderr
        body = json.loads(res.stdout)
        assert body["status"] == "rejected" and "'nosuch' does not exist" in body["reason"]
        assert "checkpoints" in body["reason"]  # names the known ones (or says there are none yet)

        res = _cli("fault", "inject", "--rank", "1", "--xid", "79", env=run_env)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "--allow-fault-injection" in res.stderr

        res = _cli("checkpoint", "--tag", "warm", "--json", env=run_env)
        ckpt = json.loads(res.stdout)
        if res.returncode == 2 and "not supported" in (ckpt["reason"] or ""):
            pytest.skip(f"the threadlet does not checkpoint yet: {ckpt['reason']}")
        assert res.returncode == 0, res.stdout + res.stderr
        listed = _cli("checkpoints", "--json", env=run_env)
        assert listed.returncode == 0, listed.stderr
        found = [c for c in json.loads(listed.stdout)["checkpoints"] if c["tag"] == "warm"]
        assert len(found) == 1 and found[0]["step"] == ckpt["applied"][0]["step"]
        rejected = _cli("rollback", "nosuch", env=run_env)
        assert rejected.returncode == 2 and "warm" in rejected.stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=90)
    assert "torchloom UI: http://127.0.0.1:" in err, err[-2000:]
