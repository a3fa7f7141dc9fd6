"""`torchloom run` of a real 2-rank torchrun job, steered by `torchloom set` from another process.

The second process gets no flags at all: it finds the weaver through $TORCHLOOM_HOME/weaver.json.
The ranks' own records are the ground truth for "applied on every rank at the same step".
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.helpers import EXAMPLE, status_job, unbound_env
from tests.integration.helpers import cli as _cli
from torchloom import discovery


def _lr_change_steps(path: Path) -> list[tuple[int, float]]:
    """(step, new lr) at every step whose record's lr differs from the previous step's."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        (cur["step"], cur["lr"]["body"])
        for prev, cur in itertools.pairwise(records)
        if prev["lr"] != cur["lr"]
    ]


@pytest.fixture
def run_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    # The control plane `torchloom run` starts exits 1 s after its last job (default 10 s).
    return unbound_env(subprocess_env, OMP_NUM_THREADS="1", TORCHLOOM_CONTROLPLANE_IDLE_S="1")


def _control_plane_gone(home: Path) -> bool:
    """Wait (up to 30 s) until the control plane has exited and removed its discovery file."""
    deadline = time.monotonic() + 30.0
    while (home / "weaver.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not (home / "weaver.json").exists()


def _wait_or_abort(
    proc: subprocess.Popen[str], timeout_s: float, readers: list[threading.Thread], err: list[str]
) -> None:
    """Wait for `proc` to exit; one still running after `timeout_s` is aborted (SIGABRT, which
    PYTHONFAULTHANDLER turns into every thread's stack on stderr) and the test fails showing where
    it was stuck, its signal dispositions and its stderr."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        signals = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=10)
        pytest.fail(f"still running {timeout_s} s after SIGINT; {signals}; stderr:\n{''.join(err)}")
    for reader in readers:
        reader.join(timeout=10)


@pytest.mark.timeout(300)
def test_run_then_set_from_another_process_applies_at_one_step(
    tmp_path: Path, tl_home: Path, run_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torchloom.app.cli",
            "run",
            "--job",
            "clitest",
            "--nproc-per-node",
            "2",
            str(EXAMPLE),
            "--steps",
            "1000000",  # far more than the test needs: its `stop` ends the job
            "--step-sleep",
            "0.03",
            "--out",
            str(out),
        ],
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher: subprocess.Popen[str] | None = None
    try:
        job = status_job(run_env, 5, proc=proc)
        # Started with SIGINT ignored, as a background job of a non-interactive shell inherits it
        # (the likely cause of CI's watches that outlived their SIGINT): Ctrl-C must end a watch all
        # the same. PYTHONFAULTHANDLER: a watch that does not end is aborted and shows every
        # thread's stack.
        watcher = subprocess.Popen(
            ["/bin/sh", "-c", 'trap "" INT; exec "$0" -m torchloom.app.cli watch', sys.executable],
            env={**run_env, "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watched: list[str] = []
        watch_err: list[str] = []
        # Both pipes are drained as the watch writes: a full pipe nobody reads would block it.
        readers = [
            threading.Thread(target=lambda pipe=pipe, into=into: into.extend(pipe), daemon=True)
            for pipe, into in ((watcher.stdout, watched), (watcher.stderr, watch_err))
        ]
        for reader in readers:
            reader.start()
        assert job["job"] == "clitest" and job["world_size"] == 2
        assert {r["knobs"]["lr"] for r in job["ranks"]} == {0.001}
        # The watch sees only what happens after it subscribed: wait for its first metrics line, or
        # the outcome of a `set` sent while it was still starting would never reach it.
        streaming = time.monotonic() + 60.0
        while not any("metrics clitest" in line for line in watched):
            assert watcher.poll() is None and time.monotonic() < streaming, "watch printed no metrics"
            time.sleep(0.05)

        applied = _cli("set", "lr=0.003", "--json", env=run_env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        outcome = json.loads(applied.stdout)
        assert set(outcome) == {"command_id", "status", "reason", "applied"}
        assert outcome["status"] == "applied" and outcome["reason"] is None
        assert [a["rank"] for a in outcome["applied"]] == [0, 1]
        step = outcome["applied"][0]["step"]
        assert outcome["applied"][1]["step"] == step

        # The watch streams metrics of both ranks and the outcome; Ctrl-C ends it quietly.
        wanted = [
            "metrics clitest rank 0 step",
            "metrics clitest rank 1 step",
            f"outcome applied: command {outcome['command_id']}",
        ]
        deadline = time.monotonic() + 60.0
        while not all(any(w in line for line in watched) for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.send_signal(signal.SIGINT)
        _wait_or_abort(watcher, 30.0, readers, watch_err)
        assert watcher.returncode == 0, "".join(watch_err)
        for w in wanted:
            assert any(w in line for line in watched), (w, watched[-5:])

        for action in ("pause", "resume"):
            res = _cli(action, "--json", env=run_env)
            assert res.returncode == 0, (action, res.stdout, res.stderr)
            assert json.loads(res.stdout)["status"] == "applied"

        bad = {
            "lr=abc": "expected a float",
            "lr=-1": "must be in (0, 10]",
            "lr=nan": "must be a finite number",
            "nosuch=1": "unknown knob 'nosuch'",
        }
        for word, message in bad.items():
            res = _cli("set", word, "--json", env=run_env)
            assert res.returncode == 2, (word, res.stdout, res.stderr)
            body = json.loads(res.stdout)
            assert body["status"] == "rejected" and body["applied"] == []
            assert message in body["reason"], (word, body["reason"])
            assert message in res.stderr

        # The job runs until told to stop, so no command above raced the end of its loop.
        stopped = _cli("stop", "--json", env=run_env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        _stdout, stderr = proc.communicate(timeout=240)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=10)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "NATS nats://127.0.0.1:" in stderr and "gRPC 127.0.0.1:" in stderr

    for rank in (0, 1):
        decided = json.loads((out / f"rank{rank}.applied.json").read_text())
        # Only the valid commands reached the ranks: the weaver rejected the bad ones up front.
        assert [(d["kind"], d["status"]) for d in decided] == [
            ("set", "applied"),
            ("pause", "applied"),
            ("resume", "applied"),
            ("stop", "applied"),
        ]
        assert (decided[0]["command_id"], decided[0]["step"]) == (outcome["command_id"], step)
        # The rank's optimizer used the new lr from exactly that step on, and never before.
        assert _lr_change_steps(out / f"rank{rank}.jsonl") == [(step, 0.003)]
    assert _control_plane_gone(tl_home), "discovery file left behind"


def test_run_without_script_is_a_usage_error(run_env: dict[str, str]) -> None:
    res = _cli("run", "--nproc-per-node", "2", env=run_env)
    assert res.returncode == 2
    assert "no SCRIPT" in res.stderr


def test_run_exits_with_the_jobs_status(tmp_path: Path, run_env: dict[str, str]) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(7)\n")
    res = _cli("run", str(script), env=run_env, timeout_s=120)
    # torchrun reports a failed worker as its own exit status 1.
    assert res.returncode != 0, res.stderr
    assert "exited with status" in res.stderr


def test_run_reuses_a_running_weaver(tmp_path: Path, tl_home: Path, run_env: dict[str, str]) -> None:
    weaver = subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", "weaver"],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        path = tl_home / "weaver.json"
        deadline = time.monotonic() + 30.0
        while not path.exists() and weaver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(path.read_text())
        out = tmp_path / "out"
        res = _cli(
            "run",
            "--job",
            "reuse",
            str(EXAMPLE),
            "--steps",
            "20",
            "--out",
            str(out),
            env=run_env,
            timeout_s=120,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"reusing weaver at gRPC {info['grpc']}" in res.stderr
        assert f"NATS {info['nats_url']}" in res.stderr
        # The job reported to the existing weaver, which still owns the discovery file.
        status = _cli("status", "--json", "--job", "reuse", env=run_env)
        assert status.returncode == 0, status.stderr
        assert [j["job"] for j in json.loads(status.stdout)["jobs"]] == ["reuse"]
        assert json.loads(path.read_text())["pid"] == weaver.pid
    finally:
        weaver.send_signal(signal.SIGTERM)
        try:
            weaver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            weaver.kill()
            weaver.wait(timeout=10)
    assert weaver.returncode == 0


def test_sigint_reaches_the_job_and_everything_stops(
    tmp_path: Path, tl_home: Path, run_env: dict[str, str]
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torchloom.app.cli",
            "run",
            "--job",
            "sig",
            "--nproc-per-node",
            "2",
            str(EXAMPLE),
            "--steps",
            "100000",
            "--step-sleep",
            "0.05",
            "--out",
            str(tmp_path / "out"),
        ],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = status_job(run_env, 2, proc=proc)
        pids = [r["pid"] for r in job["ranks"]]
        info = json.loads((tl_home / "weaver.json").read_text())
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # torchrun stops its workers on the forwarded signal; the run ends with 128 + SIGINT.
    assert proc.returncode == 130, stderr[-2000:]
    assert "exited with status" in stderr
    deadline = time.monotonic() + 30.0
    while any(discovery.pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(discovery.pid_alive(p) for p in pids), "ranks left running"
    assert _control_plane_gone(tl_home)
    deadline = time.monotonic() + 30.0  # its discovery file goes first, then it stops NATS and exits
    while discovery.pid_alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not discovery.pid_alive(info["pid"]), "control plane left running"
    host, port = info["nats_url"].removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1.0):
        pass
