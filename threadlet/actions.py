"""The `ActionRunner`: carries out decided commands on the training thread (knob changes, checkpoint,
rollback, eval, stop, data_add, fault_inject, pause/resume), checks received commands locally at
filing, and resumes a (re)started rank from its checkpoint and knob overrides."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from threadlet import nvml_fake, resume, roots
from threadlet.agreement import Verdict
from threadlet.config import ThreadletConfig
from threadlet.optim_knobs import OPTIMIZER_KNOBS, KnobBoard
from threadlet.state import Decided, Filed, RankContext, TrainingState
from torchloom import layout, naming
from torchloom.errors import CommandRejected
from torchloom.messages import AckStatus, Action, ActionKind, Command, KnobValue, SetConfig

log = logging.getLogger("threadlet")

EvalFn = Callable[[], Mapping[str, float]]


class ActionRunner:
    """Carries out what the rank decided. Training thread only, except `prepare` (and the
    `refusal` and `_rollback_path` it uses), which read no training state and run on the bus thread.

    Args:
        config: job, run id, checkpoint root, fault injection permission.
        ctx: this rank's identity.
        state: the training state; the runner moves its step, branch, paused and stop flags.
        board: the rank's knobs.
        model, optimizer, scheduler, sampler: the user's training objects (checkpointed, rolled
            back; the sampler also takes `data add`); loader: a threadlet.loader.LoaderState.
        eval_fn: the `eval` action's function (settable later as `eval_fn`).
        group: the process group of collective checkpoint saves and loads (None: this rank alone).
        fake_nvml: the fake device `fault_inject` scripts (None: none on this rank).
        replaying: the commands come from a replay file: checkpoints live at their deterministic
            path, and a pause is not held (no one could resume it).
    """

    def __init__(
        self,
        config: ThreadletConfig,
        ctx: RankContext,
        state: TrainingState,
        board: KnobBoard,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        sampler: Any = None,
        loader: Any = None,
        eval_fn: EvalFn | None = None,
        group: Any = None,
        fake_nvml: nvml_fake.FakeNvml | None = None,
        replaying: bool = False,
    ) -> None:
        self._config = config
        self._ctx = ctx
        self._state = state
        self._board = board
        self._model = model
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._sampler = sampler
        self._loader = loader
        self.eval_fn = eval_fn
        self._group = group
        self._fake_nvml = fake_nvml
        self._replaying = replaying
        # Knob overrides of a resume that wait until the loop registered their knob (loops enable
        # grad_accum_steps etc. after attach); the front checks it at every step.
        self.pending_overrides: dict[str, KnobValue] = {}

    # ---- bus thread: local checks at filing ------------------------------------------------------

    def prepare(self, cmd: Command, received_at_s: float) -> Filed:
        """This rank's verdict on a received command: its typed values, or why it cannot apply it."""
        refusal: str | None = None
        values: dict[str, KnobValue] = {}
        body = cmd.body
        if isinstance(body, SetConfig):
            try:
                # Types, bounds and the knobs' validate hooks (e.g. mix structure): a bad value is
                # refused here by every rank, so none applies it.
                values = self._board.validate(body.values)
            except CommandRejected as exc:
                refusal = exc.reason
        else:
            refusal = self.refusal(body)
        return Filed(cmd, received_at_s, refusal, values)

    def refusal(self, action: Action) -> str | None:
        """Why this rank cannot carry out `action` (None: it can). Reads no training state."""
        kind, args = action.kind, action.args
        if kind is ActionKind.ROLLBACK:
            try:
                path = self._rollback_path(args)
            except ValueError as exc:
                return str(exc)
            if not path.is_dir():
                return f"checkpoint path {path} does not exist on this rank"
        elif kind is ActionKind.EVAL and self.eval_fn is None:
            return "no eval function registered: pass eval_fn= to attach()"
        elif kind is ActionKind.DATA_ADD:
            if self._sampler is None or not callable(getattr(self._sampler, "add_source", None)):
                return "no data sampler attached: pass sampler= (with add_source(name, path)) to attach()"
            if not args.get("name") or not args.get("path"):
                return "data_add needs arguments name and path"
            try:
                roots.data_path(args["path"], self._config.data_roots)
            except ValueError as exc:
                return str(exc)
        elif kind is ActionKind.FAULT_INJECT:
            if not self._config.fault_injection_allowed:
                return "fault injection is disabled: start the job with TORCHLOOM_ALLOW_FAULT_INJECTION=1"
            try:
                target, xid = int(args.get("rank", "")), int(args.get("xid", ""))
            except ValueError:
                return f"fault_inject args {dict(args)} rejected: expected integer rank and xid"
            if xid < 1:
                return f"fault_inject xid={xid} rejected: must be >= 1"
            if target == self._ctx.rank and self._fake_nvml is None:
                return "no fake NVML on this rank to inject into"
        return None

    def _rollback_path(self, args: Mapping[str, str]) -> Path:
        # Only the id counts, resolved under this rank's own checkpoint root and run (a replay's
        # checkpoints are its own too): a path in a message is never opened.
        ckpt = args.get("checkpoint_id") or args.get("checkpoint", "")
        return roots.rollback_path(self._config.checkpoint_dir, self._config.job, self._config.run_id, ckpt)

    # ---- training thread ------------------------------------------------------------------------

    def carry_out(self, filed: Filed, verdict: Verdict, *, step: int, branch: str) -> Decided:
        """Decide one command at the boundary at (`branch`, `step`): carry it out when every rank
        accepted it. A failure (a user hook, the file system) rejects it; training goes on."""
        cmd = filed.command
        seq, body = cmd.seq, cmd.body
        self._state.last_decided = max(self._state.last_decided, seq)
        kind = "set" if isinstance(body, SetConfig) else body.kind.value
        status, reason = AckStatus.APPLIED, ""
        detail: dict[str, str] = {}
        if verdict is Verdict.REJECT_SELF:
            status, reason = AckStatus.REJECTED, f"rank {self._ctx.rank} refused: {filed.refusal}"
        elif verdict is Verdict.REJECT_OTHER:
            status, reason = AckStatus.REJECTED, "refused by another rank"
        elif isinstance(body, Action) and body.kind is ActionKind.STOP and self._state.stop:
            # Decided at the same boundary on every rank, so every rank rejects it alike.
            status, reason = AckStatus.REJECTED, "already stopping: a stop was decided before this one"
        else:
            try:
                detail = self._apply(seq, body, filed.values)
            except Exception as exc:
                log.warning("threadlet rank %d: command %d (%s) failed: %r", self._ctx.rank, seq, kind, exc)
                status, reason = AckStatus.REJECTED, f"rank {self._ctx.rank} failed to apply: {exc}"
        return Decided(
            seq=seq,
            command_id=cmd.command_id,
            kind=kind,
            status=status,
            step=step,
            branch=branch,
            reason=reason,
            values=filed.values,
            args=body.args if isinstance(body, Action) else {},
            detail=detail,
        )

    def _apply(self, seq: int, body: SetConfig | Action, values: Mapping[str, KnobValue]) -> dict[str, str]:
        """Carry out a decided command; return the ack detail (docs/design.md, "Actions")."""
        if isinstance(body, SetConfig):
            return self._board.apply(values)
        kind, st = body.kind, self._state
        if kind is ActionKind.PAUSE:
            # A replay has no one to resume it; the recorded resume sits at the same position.
            st.paused = not self._replaying
            return {"held_at_boundary": _flag(st.paused)}
        elif kind is ActionKind.RESUME:
            st.paused = False
        elif kind is ActionKind.CHECKPOINT:
            return self._checkpoint(seq, body.args.get("tag", ""))
        elif kind is ActionKind.STOP:
            detail = self._checkpoint(seq, body.args.get("tag", ""))
            st.stop = True
            st.paused = False  # a stop ends a pause too
            # The ack promises what happens next; the front keeps that promise at the next step.
            st.exit_at_next_step = not st.loop_handles_stop
            detail["handled_by_loop"] = _flag(st.loop_handles_stop)
            detail["exits_at_next_step"] = _flag(st.exit_at_next_step)
            return detail
        elif kind is ActionKind.ROLLBACK:
            return self._rollback(seq, body.args)
        elif kind is ActionKind.EVAL:
            return self._evaluate()
        elif kind is ActionKind.DATA_ADD:
            # Checked again here: the file read is the one under a data root now, not at filing.
            name, path = body.args["name"], roots.data_path(body.args["path"], self._config.data_roots)
            self._sampler.add_source(name, str(path))
            return {"source": name}
        elif kind is ActionKind.FAULT_INJECT and int(body.args["rank"]) == self._ctx.rank:
            assert self._fake_nvml is not None  # refused at filing otherwise
            # The probe watches NVML index local_rank (make_probe's default for a fake).
            self._fake_nvml.fail_at(st.step_count, int(body.args["xid"]), index=self._ctx.local_rank)
            self._fake_nvml.set_step(st.step_count)
        return {}

    def resume_at_start(self) -> str:
        """Load the checkpoint a restart names (TORCHLOOM_RESUME_FROM, or the run's latest complete one
        after an elastic restart), then apply TORCHLOOM_KNOB_OVERRIDES checked like a `set`.

        Returns:
            The checkpoint loaded ("" for a fresh start).
        """
        root = layout.default_root(self._config.checkpoint_dir)
        todo = resume.plan(root=root, job=self._config.job, run_id=self._config.run_id)
        self.pending_overrides = dict(todo.overrides)
        resumed_from = ""
        if todo.checkpoint is not None:
            # The per-rank source names the entry (RNG, sampler) this rank takes.
            source = resume.per_rank_source(todo.checkpoint, self._ctx.rank)
            saved = self._load_checkpoint(todo.checkpoint, source)
            self._state.branch = str(saved["branch"]) or self._state.branch
            resumed_from = str(todo.checkpoint)
            log.info(
                "threadlet: rank %d resumed from %s at step %d (%s restart)",
                self._ctx.rank,
                todo.checkpoint,
                self._state.step_count,
                todo.source,
            )
        self.apply_overrides()
        return resumed_from

    def apply_overrides(self) -> None:
        """Apply the pending knob overrides the training loop has registered by now; the rest wait
        for the next boundary."""
        if not self.pending_overrides:
            return
        schema = self._board.schema
        known = {k: v for k, v in self.pending_overrides.items() if k.split("@", 1)[0] in schema}
        if known:
            self._board.apply(resume.validate_overrides(schema, known))
            for k in known:
                del self.pending_overrides[k]

    def release(self) -> None:
        """Drop the user's training objects (at close), so the runner keeps none of them alive."""
        self._model = self._optimizer = self._scheduler = self._sampler = self._loader = None
        self.eval_fn = None

    def _threadlet_state(self) -> dict[str, Any]:
        st = self._state
        knobs = {spec.name: spec.value for spec in self._board.specs() if spec.value is not None}
        return {
            "step": st.step_count,
            "tick": st.tick,
            "branch": st.branch,
            "last_seq": st.last_decided,
            "knobs": json.dumps(knobs, sort_keys=True),
        }

    def _checkpoint(self, seq: int, tag: str) -> dict[str, str]:
        cfg, st = self._config, self._state
        root = layout.default_root(cfg.checkpoint_dir)
        path = layout.checkpoint_path(root, cfg.job, cfg.run_id, seq)
        # Imported at a rank's first save or load: threadlet.checkpoint imports torch.distributed.
        # checkpoint (DTensor, sympy), about 1 s of CPU every rank start paid before, checkpointing or not.
        from threadlet import checkpoint

        checkpoint.save(
            path,
            rank=self._ctx.rank,
            group=self._group,
            model=self._model,
            optimizer=self._optimizer,
            scheduler=self._scheduler,
            sampler=self._sampler,
            loader=self._loader,
            threadlet_state=self._threadlet_state(),
        )
        if self._ctx.rank == 0:  # the collective save has returned: DCP's metadata covers every rank
            layout.mark_complete(path, step=st.step_count, branch=st.branch, world_size=self._ctx.world_size)
        return {
            "checkpoint_id": naming.checkpoint_id(seq),
            "checkpoint_tag": tag,
            "checkpoint_path": str(path),
            "checkpoint_step": str(st.step_count),
            "branch": st.branch,
            **self._coverage("saved"),
        }

    def _rollback(self, seq: int, args: Mapping[str, str]) -> dict[str, str]:
        st = self._state
        path = self._rollback_path(args)
        parent = st.branch
        self._load_checkpoint(path, self._ctx.rank)
        st.branch = naming.branch_id(seq)
        return {
            "branch": st.branch,
            "parent_branch": parent,
            "from_checkpoint": args.get("checkpoint_id") or path.name,
            "fork_step": str(st.step_count),
            **self._coverage("restored"),
        }

    def _coverage(self, verb: str) -> dict[str, str]:
        """Which parts of the loop a checkpoint holds (`verb` "saved") or a rollback put back
        ("restored"): the ones attached, and RNG always. The data position only with a loader
        (`attach(loader=)`) or a stateful sampler; a plain DataLoader goes on where it is."""
        parts = {
            "model": self._model is not None,
            "optimizer": self._optimizer is not None,
            "scheduler": _stateful(self._scheduler),
            "data_position": _stateful(self._loader) or _stateful(self._sampler),
            "rng": True,
        }
        return {f"{name}_{verb}": _flag(held) for name, held in parts.items()}

    def _load_checkpoint(self, path: Path, source: int) -> dict[str, Any]:
        """Load `path` in place (collectively), taking per-rank entry `source`; put back its knobs and
        step. Returns the saved threadlet state; the caller decides the branch."""
        from threadlet import checkpoint  # at the first save or load (`_checkpoint`)

        saved = checkpoint.load(
            path,
            rank=source,
            group=self._group,
            model=self._model,
            optimizer=self._optimizer,
            scheduler=self._scheduler,
            sampler=self._sampler,
            loader=self._loader,
            threadlet_keys={"step": 0, "branch": "", "knobs": ""},
        )
        self._board.forget_lr_sets()
        self._restore_user_knobs(str(saved["knobs"]))
        self._state.step_count = int(saved["step"])
        if self._fake_nvml is not None:
            self._fake_nvml.set_step(self._state.step_count)
        return saved

    def _restore_user_knobs(self, saved_json: str) -> None:
        """Put back the checkpoint's knob values: user knobs and the training-loop ones
        (optimizer knobs came back with the optimizer's state, per group)."""
        saved = json.loads(saved_json) if saved_json else {}
        user = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in saved.items()
            if k not in OPTIMIZER_KNOBS and k in self._board.schema
        }
        # Knobs whose state came back with the checkpoint (a sampler's mix and batch_size) already
        # match; re-applying their rounded text form could perturb exact values.
        user = {k: v for k, v in user.items() if self._board.value(k) != v}
        if user:
            self._board.apply(self._board.validate(user))

    def _evaluate(self) -> dict[str, str]:
        assert self.eval_fn is not None  # refused at filing otherwise
        return eval_detail(self.eval_fn())


def eval_detail(results: object) -> dict[str, str]:
    """The `eval` action's ack detail: `eval.<name>` -> the metric as `repr(float)`, which `float()`
    reads back exactly ("nan" and "inf" for non-finite values), so a driver can compare candidates.

    Raises:
        ValueError: `results` is not a non-empty mapping of metric name -> number (the ack says so).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(
            f"the eval function returned {type(results).__name__} {results!r:.80}: expected a non-empty "
            "mapping of metric name -> number, e.g. {'loss': 0.25}"
        )
    detail: dict[str, str] = {}
    for name, value in results.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"eval metric name {name!r} rejected: expected a non-empty string")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"eval metric {name}={value!r:.80} rejected: expected a number (a float, an int or a "
                "one-element tensor)"
            ) from None
        detail[f"eval.{name}"] = repr(number)
    return detail


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
