"""The weaver's configuration: one frozen dataclass, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torchloom import defaults, env, subjects
from torchloom.credentials import ClientAuth, Role, inbox_prefix
from torchloom.policy import PolicyMode, parse_mode
from weaver import rules
from weaver.admission import Limits
from weaver.grpc_api import TlsFiles, is_loopback
from weaver.health_policy import DEFAULT_DEAD_AFTER_S, HealthPolicy
from weaver.metrics import check_bind as check_metrics_bind
from weaver.rules import Policy

_LIMITS = Limits()  # the defaults


def _positive(name: str, value: float, *, upper: float) -> None:
    if not (math.isfinite(value) and 0.0 < value <= upper):
        raise ValueError(f"{name}={value!r} rejected: must be in (0, {upper:g}]")


@dataclass(frozen=True, kw_only=True, slots=True)
class WeaverConfig:
    """How the weaver connects and when it gives up on ranks and commands.

    Attributes:
        nats_url: the NATS server (e.g. nats://127.0.0.1:4222).
        nats_credentials: how the weaver authenticates to NATS (the control plane's weaver nkey,
            torchloom/credentials.py); None connects without a credential (an open server).
        grpc_addr: where the gRPC Control service listens, `host:port`; port 0 picks a free one.
        dead_after_s: a rank whose last heartbeat is older than this is dead.
        command_timeout_s: how long a submit waits for every rank when the request names no timeout.
        journal: publish final outcomes and job events to the JetStream journal.
        liveness_interval_s: how often dead ranks are looked for.
        watch_queue_size: events buffered per gRPC watcher before the oldest are dropped.
        nats_timeout_s: deadline of every single NATS operation (publish ack, stream lookup).
        replicas: JetStream replicas of the streams (1 for a single server).
        hung_after_s: a running rank whose step has not moved for this long is hung.
        straggler_factor: a rank whose step time is above this multiple of the other ranks' median
            is a straggler.
        health_policy: what rank health problems trigger: "reconfigure" (checkpoint, restart,
            rescale), "pause" (pause the job and alert) or "alert" (events only).
        signing_key_file: the Ed25519 key every command is signed with (created 0600 when absent);
            None: `$TORCHLOOM_HOME/controlplane/secrets/signing.key` (torchloom.signing).
        max_jobs, max_ranks_per_job, max_ranks_total, job_evict_after_s: bounds on what the weaver
            holds (see `weaver.admission.Limits`).
        acks_consumer: the durable JetStream consumer this weaver reads acks through; a restarted
            weaver takes up where its predecessor of the same name stopped. Two weavers running at
            once on one NATS need different names (each then sees every ack).
        acks_take_over: replace the acks consumer when it is still bound to another subscription (a
            predecessor that lost the lease but whose connection the server has not dropped yet:
            stalled, cut off); set by the standby path once this weaver holds the lease. Off, such a
            start fails ("consumer is already bound"), so a second weaver never steals the feed.
        grpc_tokens_file: the bearer tokens the gRPC service accepts (torchloom/tokens.py; created
            0600 with fresh tokens when absent); None: `$TORCHLOOM_HOME/controlplane/secrets/
            grpc-tokens.json`.
        grpc_tls_cert_file, grpc_tls_key_file: PEM certificate chain and key of the gRPC service;
            both or neither, and required when `grpc_addr` is not a loopback address.
        api_submit_identity: the issuer identity of every submit that arrives over NATS
            (api.submit), and who decided every proposal answered there (api.decide). Set it
            ("ui-operator") only when the NATS server enforces torchloom's role table, where no other
            client may publish there; None keeps the identity the request claims (a bus torchloom
            does not secure cannot say who sent it; a decision is then "nats:unauthenticated").
        autopilot_policy: the autopilot policy (a TOML file, or "default" for the shipped one) of
            every job that was given none of its own (`torchloom policy set`); None: no rules.
        metrics_port: serve Prometheus metrics on `metrics_host:metrics_port` at /metrics
            (`weaver.metrics`); 0 picks a free port; None (the default) serves none.
        metrics_host: where the metrics endpoint binds; loopback unless `metrics_allow_remote`.
        metrics_allow_remote: let `metrics_host` be a non-loopback address (the endpoint has no
            token: expose it only to a network Prometheus may reach and nobody else).
    """

    nats_url: str = defaults.NATS_URL
    nats_credentials: ClientAuth | None = None
    grpc_addr: str = defaults.GRPC_BIND_ADDR
    dead_after_s: float = DEFAULT_DEAD_AFTER_S
    command_timeout_s: float = defaults.COMMAND_TIMEOUT_S
    journal: bool = True
    liveness_interval_s: float = 0.1
    watch_queue_size: int = 1024
    nats_timeout_s: float = 5.0
    replicas: int = 1
    hung_after_s: float = 10.0
    straggler_factor: float = 2.0
    health_policy: PolicyMode = defaults.HEALTH_POLICY
    signing_key_file: str | None = None
    max_jobs: int = _LIMITS.max_jobs
    max_ranks_per_job: int = _LIMITS.max_ranks_per_job
    max_ranks_total: int = _LIMITS.max_ranks_total
    job_evict_after_s: float = _LIMITS.job_evict_after_s
    acks_consumer: str = subjects.ACKS_CONSUMER
    acks_take_over: bool = False
    grpc_tokens_file: str | None = None
    grpc_tls_cert_file: str | None = None
    grpc_tls_key_file: str | None = None
    api_submit_identity: str | None = None
    autopilot_policy: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_allow_remote: bool = False

    def __post_init__(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(
                f"nats_url={self.nats_url!r} rejected: expected nats://HOST:PORT (or tls://, ws://, wss://)"
            )
        host, sep, port = self.grpc_addr.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"grpc_addr={self.grpc_addr!r} rejected: expected HOST:PORT with PORT in [0, 65535]"
            )
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise ValueError(
                "grpc_tls_cert_file and grpc_tls_key_file rejected: give both (certificate, key) or neither"
            )
        if self.grpc_tls_cert_file is None and not is_loopback(host):
            raise ValueError(
                f"grpc_addr={self.grpc_addr!r} rejected: off loopback the gRPC service needs TLS "
                "(grpc_tls_cert_file and grpc_tls_key_file); bind 127.0.0.1:PORT for local use"
            )
        _positive("dead_after_s", self.dead_after_s, upper=3600.0)
        _positive("command_timeout_s", self.command_timeout_s, upper=24 * 3600.0)
        _positive("liveness_interval_s", self.liveness_interval_s, upper=60.0)
        _positive("nats_timeout_s", self.nats_timeout_s, upper=600.0)
        if not 1 <= self.watch_queue_size <= 1_000_000:
            raise ValueError(f"watch_queue_size={self.watch_queue_size!r} rejected: must be in [1, 1000000]")
        if not 1 <= self.replicas <= defaults.MAX_STREAM_REPLICAS:
            raise ValueError(
                f"replicas={self.replicas!r} rejected: must be in [1, {defaults.MAX_STREAM_REPLICAS}]"
            )
        _positive("hung_after_s", self.hung_after_s, upper=24 * 3600.0)
        if not (math.isfinite(self.straggler_factor) and 1.0 < self.straggler_factor <= 1000.0):
            raise ValueError(f"straggler_factor={self.straggler_factor!r} rejected: must be in (1, 1000]")
        for name, low, high in (
            ("max_jobs", 1, 100_000),
            ("max_ranks_per_job", 1, 1_000_000),
            ("max_ranks_total", 1, 10_000_000),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} rejected: must be an integer in [{low}, {high}]")
        _positive("job_evict_after_s", self.job_evict_after_s, upper=30 * 24 * 3600.0)
        subjects.check_token("acks_consumer", self.acks_consumer)
        if self.metrics_port is not None:
            check_metrics_bind(self.metrics_host, self.metrics_port, allow_remote=self.metrics_allow_remote)
        # A name given as text ("pause") becomes the enum; anything else is refused naming the choices.
        object.__setattr__(self, "health_policy", parse_mode(self.health_policy, name="health_policy"))
        if self.autopilot_policy is not None:
            self.autopilot()  # a bad file is refused now, naming the field, not at the first report

    def autopilot(self) -> Policy | None:
        """The autopilot policy `autopilot_policy` names, read and checked (None without one).

        Raises:
            PolicyError: the file cannot be read or is not a valid policy.
        """
        return None if self.autopilot_policy is None else rules.load(self.autopilot_policy)

    def policy(self) -> HealthPolicy:
        """The health policy these thresholds describe."""
        return HealthPolicy(
            mode=self.health_policy,
            dead_after_s=self.dead_after_s,
            hung_after_s=self.hung_after_s,
            straggler_factor=self.straggler_factor,
            # A hung rank is restarted after a grace period of at least a minute.
            hung_restart_after_s=max(60.0, self.hung_after_s),
        )

    def limits(self) -> Limits:
        """The bounds on jobs and ranks these settings describe."""
        return Limits(
            max_jobs=self.max_jobs,
            max_ranks_per_job=self.max_ranks_per_job,
            max_ranks_total=self.max_ranks_total,
            job_evict_after_s=self.job_evict_after_s,
        )

    @classmethod
    def from_env(cls, *, nats_url: str | None = None, grpc_addr: str | None = None) -> WeaverConfig:
        """Build a config: explicit arguments, then TORCHLOOM_NATS_URL / TORCHLOOM_GRPC, then defaults;
        the NATS credential from TORCHLOOM_NATS_CREDS_FILE (none when unset), the streams' replicas
        from TORCHLOOM_NATS_REPLICAS (1 when unset).

        Raises:
            CredentialsError: that file is missing, readable by others or not a credential.
            ValueError: TORCHLOOM_NATS_REPLICAS is not a whole number in [1, 5].
        """
        creds = env.get(env.NATS_CREDS_FILE)
        return cls(
            replicas=env.get_int(env.NATS_REPLICAS, 1, within=(1, defaults.MAX_STREAM_REPLICAS)),
            nats_url=nats_url or env.get(env.NATS_URL) or defaults.NATS_URL,
            nats_credentials=ClientAuth.from_file(creds, inbox_prefix=inbox_prefix(Role.WEAVER))
            if creds
            else None,
            grpc_addr=grpc_addr or env.get(env.GRPC_ADDR) or defaults.GRPC_BIND_ADDR,
            signing_key_file=env.get(env.SIGNING_KEY_FILE),
        )

    def tls(self) -> TlsFiles | None:
        """The gRPC service's certificate and key, when configured."""
        if self.grpc_tls_cert_file is None or self.grpc_tls_key_file is None:
            return None
        return TlsFiles(cert_file=Path(self.grpc_tls_cert_file), key_file=Path(self.grpc_tls_key_file))
