"""`torchloom run`'s command line: which words are ours, torchrun's, SCRIPT and the script's own
(`split_run_args` -> `RunSpec`), and what the torchrun child is given (`torchrun_command`, `child_env`).

Pure argument handling: it starts nothing and connects nowhere; torchloom.app.launcher runs the result.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torchloom import discovery, env, naming, signing, subjects, tls
from torchloom.app import join as join_file
from torchloom.app import policy_cmd
from torchloom.app.controlplane_config import stream_replicas
from torchloom.app.health_options import HealthOptions, UsageError, parse_health
from weaver import rules

# torchrun options that take no value (from torch.distributed.run's parser); every other torchrun
# option takes exactly one, given as `--opt VALUE` or `--opt=VALUE`.
TORCHRUN_FLAGS = frozenset(
    {"--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}
    | {"--virtual-local-rank", "--virtual_local_rank"}
)
_TORCHRUN_VALUE_NAMES = (
    "nnodes nproc-per-node rdzv-backend rdzv-endpoint rdzv-id rdzv-conf max-restarts "
    "monitor-interval start-method event-log-handler role log-dir redirects tee "
    "local-ranks-filter duplicate-stdout-filters duplicate-stderr-filters node-rank master-addr "
    "master-port local-addr logs-specs numa-binding signals-to-handle shutdown-timeout"
)
TORCHRUN_VALUE_OPTIONS = frozenset(
    opt for name in _TORCHRUN_VALUE_NAMES.split() for opt in (f"--{name}", f"--{name.replace('-', '_')}")
) | {"-r", "-t"}
# Our own options; they may appear anywhere before SCRIPT, mixed with torchrun's.
RUN_OPTIONS = frozenset(
    {
        "--job",
        "--run-id",
        "--nats",
        "--nats-creds",
        "--grpc",
        "--ui-port",
        "--hung-after",
        "--straggler-factor",
        "--health-policy",
        "--data-root",  # repeatable: every one given is a root
        "--policy",  # autopilot rules: a TOML file or "default" (torchloom.app.policy_cmd)
        "--join",  # another node of a multi-node run: the first node's join file (torchloom.app.join)
        "--listen",  # multi-node across machines: NATS and gRPC on this address, over TLS (torchloom/tls.py)
    }
)
RUN_FLAGS = frozenset({"--ui", "--allow-fault-injection"})
# Options that mean the user chose a rendezvous; without one we add --standalone (a free port).
_RDZV_CHOICES = frozenset(
    {"--standalone", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend"}
    | {"--master-port", "--master_port", "--master-addr", "--master_addr", "--nnodes"}
)
# A fresh run under a policy with start commands or [knobs] holds its ranks at step 0 at most this
# long (TORCHLOOM_START_HOLD_S overrides) for the weaver to send them: normally well under a second.
START_HOLD_S = 30.0
_RDZV_ID = frozenset({"--rdzv-id", "--rdzv_id"})
_NNODES = frozenset({"--nnodes"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """A parsed `torchloom run` command line.

    Attributes:
        job: job name (default: the script's stem).
        nats_url: `--nats`, else None (then TORCHLOOM_NATS_URL, else the embedded server).
        nats_creds: `--nats-creds PATH` for that server: a credential file every party uses, or a
            torchloom secrets directory (each party its role's); else TORCHLOOM_NATS_CREDS_FILE.
        grpc: `--grpc`, else None.
        torchrun_args: options for torch.distributed.run, in the order given, with defaults added.
        script: the training script (or module with -m).
        script_args: everything after SCRIPT, untouched: it belongs to the script.
        run_id: `--run-id`, else derived from torchrun's `--rdzv-id` (so every node of a multi-node
            run reports the same run), else None (a fresh one per launch).
        listen: `--listen HOST`: a control plane started here serves NATS and gRPC on HOST (an
            address of this machine) over TLS, for nodes on other machines; None: loopback.
        join_path: the `--join FILE` path (errors about the file name it).
    """

    job: str
    nats_url: str | None
    grpc: str | None
    torchrun_args: tuple[str, ...]
    script: str
    script_args: tuple[str, ...]
    allow_fault_injection: bool = False
    ui: bool = False
    ui_port: int = 0
    health: HealthOptions = field(default_factory=HealthOptions)
    replay_path: str | None = None
    run_id: str | None = None
    data_roots: tuple[str, ...] = ()  # `--data-root`, absolute; () lets ranks use their working directory
    nats_creds: str | None = None
    policy: str | None = None  # `--policy FILE|default`, checked; its text goes to the weaver at start
    join: join_file.JoinInfo | None = None  # `--join FILE`: the first node's run this node joins
    listen: str | None = None
    join_path: str | None = None

    @property
    def multinode(self) -> bool:
        """Whether torchrun may run this job on more than one node (see `is_multinode`)."""
        return is_multinode(self.torchrun_args)


def _option_value(argv: Sequence[str], i: int, opt: str) -> tuple[str, int]:
    """Return (value, next index) for the option at argv[i], in `--opt VALUE` or `--opt=VALUE` form."""
    word = argv[i]
    if "=" in word:
        return word.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option {opt} expects a value")
    return argv[i + 1], i + 2


def _has_option(args: Sequence[str], names: frozenset[str]) -> bool:
    return any(a.split("=", 1)[0] in names for a in args)


def _value_of(args: Sequence[str], names: frozenset[str]) -> str | None:
    """The value of the last option in `names` (`--opt VALUE` or `--opt=VALUE`), else None."""
    found: str | None = None
    for i, word in enumerate(args):
        name, eq, value = word.partition("=")
        if name in names:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def is_multinode(torchrun_args: Sequence[str]) -> bool:
    """Whether torchrun's options let the job span nodes: `--nnodes` other than 1 (or `1:1`).

    Then torchrun's elastic agents own the group's membership: a lost node is a re-rendezvous of
    the others, not something one node's launcher can restart.
    """
    if _has_option(torchrun_args, frozenset({"--standalone"})):
        return False
    nnodes = _value_of(torchrun_args, _NNODES)
    return nnodes is not None and nnodes not in ("1", "1:1")


def check_run_id(run_id: str) -> str:
    """Return `run_id` when it can name a run, else raise UsageError naming the expected form."""
    try:
        subjects.check_token("--run-id", run_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # A run id must not look like an attempt (`<run>-a<N>`): attempts of it are named that way.
    if naming.is_attempt_id(run_id):
        raise UsageError(
            f"--run-id {run_id!r} rejected: must not end in -a<N> (restarted attempts of a run are "
            "named <run>-a<N>)"
        )
    return run_id


def split_run_args(argv: Sequence[str]) -> RunSpec:
    """Split `torchloom run` arguments into ours, torchrun's, SCRIPT and the script's own.

    Everything after SCRIPT (or after `--`) belongs to the script. Defaults added: `--nproc-per-node 1`
    when absent, and `--standalone` (single node, free port) when no rendezvous option is given
    (`--nnodes`, `--rdzv-endpoint`, `--rdzv-backend`, `--master-addr`/`--master-port`). The run id is
    `--run-id`, else torchrun's `--rdzv-id` when a rendezvous is given, else left to `run` (fresh).

    Raises:
        UsageError: on an unknown option before SCRIPT, a missing value, no SCRIPT or a bad job name.
    """
    ours: dict[str, str] = {}
    data_roots: list[str] = []
    flags: set[str] = set()
    torchrun: list[str] = []
    i = 0
    script: str | None = None
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            if i < len(argv):
                script = argv[i]
            break
        if not word.startswith("-") or word == "-":
            script = word
            break
        opt = word.split("=", 1)[0]
        if word in RUN_FLAGS:
            flags.add(word)
            i += 1
        elif opt == "--data-root":
            root, i = _option_value(argv, i, opt)
            data_roots.append(str(Path(root).expanduser().resolve()))
        elif opt in RUN_OPTIONS:
            ours[opt], i = _option_value(argv, i, opt)
        elif opt in TORCHRUN_FLAGS:
            torchrun.append(word)
            i += 1
        elif opt in TORCHRUN_VALUE_OPTIONS:
            value, i = _option_value(argv, i, opt)
            torchrun += [opt, value]
        else:
            raise UsageError(
                f"unknown option {word!r} before SCRIPT: expected one of "
                f"{', '.join(sorted(RUN_OPTIONS | RUN_FLAGS))} or a torchrun option "
                "(e.g. --nproc-per-node 2); options for the script go after SCRIPT"
            )
    if script is None:
        raise UsageError("no SCRIPT given: expected `torchloom run [options] SCRIPT [ARGS]`")
    script_args = tuple(argv[i + 1 :])
    if not _has_option(torchrun, frozenset({"--nproc-per-node", "--nproc_per_node"})):
        torchrun += ["--nproc-per-node", "1"]
    if not _has_option(torchrun, _RDZV_CHOICES):
        torchrun.insert(0, "--standalone")
    run_id = ours.get("--run-id")
    rdzv_id = _value_of(torchrun, _RDZV_ID)
    if run_id is None and rdzv_id is not None and not _has_option(torchrun, frozenset({"--standalone"})):
        # Every node runs the same command, so the rendezvous id is the one name they all share.
        run_id = rdzv_id
    if run_id is not None:
        check_run_id(run_id)
    default_job = Path(script).stem if not _has_option(torchrun, frozenset({"-m", "--module"})) else script
    job = ours.get("--job") or env.get(env.JOB) or default_job.rsplit(".", 1)[-1]
    try:
        subjects.check_token("job", job)
    except ValueError as exc:
        raise UsageError(f"{exc} (set it with --job NAME)") from None
    joined = _read_join(ours, job=ours.get("--job"), run_id=run_id)
    if joined is not None:
        job, run_id = joined.job, joined.run_id
    if "--nats-creds" in ours and "--nats" not in ours and not env.get(env.NATS_URL):
        raise UsageError(
            "--nats-creds is the credential for a NATS server of yours: give its URL with --nats URL "
            "(the embedded server uses the control plane's own credentials)"
        )
    grpc = ours.get("--grpc")
    if grpc is not None:
        try:
            discovery.check_address(grpc)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    listen = _listen_host(ours, grpc)
    policy = ours.get("--policy")
    if policy is not None:
        try:
            policy_cmd.policy_text(policy)
        except ValueError as exc:
            raise UsageError(f"--policy {policy}: {exc}") from None
    if "--nats" in ours or env.get(env.NATS_URL):
        try:  # read by the control plane this run starts: a bad value is a usage error here, now
            stream_replicas(None)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    ui_port = ours.get("--ui-port", "0")
    if not ui_port.isdigit() or int(ui_port) > 65535:
        raise UsageError(
            f"--ui-port {ui_port!r} rejected: must be an integer in [0, 65535] (0 picks a free port)"
        )
    return RunSpec(
        job=job,
        nats_url=joined.nats_url if joined is not None else ours.get("--nats"),
        grpc=joined.grpc if joined is not None else grpc,
        torchrun_args=tuple(torchrun),
        script=script,
        script_args=script_args,
        allow_fault_injection="--allow-fault-injection" in flags,
        ui="--ui" in flags or "--ui-port" in ours,
        ui_port=int(ui_port),
        health=parse_health(
            ours.get("--hung-after"), ours.get("--straggler-factor"), ours.get("--health-policy")
        ),
        run_id=run_id,
        data_roots=tuple(data_roots),
        nats_creds=str(Path(ours["--nats-creds"]).expanduser().resolve()) if "--nats-creds" in ours else None,
        policy=policy,
        join=joined,
        listen=listen,
        join_path=ours.get("--join"),
    )


def _listen_host(ours: dict[str, str], grpc: str | None) -> str | None:
    """`--listen HOST`, checked: an address of this machine that a certificate can name, for the
    embedded server (not with --join, --nats or TORCHLOOM_NATS_URL); a --grpc must be on it."""
    host = ours.get("--listen")
    if host is None:
        return None
    if "--join" in ours:
        raise UsageError("--listen is for the first node (it serves the control plane): drop it with --join")
    if "--nats" in ours or env.get(env.NATS_URL):
        raise UsageError(
            "--listen is for the embedded NATS server: a server of yours (--nats, TORCHLOOM_NATS_URL) "
            "listens where you configured it"
        )
    try:
        host = tls.check_listen_host(host)
    except tls.TlsError as exc:
        raise UsageError(str(exc)) from None
    if grpc is not None and (grpc.count(",") or grpc.rpartition(":")[0].strip("[]") != host):
        raise UsageError(
            f"--grpc {grpc} rejected: with --listen {host} the weaver serves there too; pass "
            f"--grpc {tls.host_port(host, 0)} (any port) or no --grpc"
        )
    return host


def _read_join(ours: dict[str, str], *, job: str | None, run_id: str | None) -> join_file.JoinInfo | None:
    """`--join FILE`, read and checked for this node's job and run; it names the NATS server, the
    weaver and their credentials, so it goes with none of --nats, --nats-creds and --grpc."""
    path = ours.get("--join")
    if path is None:
        return None
    given = sorted({"--nats", "--nats-creds", "--grpc"} & ours.keys())
    if given:
        raise UsageError(
            f"--join FILE names the NATS server, the weaver and their credentials: drop {', '.join(given)}"
        )
    try:
        return join_file.read(path, job=job, run_id=run_id)
    except join_file.JoinError as exc:
        raise UsageError(str(exc)) from None


def new_run_id() -> str:
    """Return a fresh run id: 12 hex characters of a uuid4."""
    return uuid.uuid4().hex[:12]


def torchrun_command(spec: RunSpec) -> list[str]:
    """Return the argv that launches the job under torchrun with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *spec.torchrun_args,
        spec.script,
        *spec.script_args,
    ]


def child_env(
    spec: RunSpec,
    *,
    run_id: str,
    nats_url: str,
    grpc: str,
    nats_creds_file: str | None = None,
    tls_ca_file: str | None = None,
) -> dict[str, str]:
    """Return the environment of the torchrun child: ours plus the TORCHLOOM_* variables.

    `nats_creds_file` is the ranks' NATS credential (their job's threadlet seed file): its path,
    never the secret, goes into TORCHLOOM_NATS_CREDS_FILE. `tls_ca_file` is the CA of a control
    plane serving over TLS (`--listen`): the ranks trust it for NATS and gRPC.
    """
    out = dict(os.environ)
    out[env.NATS_URL] = nats_url
    out.pop(env.NATS_CREDS_FILE, None)
    if nats_creds_file is not None:
        out[env.NATS_CREDS_FILE] = nats_creds_file
    out.pop(env.NATS_CA_FILE, None)
    if tls_ca_file:
        out[env.NATS_CA_FILE] = out[env.GRPC_CA_FILE] = tls_ca_file
    out[env.JOB] = spec.job
    out[env.RUN_ID] = run_id
    out[env.GRPC_ADDR] = grpc
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.pop(env.ALLOW_FAULT_INJECTION, None)  # only an explicit --allow-fault-injection grants it
    if spec.allow_fault_injection:
        out[env.ALLOW_FAULT_INJECTION] = "1"
    out.pop(env.REPLAY, None)
    if spec.replay_path is not None:
        out[env.REPLAY] = spec.replay_path
    # The ranks verify every command against the weaver's key; the public half is not secret.
    if spec.join is not None:  # the first node's weaver; its gRPC token is the launcher's, not theirs
        out[env.WEAVER_PUBKEY] = spec.join.weaver_pubkey
        out.pop(env.TOKEN, None)
    else:
        out[env.WEAVER_PUBKEY] = signing.load_or_create(signing.default_key_path(out)).public_key
    out.pop(env.VERIFY_COMMANDS, None)
    hold_s = out.pop(env.START_HOLD_S, None) or f"{START_HOLD_S:g}"
    if spec.policy is not None and rules.load(spec.policy).holds_at_start:
        out[env.START_HOLD_S] = hold_s  # the weaver sends the start commands before step 1
    out.pop(env.DATA_ROOTS, None)
    if spec.data_roots:
        out[env.DATA_ROOTS] = os.pathsep.join(spec.data_roots)
    return out
