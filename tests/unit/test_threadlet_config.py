"""ThreadletConfig validation and precedence: explicit argument, then TORCHLOOM_* variable, then default."""

from __future__ import annotations

import pytest

from threadlet.config import ThreadletConfig, from_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHLOOM_NATS_URL", "TORCHLOOM_JOB", "TORCHLOOM_RUN_ID", "TORCHLOOM_HEARTBEAT_INTERVAL_S"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_local() -> None:
    cfg = from_env()
    assert cfg == ThreadletConfig()
    assert cfg.local and cfg.job == "default" and cfg.heartbeat_interval_s == 0.2


def test_env_over_default_and_argument_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLOOM_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("TORCHLOOM_JOB", "envjob")
    monkeypatch.setenv("TORCHLOOM_RUN_ID", "envrun")
    monkeypatch.setenv("TORCHLOOM_HEARTBEAT_INTERVAL_S", "0.5")
    cfg = from_env()
    assert (cfg.nats_url, cfg.job, cfg.run_id, cfg.heartbeat_interval_s) == (
        "nats://127.0.0.1:4222",
        "envjob",
        "envrun",
        0.5,
    )
    cfg = from_env(nats_url="nats://h:1", job="argjob", run_id="argrun", heartbeat_interval_s=1.0)
    assert (cfg.nats_url, cfg.job, cfg.run_id, cfg.heartbeat_interval_s) == (
        "nats://h:1",
        "argjob",
        "argrun",
        1.0,
    )
    assert from_env(metrics_interval_s=0.3).metrics_interval_s == 0.3


def test_malformed_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLOOM_HEARTBEAT_INTERVAL_S", "often")
    with pytest.raises(ValueError, match="TORCHLOOM_HEARTBEAT_INTERVAL_S='often' is not a number"):
        from_env()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"heartbeat_interval_s": 0.0},
            r"heartbeat_interval_s=0.0 rejected: must be a finite number in \(0, 60\]",
        ),
        ({"metrics_interval_s": float("nan")}, "metrics_interval_s=nan rejected"),
        ({"agreement_timeout_s": -1.0}, "agreement_timeout_s=-1.0 rejected: must be a finite number in > 0"),
        ({"job": "bad job"}, "job 'bad job' is not valid"),
        ({"run_id": ""}, "run id '' is not valid"),
        ({"nats_url": "localhost:4222"}, "expected a URL like nats://"),
    ],
)
def test_bad_values_name_the_bound(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThreadletConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("every", [0, 100_001, 2.5, True])
def test_max_idle_round_steps_bounds(every: object) -> None:
    with pytest.raises(ValueError, match=r"max_idle_round_steps=.* rejected: .* integer in \[1, 100000\]"):
        ThreadletConfig(max_idle_round_steps=every)  # type: ignore[arg-type]
