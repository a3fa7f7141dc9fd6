"""The control plane's files without processes: job leases, the run index, the lock, private modes,
and the pure parts of the control plane (config checks, URL redaction, health options on argv)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchloom import discovery
from torchloom.app import controlplane, controlplane_config, runs
from torchloom.app.launcher import parse_health
from torchloom.errors import JobNotFound


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_round_trip_and_one_file_per_launcher(tl_home: Path) -> None:
    mine = runs.Lease(job="j", run_id="r1", pid=os.getpid())
    # Two launchers of one multi-node run on one machine: same run id, two leases.
    other = runs.Lease(job="j", run_id="r1", pid=os.getppid(), started_at_s=mine.started_at_s + 1)
    runs.write_lease(mine)
    runs.write_lease(other)
    assert runs.read_leases() == [mine, other]
    runs.remove_lease(mine)
    assert runs.read_leases() == [other]


def test_sweep_ends_the_leases_of_dead_launchers(tl_home: Path) -> None:
    live = runs.Lease(job="a", run_id="r1", pid=os.getpid())
    dead = runs.Lease(job="b", run_id="r2", pid=_dead_pid())
    runs.write_lease(live)
    runs.write_lease(dead)
    assert runs.sweep_leases() == ([live], [dead])
    assert runs.read_leases() == [live]  # the ended one is gone from disk


def test_malformed_leases_are_skipped(tl_home: Path) -> None:
    runs.leases_dir().mkdir(parents=True)
    (runs.leases_dir() / "x.json").write_text("{not json")
    (runs.leases_dir() / "y.json").write_text('{"job": "bad job!", "run_id": "r", "pid": 1}')
    assert runs.read_leases() == []
    with pytest.raises(ValueError, match="expected"):
        runs.Lease.from_json({"job": "j"})


def test_run_index_finds_by_id_attempt_and_latest(tl_home: Path) -> None:
    first = runs.RunRecord(run_id="r1", job="a", store_dir="/s", nats_url="nats://x:1", started_at_s=1.0)
    second = runs.RunRecord(run_id="r2", job="b", store_dir="/s", nats_url="nats://x:1", started_at_s=2.0)
    runs.record_run(first)
    runs.record_run(second)
    runs.record_run(
        runs.RunRecord(**{**_fields(first), "ended_at_s": 5.0, "exit_code": 143, "last_run_id": "r1-a1"})
    )
    assert runs.find_run(None).run_id == "r2"
    assert runs.find_run(None, job="a").run_id == "r1"
    ended = runs.find_run("r1-a1")
    assert (ended.run_id, ended.ended_at_s, ended.exit_code) == ("r1", 5.0, 143)
    with pytest.raises(JobNotFound, match=r"run 'nope' not found .*r1 \(a\), r2 \(b\)"):
        runs.find_run("nope")
    with pytest.raises(JobNotFound, match="no run of job 'c'"):
        runs.find_run(None, job="c")


def _fields(record: runs.RunRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def test_files_are_private(tl_home: Path) -> None:
    os.chmod(tl_home, 0o755)
    path = discovery.write(discovery.WeaverInfo(pid=os.getpid(), nats_url="nats://a:1", grpc="h:1"))
    lease = runs.write_lease(runs.Lease(job="j", run_id="r", pid=os.getpid()))
    for file in (path, lease):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    for directory in (tl_home, lease.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_discovery_keeps_the_store_and_secrets(tl_home: Path) -> None:
    info = discovery.WeaverInfo(
        pid=os.getpid(), nats_url="nats://a:1", grpc="h:1", store_dir="/s", secrets_dir="/k"
    )
    discovery.write(info)
    assert discovery.read() == info


def test_a_zombie_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while discovery.pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not discovery.pid_alive(proc.pid)  # exited, not yet reaped
    proc.wait()
    assert discovery.pid_alive(os.getpid())


def test_the_lock_is_exclusive_and_try_does_not_wait(tl_home: Path) -> None:
    holder = runs.ControlPlaneLock()
    assert holder.try_acquire()
    with runs.locked(timeout_s=None) as got:
        assert got is False
    with pytest.raises(runs.LockTimeout, match="stayed taken"), runs.locked(timeout_s=0.1):
        pass
    holder.release()
    with runs.locked(timeout_s=0.1) as got:
        assert got is True


def test_redact_hides_url_credentials() -> None:
    text = "cannot reach nats://alice:s3cret@10.0.0.1:4222 or tls://tok@h:1"
    assert controlplane.redact(text) == "cannot reach nats://***@10.0.0.1:4222 or tls://***@h:1"
    assert controlplane.redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_control_plane_config_checks(tmp_path: Path) -> None:
    config = controlplane_config.ControlPlaneConfig(home=tmp_path)
    assert config.idle_exit_s == controlplane_config.IDLE_EXIT_S and config.nats_url is None
    with pytest.raises(ValueError, match=r"idle_exit_s=-1 rejected: must be in \[0, 86400\] or None"):
        controlplane_config.ControlPlaneConfig(home=tmp_path, idle_exit_s=-1)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        controlplane_config.ControlPlaneConfig(home=tmp_path, grpc_addr="nohost")
    with pytest.raises(ValueError, match=r"lease_interval_s=0 rejected"):
        controlplane_config.ControlPlaneConfig(home=tmp_path, lease_interval_s=0)


def test_health_options_survive_the_trip_to_the_control_planes_argv() -> None:
    health = parse_health("30", "3.5", "reconfigure")
    words = health.argv()
    assert words == ["--hung-after", "30.0", "--straggler-factor", "3.5", "--health-policy", "reconfigure"]
    assert parse_health(words[1], words[3], words[5]) == health
    assert parse_health(None, None, None).argv() == []


def test_idle_exit_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(controlplane_config.IDLE_EXIT_ENV, raising=False)
    assert controlplane_config.idle_exit_default() == controlplane_config.IDLE_EXIT_S
    monkeypatch.setenv(controlplane_config.IDLE_EXIT_ENV, "2.5")
    assert controlplane_config.idle_exit_default() == 2.5
