"""threadlet: the per-rank torchloom agent. `attach()` it to a model and optimizer, iterate with
`tl.range(total_steps)`, call `tl.step()` at every step boundary, and commands and actions from the
weaver apply at the same step on every rank."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from threadlet import resume
from threadlet.agent import EvalFn, Threadlet
from threadlet.config import ThreadletConfig, from_env
from threadlet.ddp_hook import wrap_comm_hook
from threadlet.loader import LoaderState

__all__ = [
    "EvalFn",
    "Threadlet",
    "ThreadletConfig",
    "attach",
    "finish",
    "from_env",
    "unwrap_optimizer",
    "unwrap_scheduler",
    "wrap_comm_hook",
]

log = logging.getLogger("threadlet")

_current: Threadlet | None = None
_local_logged = False


def attach(
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    job: str | None = None,
    nats_url: str | None = None,
    run_id: str | None = None,
    config: ThreadletConfig | None = None,
    checkpoint_dir: str | None = None,
    sampler: Any = None,
    loader: Any = None,
    eval_fn: EvalFn | None = None,
    handles_stop: bool = False,
) -> Threadlet:
    """Attach a threadlet to this rank's training. Returns at once, whatever the bus does.

    Call it on every rank at the same point (after `init_process_group`, before training): with
    more than one rank it creates a dedicated gloo group for the step agreement.

    Args:
        model: the (DDP) model; kept for later actions, never touched from the bus thread.
        optimizer: its parameter groups provide the lr and weight_decay knobs; name a group with a
            "name" key in its dict (else "0", "1", ...) to allow `lr@name`.
        scheduler: the LR scheduler the loop steps (any of torch.optim.lr_scheduler, a transformers
            schedule); `set lr=X` makes the next step use X and scales the rest of its schedule by
            X / its value there (`threadlet.lr`). Without it a scheduler overwrites a set lr.
        job: overrides TORCHLOOM_JOB.
        nats_url: overrides TORCHLOOM_NATS_URL; with none at all the threadlet runs in local mode
            (no bus, `step()` only counts).
        run_id: overrides TORCHLOOM_RUN_ID.
        config: a complete config; the three arguments above must then be None.
        checkpoint_dir: checkpoint root, overriding TORCHLOOM_CHECKPOINT_DIR (and config's).
        sampler: the data sampler: checkpointed and restored (anything with state_dict and
            load_state_dict), with `add_source(name, path)` the target of `data add`, and with
            `register_knobs(tl)` (a `threadlet.data.MixtureSampler`) its knobs, `mix` and
            `batch_size`, are registered here (do not register them again).
        loader: a torchdata `StatefulDataLoader`: its per-rank state is checkpointed, rolled back
            and resumed with the job, exactly on the same world size and resharded by global
            position on another (`threadlet.loader.LoaderState`: use torchdata's
            `StatefulDistributedSampler`; a plain `DistributedSampler` restarts the epoch). The
            loader applies a loaded state at its next `iter()`, so take a new iterator after a
            rollback (when `tl.branch` changes).
        eval_fn: called by the `eval` action on every rank at the same step; returns metric
            name -> float (also settable later with `tl.on_eval`).
        handles_stop: the loop ends itself on a stop (reads `tl.should_stop`); otherwise, unless
            it iterates `tl.range`, the `step()` after a decided stop ends the process with status 0.

    Training loops should iterate `for step in tl.range(total_steps):` so they follow a rollback
    (step_count moves back to the checkpoint's step) and end after a `stop` action. Clip with
    `tl.clip_grad_(params)` and accumulate `tl.grad_accum_steps` micro-batches per step to make
    `grad_clip_norm` and `grad_accum_steps` steerable.

    What `accelerate.Accelerator.prepare` returns may be passed as it is: its `AcceleratedOptimizer`
    and `AcceleratedScheduler` are unwrapped to the torch optimizer and scheduler they drive
    (`unwrap_optimizer`, `unwrap_scheduler`), and its DDP model is handled like any DDP model.

    Raises:
        ValueError: on a malformed setting (the message names the expected form).
    """
    global _current, _local_logged
    if config is None:
        config = from_env(nats_url=nats_url, job=job, run_id=run_id)
    elif job is not None or nats_url is not None or run_id is not None:
        raise ValueError("attach(): pass either config= or job/nats_url/run_id, not both")
    if checkpoint_dir is not None:
        config = dataclasses.replace(config, checkpoint_dir=checkpoint_dir)
    optimizer, scheduler = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
    # After torchrun's elastic restart N, report as run `<run>-aN` so the previous attempt's
    # commands are not applied again; the weaver sees a new run of the same job.
    config = dataclasses.replace(config, run_id=resume.effective_run_id(config.run_id))
    tl = Threadlet(
        config,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        loader=LoaderState(loader) if loader is not None else None,
        eval_fn=eval_fn,
        handles_stop=handles_stop,
    )
    if config.local and config.replay_path is None and not _local_logged:
        _local_logged = True
        log.info("threadlet: no TORCHLOOM_NATS_URL, running in local mode (no live control)")
    _current = tl
    return tl


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer a wrapper drives (accelerate's `AcceleratedOptimizer` keeps it as
    `.optimizer`; so do similar wrappers), else `optimizer` itself.

    The knobs write the inner optimizer's `param_groups` (the wrapper only forwards to them), and
    checkpoints save its state without the wrapper's extra attributes.
    """
    for _ in range(_MAX_WRAPPERS):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def unwrap_scheduler(scheduler: Any) -> Any:
    """The LR scheduler a wrapper drives (accelerate's `AcceleratedScheduler` keeps it as
    `.scheduler` and steps it), else `scheduler` itself.

    Setting lr rescales the inner scheduler's schedule; the wrapper keeps stepping it as before.
    """
    for _ in range(_MAX_WRAPPERS):
        inner = getattr(scheduler, "scheduler", None)
        if isinstance(scheduler, LRScheduler) or not isinstance(inner, LRScheduler):
            break
        scheduler = inner
    return scheduler


_MAX_WRAPPERS = 8  # wrappers nest a level or two; a cycle of references must not loop forever


def finish(tl: Threadlet | None = None) -> NoReturn:
    """Close the threadlet, tear down torch.distributed safely and exit the process with status 0.

    A gloo job can abort in interpreter teardown after `destroy_process_group()` ("terminate
    called without an active exception"), so a run that trained fine would be reported failed.
    This closes `tl` (default: the last attached), barriers, destroys the threadlet's group and
    the default group, flushes stdout/stderr and leaves with `os._exit(0)`, skipping that teardown.
    Close your own files before calling it.
    """
    tl = tl if tl is not None else _current
    if tl is not None:
        tl.close()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        if tl is not None and tl.group is not None:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(tl.group)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
