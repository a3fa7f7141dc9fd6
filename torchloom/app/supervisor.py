"""Launcher-side restart orchestration: run torchrun as attempts of one run, and on the weaver's
RestartRequest stop the current attempt and relaunch it on the healthy ranks from a checkpoint.

The weaver decides (weaver/health_policy.py); the supervisor only carries the restart out and tells
everyone on `subjects.events(job)` where it stands ("reconfigure_*" JobEvents).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from torchloom import bus, env, layout, naming, signing, subjects, wire
from torchloom.app import torchrun_result
from torchloom.credentials import ClientAuth
from torchloom.messages import Heartbeat, JobEvent, RestartRequest

log = logging.getLogger(__name__)

# torchrun's elastic restarts of gloo workers fail at init_process_group ("Gloo connectFullMesh
# failed ... Connection refused") when every attempt reuses the agent's shared rendezvous TCP store.
DISABLE_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
STOP_GRACE_S = 10.0
RUN_STOPPING = naming.RUN_STOPPING  # the JobEvent kind a stop signal on the launcher announces
RUN_ENDED = naming.RUN_ENDED  # the JobEvent kind of the run's end, whatever it was
STOPPING_FLUSH_S = (
    1  # seconds (nats-py takes an int) how long the announcement may hold up forwarding the signal
)
_NPROC = frozenset({"--nproc-per-node", "--nproc_per_node"})
RESTART_REFUSED = "restart_refused"  # the JobEvent kind of a restart request that is not the weaver's
REFUSED_EVENT_EVERY_S = 1.0  # a flood of forged requests gets one event a second (each is logged)


def with_nproc(torchrun_args: Sequence[str], nproc: int) -> tuple[str, ...]:
    """torchrun's options with `--nproc-per-node` set to `nproc` (replaced or added).

    Raises:
        ValueError: nproc < 1.
    """
    if nproc < 1:
        raise ValueError(f"world size {nproc} rejected: a restart needs at least 1 rank")
    out: list[str] = []
    i = 0
    while i < len(torchrun_args):
        word = torchrun_args[i]
        name = word.split("=", 1)[0]
        if name in _NPROC:
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    return (*out, "--nproc-per-node", str(nproc))


def nproc_of(torchrun_args: Sequence[str]) -> int:
    """The `--nproc-per-node` torchrun's options give (1 when absent or not a number, e.g. "gpu")."""
    for i, word in enumerate(torchrun_args):
        name, _, value = word.partition("=")
        if name in _NPROC:
            if not value and i + 1 < len(torchrun_args):
                value = torchrun_args[i + 1]
            return int(value) if value.isdigit() else 1
    return 1


def surviving_devices(visible: Sequence[str], exclude_local_ranks: set[int]) -> list[str]:
    """The device list of the next attempt: `visible` (indexed by local rank) without the excluded
    local ranks' devices, so the new local ranks 0..n-1 land on healthy devices only."""
    return [dev for i, dev in enumerate(visible) if i not in exclude_local_ranks]


def checkpoint_dir(job: str, run_id: str, checkpoint: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the threadlets wrote checkpoint id `checkpoint` (`ckpt-<seq>`): torchloom.layout's
    `<root>/<job>/<run_id>/<id>`, root from TORCHLOOM_CHECKPOINT_DIR or TORCHLOOM_HOME of `environ`.

    Raises:
        ValueError: `checkpoint` is not a checkpoint id (a path is never taken from a request).
    """
    naming.seq_of(checkpoint)
    return layout.run_dir(layout.default_root(environ=environ), job, run_id) / checkpoint


def parse_restart(data: bytes) -> RestartRequest:
    """Decode and check a restart request from the weaver (untrusted until checked).

    Raises:
        ValueError: bytes that are not a RestartRequest, world_size < 1, grad_accum_steps < 0 or a
            negative excluded rank.
    """
    req = wire.decode_restart_request(data)
    if req.world_size < 1 or req.grad_accum_steps < 0 or any(r < 0 for r in req.exclude_ranks):
        raise ValueError(
            f"restart request rejected: world_size={req.world_size} must be >= 1, "
            f"grad_accum_steps={req.grad_accum_steps} >= 0 and exclude_ranks={list(req.exclude_ranks)} >= 0"
        )
    return req


def verified_restart(data: bytes, signature: str | None, verifier: signing.Verifier | None) -> RestartRequest:
    """`parse_restart` of a request only the weaver could have sent: `signature` (its
    `signing.SIGNATURE_HEADER`) must be the weaver's signature over exactly `data`.

    Raises:
        ValueError: there is no weaver public key to check with, the signature is missing or not the
            weaver's, or `parse_restart` refuses the request.
    """
    if verifier is None:
        raise ValueError(
            f"restart request refused: this launcher has no weaver public key ({env.WEAVER_PUBKEY}) to "
            "check it with"
        )
    if not verifier.verify_restart(data, signature):
        why = "it is unsigned" if not signature else "its signature is not the weaver's"
        raise ValueError(f"restart request refused: {why} ({signing.SIGNATURE_HEADER} header)")
    return parse_restart(data)


def weaver_verifier(environ: Mapping[str, str]) -> signing.Verifier | None:
    """The verifier of the weaver's public key the ranks get (`TORCHLOOM_WEAVER_PUBKEY` of `environ`);
    None (every restart request refused) when it is absent or malformed."""
    key = environ.get(env.WEAVER_PUBKEY)
    if not key:
        return None
    try:
        return signing.Verifier(key)
    except signing.SignatureError as exc:
        log.warning("supervisor: %s: restart requests will be refused", exc)
        return None


def attempt_env(
    base: Mapping[str, str],
    *,
    run_id: str,
    base_run_id: str,
    resume_from: Path | None = None,
    grad_accum_steps: int = 0,
    devices: Sequence[str] | None = None,
) -> dict[str, str]:
    """The environment of one attempt: `base` plus its run id, resume point and overrides."""
    out = dict(base)
    out[env.RUN_ID] = run_id
    out[env.BASE_RUN_ID] = base_run_id
    out[DISABLE_SHARED_STORE] = "1"
    out.pop(env.RESUME_FROM, None)
    out.pop(env.KNOB_OVERRIDES, None)
    if resume_from is not None:
        out[env.RESUME_FROM] = str(resume_from)
    if grad_accum_steps > 0:
        out[env.KNOB_OVERRIDES] = json.dumps({"grad_accum_steps": grad_accum_steps})
    if devices is not None:
        out[CUDA_VISIBLE] = ",".join(devices)
    return out


def _on_gpu_machine(environ: Mapping[str, str]) -> bool:
    return CUDA_VISIBLE in environ or Path("/dev/nvidia0").exists()


class Supervisor:
    """Runs torchrun as successive attempts of one run and restarts it on the weaver's request.

    Args:
        job: the job name.
        run_id: the first attempt's run id; attempt N runs as `<run_id>-a<N>`.
        nats_url: the bus the weaver and the ranks use.
        command: builds torchrun's argv for a world size (None: as the user gave it).
        child_env: the first attempt's environment (TORCHLOOM_* set).
        nproc: the first attempt's ranks per node.
        on_start: called with each attempt's run id once its process started (to announce it).
        credentials: the supervisor's NATS credential (the launcher role); None: none.
        elastic_membership: torchrun spans nodes (`--nnodes MIN:MAX`): its agents re-rendezvous when a
            node is lost and restart the survivors themselves, and this launcher runs only one node's
            agent, so restart requests are declined (a "restart_declined" event says so) rather than
            stopping this node under the other nodes' feet.
    """

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        nats_url: str,
        command: Callable[[int | None], Sequence[str]],
        child_env: Mapping[str, str],
        nproc: int,
        on_start: Callable[[str], None] | None = None,
        elastic_membership: bool = False,
        credentials: ClientAuth | None = None,
    ) -> None:
        self.job = job
        self.base_run_id = run_id
        self.run_id = run_id
        self.attempt = 0
        self.events: list[JobEvent] = []  # what this supervisor published, in order
        self._nats_url = nats_url
        self._credentials = credentials
        self._command = command
        self._env = dict(child_env)
        self._verifier = weaver_verifier(child_env)
        self._refused_event_at = 0.0
        self._nproc = nproc
        self._on_start = on_start
        self._elastic_membership = elastic_membership
        self._requests: asyncio.Queue[RestartRequest] = asyncio.Queue()
        self._heartbeats: dict[str, asyncio.Event] = {}
        self._local_rank: dict[int, int] = {}  # rank -> local rank, from the current run's heartbeats
        self._nc: Client | None = None
        self._events: bus.EventPublisher | None = None  # where the journal stores our events
        self._proc: asyncio.subprocess.Process | None = None
        self._results: Path | None = None  # where each attempt's torchrun writes how it ended
        self._watches: set[asyncio.Task[None]] = set()  # strong refs to the "resumed" watches
        self.stopping: signal.Signals | None = None  # the signal that is ending the run, once one came

    async def run(self) -> int:
        """Run attempts until one exits; return that attempt's exit status (128+N for signal N).

        A SIGINT or SIGTERM ends the run under every health policy: it is forwarded to the attempt,
        announced as a "run_stopping" event (so the weaver orders no restart), every restart request
        after it is declined, and the status is 128+N for that signal (130, 143) whatever torchrun
        returns. Stops the current attempt when cancelled."""
        self._env[DISABLE_SHARED_STORE] = "1"
        self._env[env.BASE_RUN_ID] = self.base_run_id
        try:
            self._nc = await bus.connect(
                self._nats_url, name=f"torchloom-supervisor-{self.job}", credentials=self._credentials
            )
        except Exception as exc:  # restarts need the bus; training does not, so go on without them
            log.warning("supervisor: no NATS (%s): restart requests will not be carried out", exc)
        else:
            await self._nc.subscribe(subjects.launcher(self.job), cb=self._on_request)
            await self._nc.subscribe(subjects.heartbeats_of(self.job), cb=self._on_heartbeat)
        installed = self._forward_signals()
        self._results = results = Path(tempfile.mkdtemp(prefix="torchloom-run-"))
        try:
            proc = await self._start(self._command(None), self._env)
            while True:
                exited = asyncio.ensure_future(proc.wait())
                asked = asyncio.ensure_future(self._requests.get())
                try:
                    await asyncio.wait({exited, asked}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (exited, asked):
                        if not t.done():
                            t.cancel()
                if exited.done():
                    code = exited.result()
                    if self.stopping is not None:
                        status = 128 + int(self.stopping)
                    else:
                        status = 128 - code if code < 0 else code
                    await self._publish_end(status, code)
                    return status
                proc = await self._restart(proc, asked.result()) or proc
        finally:
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            for task in list(self._watches):
                task.cancel()
            if self._proc is not None and self._proc.returncode is None:
                await stop_group(self._proc)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            shutil.rmtree(results, ignore_errors=True)

    def _forward_signals(self) -> list[signal.Signals]:
        """Pass SIGINT/SIGTERM on to the running attempt (it has its own session, so a Ctrl-C
        reaches it exactly once: from us), after marking the run as stopping."""
        loop = asyncio.get_running_loop()

        def forward(sig: signal.Signals) -> None:
            if self.stopping is None:
                self.stopping = sig
                # Announce first, so the weaver hears "stopping" before it sees the ranks go.
                task = loop.create_task(self._stop_attempt(sig), name=f"supervisor-stop-{self.job}")
                self._watches.add(task)
                task.add_done_callback(self._watches.discard)
            else:
                self._signal_attempt(sig)  # a second Ctrl-C goes straight through

        installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, forward, sig)
                installed.append(sig)
        return installed

    def _signal_attempt(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def _stop_attempt(self, sig: signal.Signals) -> None:
        try:
            await self._publish(
                RUN_STOPPING,
                f"{sig.name} on the launcher: run {self.run_id} is ending; no restart",
                signal=sig.name,
            )
            await self._flush()
        finally:
            self._signal_attempt(sig)

    async def _flush(self) -> None:
        """Let what was published reach the server (for at most STOPPING_FLUSH_S)."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=STOPPING_FLUSH_S)

    async def _publish_end(self, status: int, returncode: int) -> None:
        """Journal the run's end (`RUN_ENDED`): our exit status, and what torchrun's result file says
        of the first failed rank (its exit code or signal, pid and host) when it wrote one."""
        result = torchrun_result.read(self._result_file()) if self._results is not None else None
        message, attrs = end_report(self.run_id, status, returncode, self.stopping, result)
        await self._publish(RUN_ENDED, message, attempt=str(self.attempt), **attrs)
        await self._flush()

    def _result_file(self) -> Path:
        assert self._results is not None
        return self._results / f"{self.run_id}.json"

    async def _on_request(self, msg: Msg) -> None:
        signature = (msg.headers or {}).get(signing.SIGNATURE_HEADER)
        try:
            req = verified_restart(msg.data, signature, self._verifier)
        except ValueError as exc:
            log.warning("supervisor: ignored a launcher request: %s", exc)
            now = time.monotonic()
            if now - self._refused_event_at >= REFUSED_EVENT_EVERY_S:
                self._refused_event_at = now
                await self._publish(RESTART_REFUSED, str(exc), reason=str(exc))
            return
        await self._requests.put(req)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb: Heartbeat = wire.decode_heartbeat(msg.data)
        except ValueError:
            return
        if hb.run_id == self.run_id:
            self._local_rank[hb.rank] = hb.local_rank
        waiter = self._heartbeats.get(hb.run_id)
        if waiter is not None:
            waiter.set()

    def _current(self, run_id: str) -> bool:
        """Whether a request names the running attempt (or an elastic restart inside it)."""
        return naming.is_attempt_of(run_id, self.run_id)

    async def _start(self, argv: Sequence[str], environ: Mapping[str, str]) -> asyncio.subprocess.Process:
        self._heartbeats[self.run_id] = asyncio.Event()
        if self._results is not None:  # torchrun then says which rank failed first, and how
            argv = torchrun_result.wrap(argv, self._result_file())
        self._proc = await asyncio.create_subprocess_exec(
            *argv, env=dict(environ), stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        if self._on_start is not None:
            self._on_start(self.run_id)
        return self._proc

    async def _publish(self, kind: str, message: str, **attrs: str) -> None:
        ev = JobEvent(
            job=self.job, run_id=self.run_id, kind=kind, message=message, time_s=time.time(), attrs=attrs
        )
        self.events.append(ev)
        if self._nc is not None:
            self._events = self._events or bus.EventPublisher(self._nc)
            try:
                await self._events.publish(self.job, wire.encode(ev))
            except Exception as exc:  # the event is for watchers; the restart goes on regardless
                log.warning("supervisor: could not publish %s: %s", kind, exc)

    async def _restart(
        self, proc: asyncio.subprocess.Process, req: RestartRequest
    ) -> asyncio.subprocess.Process | None:
        """Carry out one restart request; None (keep the current attempt) when it is stale."""
        if not self._current(req.run_id) or proc.returncode is not None:
            log.info("supervisor: ignored a restart request for run %s (running %s)", req.run_id, self.run_id)
            return None
        if self.stopping is not None:
            await self._decline_stopping(req)
            return None
        if self._elastic_membership:
            await self._publish(
                "restart_declined",
                f"restart of run {req.run_id} declined: a multi-node run is restarted by torchrun's "
                "elastic agents (re-rendezvous on a lost node); use --max-restarts",
                reason=req.reason,
                world_size=str(req.world_size),
            )
            return None
        t0 = time.monotonic()
        # Only the id counts, resolved under this launcher's checkpoint root: a path in a message is
        # never handed to the ranks to load (docs/security.md, "No code from data").
        checkpoint = req.checkpoint_id if naming.is_checkpoint_id(req.checkpoint_id) else ""
        path = checkpoint_dir(self.job, req.run_id, checkpoint, self._env) if checkpoint else None
        step = layout.checkpoint_step(path) if path is not None else None
        common = {
            "old_world_size": str(self._nproc),
            "new_world_size": str(req.world_size),
            "checkpoint": str(path or ""),
            "checkpoint_step": "" if step is None else str(step),
            "steps_lost": str(req.steps_lost),
            "exclude_ranks": ",".join(map(str, sorted(req.exclude_ranks))),
        }
        if path is not None:
            await self._publish("reconfigure_checkpointed", f"checkpoint {path} for the restart", **common)
        await self._publish("reconfigure_stopping", f"stopping run {self.run_id}: {req.reason}", **common)
        await stop_group(proc)
        if self.stopping is not None:  # the signal came while the old attempt was stopping
            await self._decline_stopping(req)
            return None
        old_run, old_nproc = self.run_id, self._nproc
        self.attempt += 1
        self.run_id = naming.attempt_run_id(self.base_run_id, self.attempt)
        self._nproc = req.world_size
        devices = None
        if _on_gpu_machine(self._env):
            visible = (self._env.get(CUDA_VISIBLE) or ",".join(map(str, range(old_nproc)))).split(",")
            excluded_local = {self._local_rank.get(r, r) for r in req.exclude_ranks}
            devices = surviving_devices(visible, excluded_local)[: req.world_size]
        self._env = attempt_env(
            self._env,
            run_id=self.run_id,
            base_run_id=self.base_run_id,
            resume_from=path,
            grad_accum_steps=req.grad_accum_steps,
            devices=devices,
        )
        self._local_rank.clear()
        await self._publish(
            "reconfigure_restarting",
            f"relaunching as run {self.run_id} on {req.world_size} rank(s) (was {old_run})",
            previous_run=old_run,
            **common,
        )
        new = await self._start(self._command(req.world_size), self._env)
        self._spawn_resumed_watch(common, t0)
        return new

    async def _decline_stopping(self, req: RestartRequest) -> None:
        assert self.stopping is not None
        await self._publish(
            "restart_declined",
            f"restart of run {req.run_id} declined: the run is stopping ({self.stopping.name})",
            reason=req.reason,
            world_size=str(req.world_size),
        )

    def _spawn_resumed_watch(self, attrs: Mapping[str, str], t0: float) -> None:
        run_id = self.run_id
        seen = self._heartbeats[run_id]

        async def watch() -> None:
            await seen.wait()
            await self._publish(
                "reconfigure_resumed",
                f"run {run_id} is training again",
                restart_s=f"{time.monotonic() - t0:.3f}",
                **attrs,
            )

        task = asyncio.get_running_loop().create_task(watch(), name=f"supervisor-resumed-{run_id}")
        self._watches.add(task)
        task.add_done_callback(self._watches.discard)


def end_report(
    run_id: str,
    status: int,
    returncode: int,
    stopping: signal.Signals | None,
    result: torchrun_result.TorchrunResult | None,
) -> tuple[str, dict[str, str]]:
    """The message and attrs of a `RUN_ENDED` event: the run's exit `status`, torchrun's `returncode`
    (its signal when one killed it), the launcher's stop signal, and the first failed rank of
    torchrun's `result` (`failed_rank`, `failed_local_rank`, `failed_exit_code` or `failed_signal`,
    `failed_pid`, `failed_host`; `failed_ranks` lists every failed rank), when it is known."""
    attrs = {"exit_status": str(status), "torchrun_exit_code": str(returncode)}
    why: list[str] = []
    if returncode < 0:
        attrs["torchrun_signal"] = torchrun_result.signal_name(-returncode)
        why.append(f"torchrun was killed by {attrs['torchrun_signal']}")
    if stopping is not None:
        attrs["stopped_by"] = stopping.name
        why.append(f"stopped by {stopping.name} on the launcher")
    first = result.first if result is not None else None
    if result is not None and result.signal and stopping is None:
        attrs["torchrun_signal"] = result.signal
        why.append(f"torchrun got {result.signal}")
    if result is not None and first is not None:
        attrs.update(
            failed_rank=str(first.rank),
            failed_local_rank=str(first.local_rank),
            failed_pid=str(first.pid),
            failed_host=first.host,
            failed_ranks=",".join(str(f.rank) for f in sorted(result.failures, key=lambda f: f.rank)),
        )
        if first.signal:
            attrs["failed_signal"] = first.signal
            how = f"killed by {first.signal}"
        else:
            attrs["failed_exit_code"] = str(first.exitcode)
            how = f"exit code {first.exitcode}"
        why.append(
            f"rank {first.rank} (local rank {first.local_rank}, pid {first.pid} on {first.host}) "
            f"failed first: {how}"
        )
    elif status != 0 and result is None and stopping is None:
        why.append("torchrun did not say which rank failed")
    message = f"run {run_id} ended with exit status {status}" + (f": {'; '.join(why)}" if why else "")
    return message, attrs


async def stop_group(proc: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> int:
    """Stop a child started in its own session: SIGTERM to its process group, wait, then SIGKILL.

    Returns:
        Its return code.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                return await proc.wait()
        except TimeoutError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # also reaps workers torchrun left behind
    return await proc.wait()
