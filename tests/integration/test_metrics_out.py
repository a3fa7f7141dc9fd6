"""Metrics out by default: the control plane `torchloom run` starts serves the weaver's Prometheus
metrics on a free loopback port, lists the URL in the discovery file (`torchloom metrics-url`), and a
scrape of a running 2-rank job finds its steps, losses, command counts and rule firings. The job asks
for the update-to-weight ratio (`torchloom set report_update_ratio=5`), and a rule on it fires."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import cli, kill_tree, start_cli
from tests.integration.test_autopilot import _until
from tests.integration.test_weaver_metrics import Samples, scrape
from torchloom import discovery

SCRIPT = Path(__file__).parent / "scripts" / "nan_train.py"
JOB = "mjob"
POLICY = """
name = "watched"
[[rule]]
name = "ckpt"
when = "every_steps"
steps = 30
cooldown_s = 0.0
max_per_hour = 1000
do = [{action = "checkpoint"}]

[[rule]]
name = "ratio-alert"
when = "update_ratio"
above = 1e-9
cooldown_s = 0.0
max_per_hour = 1000
do = [{alert = "the update ratio is over its bound"}]
"""


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.timeout(400)
def test_run_serves_metrics_and_a_scrape_finds_steps_losses_commands_and_rule_firings(
    tmp_path: Path, run_alone_env: dict[str, str]
) -> None:
    env = dict(run_alone_env, TORCHLOOM_TEST_NAN_AT_STEP="10000000")
    policy = tmp_path / "watched.toml"
    policy.write_text(POLICY)
    out = tmp_path / "out"
    run = ["run", "--policy", str(policy), "--job", JOB, "--nproc-per-node", "2", str(SCRIPT)]
    proc = start_cli(*run, "--steps", "100000", "--out", str(out), env=env)
    try:
        home = Path(env["TORCHLOOM_HOME"])

        def listed() -> bool:
            info = discovery.read(home / discovery.FILE_NAME)
            return info is not None and bool(info.metrics_url)

        # Waited for in this process (a CLI per poll takes a core from the starting control plane).
        _until("the metrics URL in the discovery file", listed, proc)
        res = cli("metrics-url", env=env, timeout_s=30)
        assert res.returncode == 0, res.stderr
        url = res.stdout.strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        assert json.loads((home / "weaver.json").read_text())["metrics_url"] == url

        def training() -> Samples | None:
            got = scrape(url)
            ok = all(value(got, "torchloom_rank_step", job=JOB, rank=r) >= 5 for r in ("0", "1"))
            return got if ok else None

        _until("both ranks' steps in /metrics", training, proc)
        res = cli("set", "report_update_ratio=5", "--job", JOB, "--json", env=env, timeout_s=60)
        assert res.returncode == 0 and json.loads(res.stdout)["status"] == "applied", (res.stdout, res.stderr)

        def fired() -> Samples | None:
            got = scrape(url)
            ok = all(
                value(got, "torchloom_rule_firings_total", job=JOB, rule=rule) >= 1
                for rule in ("ckpt", "ratio-alert")
            )
            # A rank's loss in /metrics is at most 1 s old (with nobody watching, the weaver reads a
            # rank's metrics at most once a second) and ranks held at step 0 for the policy's start
            # commands report none: wait for both ranks' losses, as a scraper would see them.
            losses = all(loss_of(got, r) is not None for r in ("0", "1"))
            return (
                got
                if ok and losses and value(got, "torchloom_commands_submitted_total", job=JOB, issuer="rule")
                else None
            )

        got = _until("both rules' firings in /metrics", fired, proc)
        for rank in ("0", "1"):
            assert value(got, "torchloom_rank_step", job=JOB, rank=rank) > 0
            assert (job_loss := loss_of(got, rank)) is not None
            assert job_loss >= 0
        assert value(got, "torchloom_commands_submitted_total", job=JOB, issuer="cli") == 1
        assert value(got, "torchloom_command_outcomes_total", job=JOB, issuer="cli", status="applied") == 1
        assert value(got, "torchloom_command_latency_seconds_count", job=JOB) >= 2
        # The ratio rule fired on a measured ratio, journaled with its value.
        res = cli("journal", "--job", JOB, "--json", env=env, timeout_s=60)
        events = [e for e in json.loads(res.stdout)["entries"] if e.get("kind") == "rule_fired"]
        ratio = [e for e in events if e["attrs"]["rule"] == "ratio-alert"]
        assert ratio and 0 < float(ratio[0]["attrs"]["value"]) < 1, events
        stopped = cli("stop", "--job", JOB, "--json", env=env, timeout_s=60)
        assert stopped.returncode == 0, stopped.stderr
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]


def loss_of(got: Samples, rank: str) -> float | None:
    """The rank's `torchloom_rank_loss` in a scrape, None when it has none yet."""
    return got.get(("torchloom_rank_loss", frozenset({"job": JOB, "rank": rank}.items())))
