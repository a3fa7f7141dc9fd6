"""The threadlet's configuration: one frozen dataclass, resolved from arguments, TORCHLOOM_* variables
and defaults, in that order of precedence."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from threadlet import roots
from torchloom import env, signing, subjects

DEFAULT_JOB = "default"
DEFAULT_RUN_ID = "default"


def _positive(name: str, value: float, *, upper: float | None = None) -> None:
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f"(0, {upper:g}]" if upper is not None else "> 0"
        raise ValueError(f"{name}={value!r} rejected: must be a finite number in {bound}")


AGREEMENT_PATHS = ("auto", "gloo")


@dataclass(frozen=True, kw_only=True, slots=True)
class ThreadletConfig:
    """Settings of one rank's threadlet.

    Attributes:
        nats_url: NATS server URL; None runs in local mode (no bus, commands never arrive).
        job: job name the rank reports under (a subject token).
        run_id: run id whose command subject the rank follows (a subject token).
        heartbeat_interval_s: period of heartbeats.
        metrics_interval_s: minimum period between two StepMetrics.
        connect_timeout_s: deadline of one connection attempt (attempts repeat forever).
        reconnect_wait_s: pause between connection and subscription attempts.
        agreement_timeout_s: timeout of the dedicated gloo group used for the step agreement.
        idle_round_period_s: while no rank has a command pending, agreement rounds are spaced
            about this far apart (a round per step while any rank has one, and while paused).
            The spacing in steps is agreed in each round, so every rank keeps the same schedule.
        max_idle_round_steps: upper bound of that spacing in steps.
        round_budget_s: how long a round may take beside training before its result is read;
            the lag in steps (at least one) is agreed in each round.
        max_round_lag_steps: upper bound of that lag, so a command waits at most this many steps
            once every rank has it.
        paused_poll_s: period of agreement rounds while the job is paused.
        start_hold_s: a fresh run (not resumed, not a replay) holds at step 0, paused, until a
            resume is decided (the weaver sends its policy's start commands, then resume) or this
            many seconds of agreed rounds passed; 0 (the default) does not hold.
        close_timeout_s: bound on the final heartbeat and drain in `close()`.
        checkpoint_dir: checkpoint root; checkpoints go to `<root>/<job>/<run_id>/ckpt-<seq>/`.
            None: `$TORCHLOOM_HOME/checkpoints` (default `~/.torchloom/checkpoints`).
        replay_path: a JSON command list to replay instead of following the bus (see
            threadlet/replay.py); heartbeats still go to the bus when nats_url is set.
        fault_injection_allowed: accept `fault_inject` actions (demos and tests only).
        fake_nvml: a FakeNvml fault spec ("xid:79@50"): device health comes from that fake.
        test_delivery_delay_s: TEST ONLY: the bus thread files each received command after a
            random 0..this seconds (seeded by test_delivery_seed and rank), so commands are filed
            out of order and at different times on each rank, to shake out delivery-order races.
        test_delivery_seed: TEST ONLY: the seed of those delays (a test prints it to reproduce).
        agreement: how the step agreement travels: "auto" rides DDP's gradient all-reduce when the
            model is (or is wrapped by) a DistributedDataParallel over the whole world, else a
            dedicated gloo group; "gloo" always uses the gloo group. A replay must use the same
            setting as the run it replays for bit-identical gradients.
        weaver_pubkey: the weaver's Ed25519 public key (64 hex characters, from `torchloom run`):
            a command whose signature does not verify against it is refused and reported.
        verify_commands: False accepts unsigned commands (only on a bus the user alone can reach);
            True with no `weaver_pubkey` refuses every command.
        data_roots: directories `data add` may read from (resolved; default: the working directory).
        nats_creds_file: the NATS credential the rank connects with (its job's threadlet nkey seed
            file from `torchloom run`, or a .creds file; mode 0600); None connects without one.
        nats_ca_file: the PEM CA the NATS server's certificate must verify against (a control plane
            serving over TLS, `torchloom run --listen`); None: plain NATS.
    """

    nats_url: str | None = None
    job: str = DEFAULT_JOB
    run_id: str = DEFAULT_RUN_ID
    heartbeat_interval_s: float = 0.2
    metrics_interval_s: float = 0.1
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 0.25
    agreement_timeout_s: float = 600.0
    idle_round_period_s: float = 0.25
    max_idle_round_steps: int = 1000
    round_budget_s: float = 0.005
    max_round_lag_steps: int = 8
    paused_poll_s: float = 0.02
    start_hold_s: float = 0.0
    close_timeout_s: float = 0.5
    checkpoint_dir: str | None = None
    replay_path: str | None = None
    fault_injection_allowed: bool = False
    fake_nvml: str | None = None
    test_delivery_delay_s: float = 0.0
    test_delivery_seed: int = 0
    agreement: str = "auto"
    weaver_pubkey: str | None = None
    verify_commands: bool = True
    data_roots: tuple[str, ...] = ()
    nats_creds_file: str | None = None
    nats_ca_file: str | None = None

    def __post_init__(self) -> None:
        subjects.check_token("job", self.job)
        subjects.check_token("run id", self.run_id)
        if self.nats_url is not None and "://" not in self.nats_url:
            raise ValueError(
                f"nats_url={self.nats_url!r} rejected: expected a URL like nats://127.0.0.1:4222"
            )
        _positive("heartbeat_interval_s", self.heartbeat_interval_s, upper=60.0)
        _positive("metrics_interval_s", self.metrics_interval_s, upper=60.0)
        _positive("connect_timeout_s", self.connect_timeout_s, upper=300.0)
        _positive("reconnect_wait_s", self.reconnect_wait_s, upper=60.0)
        _positive("agreement_timeout_s", self.agreement_timeout_s)
        _positive("idle_round_period_s", self.idle_round_period_s, upper=10.0)
        every = self.max_idle_round_steps
        if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= 100_000:
            raise ValueError(
                f"max_idle_round_steps={self.max_idle_round_steps!r} rejected: "
                "must be an integer in [1, 100000]"
            )
        _positive("round_budget_s", self.round_budget_s, upper=10.0)
        lag = self.max_round_lag_steps
        if isinstance(lag, bool) or not isinstance(lag, int) or not 1 <= lag <= 64:
            raise ValueError(
                f"max_round_lag_steps={self.max_round_lag_steps!r} rejected: must be an integer in [1, 64]"
            )
        _positive("paused_poll_s", self.paused_poll_s, upper=10.0)
        _positive("close_timeout_s", self.close_timeout_s, upper=60.0)
        if not math.isfinite(self.start_hold_s) or not 0 <= self.start_hold_s <= 3600:
            raise ValueError(f"start_hold_s={self.start_hold_s!r} rejected: must be a number in [0, 3600]")
        delay = self.test_delivery_delay_s
        if not math.isfinite(delay) or not 0 <= delay <= 10:
            raise ValueError(f"test_delivery_delay_s={delay!r} rejected: must be a number in [0, 10]")
        if self.agreement not in AGREEMENT_PATHS:
            raise ValueError(
                f"agreement={self.agreement!r} rejected: expected one of {', '.join(AGREEMENT_PATHS)}"
            )
        if self.weaver_pubkey is not None:
            signing.Verifier(self.weaver_pubkey)  # a malformed key is a clear ValueError now, not later
        object.__setattr__(self, "data_roots", roots.parse_roots(os.pathsep.join(self.data_roots)))

    @property
    def local(self) -> bool:
        """True when there is no bus: the threadlet only counts steps (or replays `replay_path`)."""
        return self.nats_url is None


def from_env(
    *,
    nats_url: str | None = None,
    job: str | None = None,
    run_id: str | None = None,
    heartbeat_interval_s: float | None = None,
    **overrides: Any,
) -> ThreadletConfig:
    """Resolve a config: explicit argument, then TORCHLOOM_* variable, then default.

    Args:
        nats_url: overrides TORCHLOOM_NATS_URL.
        job: overrides TORCHLOOM_JOB.
        run_id: overrides TORCHLOOM_RUN_ID.
        heartbeat_interval_s: overrides TORCHLOOM_HEARTBEAT_INTERVAL_S.
        **overrides: any other ThreadletConfig field. checkpoint_dir, replay_path,
            fault_injection_allowed, fake_nvml, test_delivery_delay_s, weaver_pubkey,
            verify_commands and data_roots default to TORCHLOOM_CHECKPOINT_DIR, TORCHLOOM_REPLAY,
            TORCHLOOM_ALLOW_FAULT_INJECTION (=1), TORCHLOOM_FAKE_NVML, TORCHLOOM_TEST_DELIVERY_DELAY_S,
            TORCHLOOM_WEAVER_PUBKEY, TORCHLOOM_VERIFY_COMMANDS (=0 turns it off),
            TORCHLOOM_TEST_DELIVERY_SEED, TORCHLOOM_AGREEMENT, TORCHLOOM_START_HOLD_S and
            TORCHLOOM_DATA_ROOTS (os.pathsep-separated); nats_creds_file to TORCHLOOM_NATS_CREDS_FILE
            and nats_ca_file to TORCHLOOM_NATS_CA_FILE.

    Raises:
        ValueError: on a malformed variable or an out-of-bounds value.
    """
    hb = (
        heartbeat_interval_s
        if heartbeat_interval_s is not None
        else env.get_float(env.HEARTBEAT_INTERVAL_S, 0.2)
    )
    overrides.setdefault("checkpoint_dir", env.get(env.CHECKPOINT_DIR))
    overrides.setdefault("replay_path", env.get(env.REPLAY))
    overrides.setdefault("fault_injection_allowed", env.get(env.ALLOW_FAULT_INJECTION) == "1")
    overrides.setdefault("fake_nvml", env.get(env.FAKE_NVML))
    overrides.setdefault("test_delivery_delay_s", env.get_float(env.TEST_DELIVERY_DELAY_S, 0.0))
    overrides.setdefault("test_delivery_seed", int(env.get_float(env.TEST_DELIVERY_SEED, 0.0)))
    overrides.setdefault("agreement", env.get(env.AGREEMENT, "auto") or "auto")
    overrides.setdefault("start_hold_s", env.get_float(env.START_HOLD_S, 0.0))
    overrides.setdefault("weaver_pubkey", env.get(env.WEAVER_PUBKEY))
    overrides.setdefault("verify_commands", env.get(env.VERIFY_COMMANDS) != "0")
    overrides.setdefault("data_roots", roots.parse_roots(env.get(env.DATA_ROOTS)))
    overrides.setdefault("nats_creds_file", env.get(env.NATS_CREDS_FILE))
    overrides.setdefault("nats_ca_file", env.get(env.NATS_CA_FILE))
    return ThreadletConfig(
        nats_url=nats_url if nats_url is not None else env.get(env.NATS_URL),
        job=job if job is not None else env.get(env.JOB, DEFAULT_JOB) or DEFAULT_JOB,
        run_id=run_id if run_id is not None else env.get(env.RUN_ID, DEFAULT_RUN_ID) or DEFAULT_RUN_ID,
        heartbeat_interval_s=hb,
        **overrides,
    )
