"""WeaverConfig checks its fields and names the bound when one is wrong."""

from __future__ import annotations

import pytest

from weaver.config import WeaverConfig


def test_defaults_are_valid() -> None:
    c = WeaverConfig()
    assert (c.grpc_addr, c.dead_after_s, c.command_timeout_s, c.journal) == ("127.0.0.1:0", 0.8, 30.0, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nats_url": "localhost:4222"}, "expected nats://HOST:PORT"),
        ({"grpc_addr": "nohost"}, "expected HOST:PORT"),
        ({"grpc_addr": "127.0.0.1:70000"}, "PORT in [0, 65535]"),
        ({"dead_after_s": 0.0}, "dead_after_s=0.0 rejected: must be in (0, 3600]"),
        ({"command_timeout_s": float("nan")}, "command_timeout_s=nan rejected"),
        ({"watch_queue_size": 0}, "watch_queue_size=0 rejected: must be in [1, 1000000]"),
        ({"hung_after_s": -1.0}, "hung_after_s=-1.0 rejected: must be in (0, 86400]"),
        ({"straggler_factor": 1.0}, "straggler_factor=1.0 rejected: must be in (1, 1000]"),
        (
            {"health_policy": "panic"},
            "health_policy='panic' rejected: expected one of reconfigure, pause, alert",
        ),
    ],
)
def test_bad_fields_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        WeaverConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_from_env_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLOOM_NATS_URL", "nats://10.0.0.1:4222")
    assert WeaverConfig.from_env().nats_url == "nats://10.0.0.1:4222"
    assert WeaverConfig.from_env(nats_url="nats://127.0.0.1:1").nats_url == "nats://127.0.0.1:1"
