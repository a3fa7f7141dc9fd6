"""The control plane outlives its faults, with real processes: the embedded nats-server killed twice
during a stream of `torchloom set` commands, two jobs sharing one control plane (the first ends, the
second is still steered), and SIGTERM on `torchloom run` under every health policy (exit 143, never a
relaunch). The SIGTERM runs are then read back with `journal --run` after everything has stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import EXAMPLE, finish_cli, kill_tree, port_open, status_job, unbound_env
from tests.integration.helpers import cli as _cli
from torchloom import discovery

IDLE_S = "1"  # the control plane's grace after its last job: short, so a wrong lease would show


@pytest.fixture
def cp_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return unbound_env(
        subprocess_env,
        OMP_NUM_THREADS="1",
        TORCHLOOM_CONTROLPLANE_IDLE_S=IDLE_S,
        TORCHLOOM_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
    )


def _long(out: Path) -> list[str]:
    """The example script, training until stopped."""
    return [str(EXAMPLE), "--steps", "100000", "--step-sleep", "0.03", "--out", str(out)]


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _state(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "controlplane" / "state.json").read_text())
    return data


def _wait(what: str, ok: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.05)


def _applied(out: Path, rank: int) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((out / f"rank{rank}.applied.json").read_text())
    return data


@pytest.mark.timeout(420)
def test_embedded_nats_killed_twice_during_a_stream_of_sets(
    tmp_path: Path, tl_home: Path, cp_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    proc = _run(["--job", "chaos", "--nproc-per-node", "2", *_long(out)], cp_env)
    try:
        status_job(cp_env, 5, proc=proc, job="chaos")
        url = json.loads((tl_home / "weaver.json").read_text())["nats_url"]
        sent: list[tuple[str, float]] = []
        codes: list[int] = []
        for i in range(12):
            if i in (3, 8):
                before = _state(tl_home)["nats_pid"]
                os.kill(before, signal.SIGKILL)
                # Supervised: back on the same address, as a new process on the same store.
                _wait(
                    "nats-server back", lambda b=before: _state(tl_home)["nats_pid"] != b and port_open(url)
                )
            lr = 0.001 + 0.0001 * (i + 1)
            res = _cli("set", f"lr={lr:g}", "--json", "--timeout", "60", env=cp_env, timeout_s=120)
            codes.append(res.returncode)
            assert res.returncode in (0, 3), (i, res.stdout, res.stderr)
            sent.append((json.loads(res.stdout)["command_id"], lr))
        stop = _cli("stop", "--json", "--timeout", "60", env=cp_env, timeout_s=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        err = finish_cli(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert codes == [0] * 12, codes  # every command ends applied, and the CLI says so
    for rank in (0, 1):
        decided = {d["command_id"]: d for d in _applied(out, rank) if d["kind"] == "set"}
        assert [cid for cid, _ in sent if decided.get(cid, {}).get("status") == "applied"] == [
            cid for cid, _ in sent
        ], rank
    # The journal (the weaver's events on the store that survived) records both restarts.
    journal = _cli("journal", "--run", _run_id(err), "--json", env=cp_env, timeout_s=120)
    assert journal.returncode == 0, journal.stderr
    entries = json.loads(journal.stdout)["entries"]
    kinds = [e["kind"] for e in entries if e["type"] == "event"]
    # Once seen in CI: no event at all. Say what the journal held and what the CLI said.
    assert kinds.count("nats_restarted") == 2, (
        kinds,
        len(entries),
        journal.stdout[-2000:],
        journal.stderr[-2000:],
    )


def _run_id(stderr: str) -> str:
    marker = " run "
    line = next(line for line in stderr.splitlines() if "exited with status" in line)
    return line.split(marker, 1)[1].split()[0]


@pytest.mark.timeout(420)
def test_two_jobs_share_one_control_plane_and_the_second_outlives_the_first(
    tmp_path: Path, tl_home: Path, cp_env: dict[str, str]
) -> None:
    first = _run(["--job", "first", str(EXAMPLE), "--steps", "40", "--out", str(tmp_path / "a")], cp_env)
    second_out = tmp_path / "b"
    second = _run(
        ["--job", "second", "--nproc-per-node", "2", *_long(second_out)],
        cp_env,
    )
    try:
        err = finish_cli(first)
        first_ended = time.monotonic()
        assert first.returncode == 0, err[-3000:]
        assert "started weaver" in err or "reusing weaver" in err
        info = discovery.read(tl_home / "weaver.json")
        assert info is not None
        status_job(cp_env, 2, proc=second, job="second")
        # Well past the idle grace since the first job ended (the second one's start usually took
        # longer): the control plane stays for the job that still holds a lease.
        time.sleep(max(0.0, first_ended + 3 * float(IDLE_S) + 1.0 - time.monotonic()))
        assert discovery.pid_alive(info.pid), "the control plane ended with the first job"
        res = _cli("set", "lr=0.005", "--job", "second", "--json", env=cp_env, timeout_s=90)
        assert res.returncode == 0, res.stdout + res.stderr
        assert [a["rank"] for a in json.loads(res.stdout)["applied"]] == [0, 1]
        stop = _cli("stop", "--job", "second", "--json", env=cp_env, timeout_s=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        err = finish_cli(second)
        assert second.returncode == 0, err[-3000:]
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                kill_tree(proc.pid)
    # Its last job gone, the control plane exits on its own, and NATS with it.
    _wait("control plane exit", lambda: not discovery.pid_alive(info.pid), timeout_s=60)
    assert not (tl_home / "weaver.json").exists()
    assert not port_open(info.nats_url)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["reconfigure", "pause", "alert"])
def test_sigterm_ends_the_job_under_every_policy(
    tmp_path: Path, tl_home: Path, cp_env: dict[str, str], policy: str
) -> None:
    out = tmp_path / "out"
    proc = _run(
        ["--job", "term", "--health-policy", policy, "--nproc-per-node", "2", *_long(out)],
        cp_env,
    )
    try:
        job = status_job(cp_env, 5, proc=proc, job="term")
        pids = [r["pid"] for r in job["ranks"]]
        proc.send_signal(signal.SIGTERM)
        err = finish_cli(proc, timeout_s=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    _wait("ranks gone", lambda: not any(discovery.pid_alive(p) for p in pids))
    # Nothing is running any more; the run's journal is read from its store.
    _wait("control plane exit", lambda: discovery.read(tl_home / "weaver.json") is None)
    res = _cli("journal", "--run", job["run_id"], "--json", env=cp_env, timeout_s=120)
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)["entries"]
    assert any(e["kind"] == "run_stopping" for e in entries), [e["kind"] for e in entries]
    runs = {e["run_id"] for e in entries}
    assert runs == {job["run_id"]}, runs  # no `-a1` attempt: nothing was relaunched
    assert not any(e["kind"] == "reconfigure_restarting" for e in entries)
    # The weaver heard the stop and stood down: it planned no restart (nor any other health action)
    # for the ranks that went away, whatever the policy.
    assert any(e["kind"] == "health_standing_down" for e in entries), [e["kind"] for e in entries]
    planned = [e["attrs"].get("action") for e in entries if e["kind"] == "health_action"]
    assert "Restart" not in planned and not any(e["kind"] == "restart" for e in entries), planned
