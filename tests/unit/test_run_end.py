"""A run's end without processes: what torchrun's result file says (written and read back), the
`run_ended` event the supervisor makes of it, and the weaver marking an ended run's ranks finished."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tests.unit.factories import heartbeat
from torchloom import naming
from torchloom.app import torchrun_result
from torchloom.app.supervisor import end_report
from torchloom.messages import JobEvent, RankState
from weaver import liveness
from weaver.model import WeaverState
from weaver.telemetry import mark_run_ended


def _result(*failures: torchrun_result.Failure, sig: str = "") -> torchrun_result.TorchrunResult:
    return torchrun_result.TorchrunResult(failures=failures, signal=sig)


KILLED = torchrun_result.Failure(rank=1, local_rank=1, exitcode=-9, pid=42, host="node-a", time_s=10)
RAISED = torchrun_result.Failure(rank=0, local_rank=0, exitcode=3, pid=41, host="node-a", time_s=11)


def test_only_torchrun_is_wrapped() -> None:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py"]
    wrapped = torchrun_result.wrap(argv, Path("/r/x.json"))
    assert wrapped == [sys.executable, "-m", torchrun_result.MODULE, "/r/x.json", *argv[3:]]
    assert torchrun_result.wrap(["true"], Path("/r/x.json")) == ["true"]


def test_a_result_file_reads_back_and_a_bad_one_is_not_known(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    assert torchrun_result.read(path) is None  # torchrun wrote none (killed, or not wrapped)
    failure = {"rank": 1, "local_rank": 1, "exitcode": -9, "pid": 42, "host": "node-a", "time_s": 10}
    path.write_text(json.dumps({"failures": [failure], "signal": ""}))
    got = torchrun_result.read(path)
    assert got is not None and got.first == KILLED and got.first.signal == "SIGKILL"
    path.write_text(json.dumps({"failures": [{"rank": "x"}]}))
    assert torchrun_result.read(path) is None


def test_a_killed_rank_is_named_with_its_signal_pid_and_host() -> None:
    message, attrs = end_report("r1", 1, 1, None, _result(KILLED, RAISED))
    assert attrs["exit_status"] == "1" and attrs["torchrun_exit_code"] == "1"
    assert (attrs["failed_rank"], attrs["failed_local_rank"], attrs["failed_signal"]) == ("1", "1", "SIGKILL")
    assert (attrs["failed_pid"], attrs["failed_host"], attrs["failed_ranks"]) == ("42", "node-a", "0,1")
    assert "failed_exit_code" not in attrs
    assert message == (
        "run r1 ended with exit status 1: rank 1 (local rank 1, pid 42 on node-a) failed first: "
        "killed by SIGKILL"
    )


def test_a_rank_that_exited_with_a_code_is_named_with_it() -> None:
    _, attrs = end_report("r1", 1, 1, None, _result(RAISED))
    assert attrs["failed_exit_code"] == "3" and "failed_signal" not in attrs


def test_a_clean_end_and_a_stop_name_no_failed_rank() -> None:
    message, attrs = end_report("r1", 0, 0, None, _result())
    assert message == "run r1 ended with exit status 0" and attrs == {
        "exit_status": "0",
        "torchrun_exit_code": "0",
    }
    message, attrs = end_report("r1", 143, 1, signal.SIGTERM, _result(sig="SIGTERM"))
    assert attrs["stopped_by"] == "SIGTERM" and "failed_rank" not in attrs
    assert message == "run r1 ended with exit status 143: stopped by SIGTERM on the launcher"


def test_a_torchrun_killed_by_a_signal_says_so_and_an_unknown_failure_says_it_is_unknown() -> None:
    message, attrs = end_report("r1", 137, -9, None, None)
    assert attrs["torchrun_signal"] == "SIGKILL" and "torchrun was killed by SIGKILL" in message
    message, _ = end_report("r1", 1, 1, None, None)
    assert message.endswith("torchrun did not say which rank failed")


def _ended(run: str, kind: str = naming.RUN_ENDED) -> JobEvent:
    return JobEvent(job="j", run_id=run, kind=kind, message="", time_s=1.0, attrs={"exit_status": "1"})


def test_the_ranks_of_an_ended_run_are_finished_at_once() -> None:
    state = WeaverState()
    for rank in (0, 1):
        liveness.observe_heartbeat(state, heartbeat(rank, job="j", run="r1", world=2), 1.0)
    assert mark_run_ended(state, _ended("r9")) == ()  # another run: stale
    assert mark_run_ended(state, _ended("r1", kind=naming.RUN_STOPPING)) == ()
    assert mark_run_ended(state, _ended("r1")) == (0, 1)
    ranks = state.jobs["j"].ranks
    assert all(e.heartbeat.state is RankState.FINISHED and e.finished_reported for e in ranks.values())
    assert mark_run_ended(state, _ended("r1")) == ()  # once


def test_an_end_of_the_launcher_s_run_covers_a_torchrun_restart_inside_it() -> None:
    state = WeaverState()
    liveness.observe_heartbeat(state, heartbeat(0, job="j", run="r1-a1", world=1), 1.0)
    assert mark_run_ended(state, _ended("r1")) == (0,)


def test_a_failed_rank_is_not_called_finished() -> None:
    """The rank whose failure ended the run (killed) did not finish: only its peers are marked (torchrun
    stopped them after it), and it stays what liveness makes of it (dead once its heartbeats are old)."""
    state = WeaverState()
    for rank in (0, 1):
        liveness.observe_heartbeat(state, heartbeat(rank, job="j", run="r1", world=2), 1.0)
    ended = JobEvent(
        job="j",
        run_id="r1",
        kind=naming.RUN_ENDED,
        attrs={"exit_status": "1", "failed_rank": "1", "failed_ranks": "0,1"},  # 0: stopped by torchrun
    )
    assert mark_run_ended(state, ended) == (0,)
    ranks = state.jobs["j"].ranks
    assert ranks[0].heartbeat.state is RankState.FINISHED
    assert ranks[1].heartbeat.state is RankState.RUNNING
