"""Carrying out actions on the training thread (checkpoint, rollback, eval, stop, data_add,
fault_inject, pause/resume), their local refusal at filing, and the resume at process start; mixed
into `threadlet.agent.Threadlet`, which owns every attribute declared here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from threadlet import checkpoint, nvml_fake, replay, resume
from threadlet.config import ThreadletConfig
from threadlet.optim_knobs import OPTIMIZER_KNOBS, KnobBoard
from torchloom import layout, naming
from torchloom.messages import Action, ActionKind, KnobValue, SetConfig

log = logging.getLogger("threadlet")


class ActionsMixin:
    """Action and resume methods of a Threadlet. Training thread only, except `_action_refusal`
    and `_rollback_path`, which read no training state and run on the bus thread at filing."""

    config: ThreadletConfig
    rank: int
    world_size: int
    local_rank: int
    step_count: int
    tick: int
    branch: str
    group: Any
    resumed_from: str
    _model: Any
    _optimizer: Any
    _scheduler: Any
    _sampler: Any
    _eval_fn: Callable[[], Mapping[str, float]] | None
    _board: KnobBoard
    _fake_nvml: nvml_fake.FakeNvml | None
    _replay: replay.Schedule | None
    _pending_overrides: dict[str, Any]
    _paused: bool
    _stop: bool
    _last_decided: int

    def _action_refusal(self, action: Action) -> str | None:
        """Why this rank cannot carry out `action` (None: it can). Reads no training state."""
        kind, args = action.kind, action.args
        if kind is ActionKind.ROLLBACK:
            try:
                path = self._rollback_path(args)
            except ValueError as exc:
                return str(exc)
            if not path.is_dir():
                return f"checkpoint path {path} does not exist on this rank"
        elif kind is ActionKind.EVAL and self._eval_fn is None:
            return "no eval function registered: pass eval_fn= to attach()"
        elif kind is ActionKind.DATA_ADD:
            if self._sampler is None or not callable(getattr(self._sampler, "add_source", None)):
                return "no data sampler attached: pass sampler= (with add_source(name, path)) to attach()"
            if not args.get("name") or not args.get("path"):
                return "data_add needs arguments name and path"
        elif kind is ActionKind.FAULT_INJECT:
            if not self.config.fault_injection_allowed:
                return "fault injection is disabled: start the job with TORCHLOOM_ALLOW_FAULT_INJECTION=1"
            try:
                target, xid = int(args.get("rank", "")), int(args.get("xid", ""))
            except ValueError:
                return f"fault_inject args {dict(args)} rejected: expected integer rank and xid"
            if xid < 1:
                return f"fault_inject xid={xid} rejected: must be >= 1"
            if target == self.rank and self._fake_nvml is None:
                return "no fake NVML on this rank to inject into"
        return None

    def _rollback_path(self, args: Mapping[str, str]) -> Path:
        ckpt = args.get("checkpoint_id") or args.get("checkpoint", "")
        # A replay runs under its own run id: its checkpoints are its own, at the deterministic path.
        if self._replay is None and args.get("checkpoint_path"):
            return Path(args["checkpoint_path"])
        seq = naming.seq_of(ckpt)
        root = layout.default_root(self.config.checkpoint_dir)
        return layout.checkpoint_path(root, self.config.job, self.config.run_id, seq)

    def _apply(self, seq: int, body: SetConfig | Action, values: dict[str, KnobValue]) -> dict[str, str]:
        """Carry out a decided command; return the ack detail (docs/design.md, "Actions")."""
        if isinstance(body, SetConfig):
            self._board.apply(values)
            return {}
        kind = body.kind
        if kind is ActionKind.PAUSE:
            # A replay has no one to resume it; the recorded resume sits at the same position.
            self._paused = self._replay is None
        elif kind is ActionKind.RESUME:
            self._paused = False
        elif kind is ActionKind.CHECKPOINT:
            return self._checkpoint(seq, body.args.get("tag", ""))
        elif kind is ActionKind.STOP:
            detail = self._checkpoint(seq, body.args.get("tag", ""))
            self._stop = True
            return detail
        elif kind is ActionKind.ROLLBACK:
            return self._rollback(seq, body.args)
        elif kind is ActionKind.EVAL:
            return self._evaluate()
        elif kind is ActionKind.DATA_ADD:
            name, path = body.args["name"], body.args["path"]
            self._sampler.add_source(name, path)
            return {"source": name}
        elif kind is ActionKind.FAULT_INJECT and int(body.args["rank"]) == self.rank:
            assert self._fake_nvml is not None  # refused at filing otherwise
            # The probe watches NVML index local_rank (make_probe's default for a fake).
            self._fake_nvml.fail_at(self.step_count, int(body.args["xid"]), index=self.local_rank)
            self._fake_nvml.set_step(self.step_count)
        return {}

    def _resume_at_start(self) -> None:
        """Load the checkpoint a restart names (TORCHLOOM_RESUME_FROM, or the run's latest complete one
        after an elastic restart), then apply TORCHLOOM_KNOB_OVERRIDES checked like a `set`."""
        root = layout.default_root(self.config.checkpoint_dir)
        todo = resume.plan(root=root, job=self.config.job, run_id=self.config.run_id)
        self._pending_overrides = dict(todo.overrides)
        if todo.checkpoint is not None:
            # The per-rank source names the entry (RNG, sampler) this rank takes.
            saved = self._load_checkpoint(todo.checkpoint, resume.per_rank_source(todo.checkpoint, self.rank))
            self.branch = str(saved["branch"]) or self.branch
            self.resumed_from = str(todo.checkpoint)
            log.info(
                "threadlet: rank %d resumed from %s at step %d (%s restart)",
                self.rank,
                todo.checkpoint,
                self.step_count,
                todo.source,
            )
        self._apply_overrides()

    def _apply_overrides(self) -> None:
        """Apply the pending knob overrides the training loop has registered by now; the rest wait
        for the next boundary (loops enable grad_accum_steps etc. after attach)."""
        if not self._pending_overrides:
            return
        known = {k: v for k, v in self._pending_overrides.items() if k.split("@", 1)[0] in self._board.schema}
        if known:
            self._board.apply(resume.validate_overrides(self._board.schema, known))
            for k in known:
                del self._pending_overrides[k]

    def _threadlet_state(self) -> dict[str, Any]:
        knobs = {spec.name: spec.value for spec in self._board.specs() if spec.value is not None}
        return {
            "step": self.step_count,
            "tick": self.tick,
            "branch": self.branch,
            "last_seq": self._last_decided,
            "knobs": json.dumps(knobs, sort_keys=True),
        }

    def _checkpoint(self, seq: int, tag: str) -> dict[str, str]:
        root = layout.default_root(self.config.checkpoint_dir)
        path = layout.checkpoint_path(root, self.config.job, self.config.run_id, seq)
        checkpoint.save(
            path,
            rank=self.rank,
            group=self.group,
            model=self._model,
            optimizer=self._optimizer,
            scheduler=self._scheduler,
            sampler=self._sampler,
            threadlet_state=self._threadlet_state(),
        )
        if self.rank == 0:  # the collective save has returned: DCP's metadata covers every rank
            layout.mark_complete(path, step=self.step_count, branch=self.branch, world_size=self.world_size)
        return {
            "checkpoint_id": naming.checkpoint_id(seq),
            "checkpoint_tag": tag,
            "checkpoint_path": str(path),
            "checkpoint_step": str(self.step_count),
            "branch": self.branch,
        }

    def _rollback(self, seq: int, args: Mapping[str, str]) -> dict[str, str]:
        path = self._rollback_path(args)
        parent = self.branch
        self._load_checkpoint(path, self.rank)
        self.branch = naming.branch_id(seq)
        return {
            "branch": self.branch,
            "parent_branch": parent,
            "from_checkpoint": args.get("checkpoint_id") or path.name,
            "fork_step": str(self.step_count),
        }

    def _load_checkpoint(self, path: Path, source: int) -> dict[str, Any]:
        """Load `path` in place (collectively), taking per-rank entry `source`; put back its knobs and
        step. Returns the saved threadlet state; the caller decides the branch."""
        saved = checkpoint.load(
            path,
            rank=source,
            group=self.group,
            model=self._model,
            optimizer=self._optimizer,
            scheduler=self._scheduler,
            sampler=self._sampler,
            threadlet_keys={"step": 0, "branch": "", "knobs": ""},
        )
        self._restore_user_knobs(str(saved["knobs"]))
        self.step_count = int(saved["step"])
        if self._fake_nvml is not None:
            self._fake_nvml.set_step(self.step_count)
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
        assert self._eval_fn is not None  # refused at filing otherwise
        results = self._eval_fn()
        return {f"eval.{name}": repr(float(value)) for name, value in results.items()}
