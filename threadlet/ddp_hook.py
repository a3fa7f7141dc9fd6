"""The step agreement riding DDP's gradient all-reduce: a communication hook that carries the round's
offer inside the all-reduce DDP already does every optimizer step (docs/design.md, "Agreement on
the gradient all-reduce").

DDP's reduction is a SUM; the agreement needs a MIN. Each rank appends `WIDTH` elements to the
first bucket: a thermometer code of how far past the last decided seq it is ready (`ready - L`)
and of where its first refusal lies (`refused_first - L - 1`), each capped at `WINDOW`. Summed over
`n` ranks, position i holds how many ranks have bit i set, so the MIN is the number of positions
where all `n` have it. The sums are small integers, exact in the bucket's dtype up to `exact_ranks`
ranks. A rank offers at most `WINDOW` seqs per round; the rest follow in the next step.

With a hook of the user's (`wrap_comm_hook`), the bucket goes through that hook untouched (it may
compress or average in ways that would not keep integers exact) and the offer travels as its own
int64 MIN all-reduce on DDP's group, launched in the same backward.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from threadlet.agreement import NONE_REFUSED, OFFER_WIDTH, Agreement, Offer, OfferNow, decode, encode

__all__ = [
    "WIDTH",
    "WINDOW",
    "PiggybackHook",
    "PiggybackTransport",
    "clamp",
    "connect",
    "decode_counts",
    "encode_counts",
    "exact_ranks",
    "find_ddp",
    "install",
    "wrap_comm_hook",
]

log = logging.getLogger("threadlet")

WINDOW = 16  # seqs one piggybacked round can decide
WIDTH = 2 * WINDOW  # elements appended to the first bucket

HookFn = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]

# Largest integer n such that every integer in [0, n] is exact in the dtype.
_EXACT = {
    torch.float64: 2**53,
    torch.float32: 2**24,
    torch.float16: 2**11,
    torch.bfloat16: 2**8,
}


def exact_ranks(dtype: torch.dtype) -> int:
    """How many ranks a SUM of 0/1 counts stays exact for in `dtype` (0: not a float dtype we know)."""
    return _EXACT.get(dtype, 0)


def clamp(ready: int, refused_first: int, last_decided: int) -> tuple[int, int]:
    """The offer a piggybacked round can carry: at most WINDOW seqs past `last_decided`, and a
    refusal only when it lies inside them (one beyond is offered again in a later round)."""
    ready = min(ready, last_decided + WINDOW)
    if refused_first > ready:
        refused_first = NONE_REFUSED
    return ready, refused_first


def encode_counts(ready: int, refused_first: int, last_decided: int, out: torch.Tensor) -> None:
    """Write the thermometer code of a clamped offer into `out` (WIDTH elements, in place)."""
    d = ready - last_decided
    f = WINDOW if refused_first == NONE_REFUSED else refused_first - last_decided - 1
    assert 0 <= d <= WINDOW and 0 <= f <= WINDOW, (d, f)
    out.zero_()
    if d:
        out[:d].fill_(1)
    if f:
        out[WINDOW : WINDOW + f].fill_(1)


def decode_counts(sums: list[float], world_size: int, last_decided: int) -> tuple[int, int]:
    """The agreed `(ready, refused_first)` from the summed thermometer codes of `world_size` ranks.

    Raises:
        ValueError: not WIDTH sums, or a sum that no set of `world_size` 0/1 codes can give.
    """
    if len(sums) != WIDTH:
        raise ValueError(f"piggybacked round of {len(sums)} values rejected: expected {WIDTH}")
    full = world_size - 0.5
    d = f = 0
    for i in range(WINDOW):
        s, r = sums[i], sums[WINDOW + i]
        if not (-0.5 < s < world_size + 0.5 and -0.5 < r < world_size + 0.5):
            raise ValueError(f"piggybacked sum {s}/{r} impossible: expected counts in [0, {world_size}]")
        d += s > full
        f += r > full
    refused = NONE_REFUSED if f == WINDOW else last_decided + 1 + f
    return last_decided + d, refused


def _no_offer() -> tuple[int, int]:
    return 0, NONE_REFUSED


class PiggybackTransport:
    """The rounds of one rank carried by DDP's backward: `start` stages a round at a step boundary;
    the next synchronized backward asks for this rank's offer and carries it (`done` turns true at
    the same boundary on every rank, since every rank runs the same synchronized backwards);
    `finish` reads the result.

    The offer is made in the backward, not at the boundary, so a command that reached this rank
    during the forward is decided a step earlier. An idle rank's offer is the one it carried last
    step: the code is not written again (the cost of an idle step is a call and a compare).

    On CUDA the result is copied to pinned host memory behind an event and read one boundary later,
    so reading it never waits for the stream.

    Args:
        world_size: ranks in DDP's process group.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._counts = torch.zeros(WIDTH, dtype=torch.float64)  # this rank's code, as carried
        self._mins = torch.zeros(OFFER_WIDTH, dtype=torch.int64)  # side path: this rank's offer
        self._staged = False
        self._offer_now: OfferNow = _no_offer  # asked for the offer as the backward carries it
        self._last_decided = 0
        self._asked: tuple[int, int, int] | None = None  # (ready, refused, L) last asked, carried as:
        self._carried: tuple[int, int] = (0, NONE_REFUSED)  # the clamped offer
        self._code: tuple[int, int] | None = None  # (ready, refused) relative to L, in _counts
        self._min_key: tuple[int, int] | None = None  # the offer _mins holds
        self._buf: torch.Tensor | None = None  # the first bucket with the code appended
        self._head = self._tail = torch.empty(0)  # its gradient and code parts
        self._fired = False
        self._settle = 0  # boundaries to wait after the backward (CUDA: 1)
        self._waited = 0
        self._sums: torch.Tensor | None = None  # the summed codes once carried (host memory)
        self._event: Any = None  # CUDA: the device-to-host copy of the sums
        self._h2d: Any = None  # CUDA: the copy of the staged code to the device
        self._pinned: torch.Tensor | None = None
        self._side: Any = None  # (work, tensor) of the side all-reduce
        self.carried = 0  # rounds a backward carried (a statistic)

    # ---- training thread, at boundaries ---------------------------------------------------------

    def start(self, last_decided: int, offer: OfferNow) -> None:
        """Stage a round for the next synchronized backward, which asks `offer` for this rank's
        `(ready, refused_first)` as it carries the round."""
        self._fired = False
        self._waited = 0
        self._last_decided = last_decided
        self._offer_now = offer
        self._staged = True

    def offered(self) -> tuple[int, int]:
        """The `(ready, refused_first)` this rank's carried round offered (clamped, see `clamp`)."""
        return self._carried

    def done(self) -> bool:
        """Whether the staged round was carried (call once per boundary)."""
        if not self._fired:
            return False
        if self._waited < self._settle:
            self._waited += 1
            return False
        return True

    def finish(self) -> tuple[int, int]:
        """The agreed `(ready, refused_first)` of the carried round; unstages it."""
        assert self._fired, "finish() before a backward carried the round"
        self._staged = False
        self._fired = False
        side = self._side
        if side is not None:
            self._side = None
            work, tensor = side
            work.wait()
            agreed = decode(tensor.tolist())
            return agreed.ready, agreed.refused_first
        if self._event is not None:
            self._event.synchronize()
        assert self._sums is not None
        return decode_counts(self._sums.tolist(), self.world_size, self._last_decided)

    def cancel(self) -> None:
        """Drop the staged or carried round unread (its result, if any, is ignored)."""
        self._staged = False
        self._fired = False
        if self._side is not None:
            work, _ = self._side
            self._side = None
            work.wait()  # every rank launched it; completing it keeps the group quiescent

    # ---- the autograd thread, in the hook ------------------------------------------------------

    def _make_offer(self) -> bool:
        """Ask for this rank's offer and clamp it; returns whether it differs from the last one
        carried (the code must be written again)."""
        ready, refused_first = self._offer_now()
        last = self._last_decided
        asked = self._asked
        if asked is not None and asked[0] == ready and asked[1] == refused_first and asked[2] == last:
            return False  # an idle rank offers what it offered last step
        self._asked = (ready, refused_first, last)
        self._carried = clamp(ready, refused_first, last)
        return True

    def _write_code(self) -> None:
        ready, refused_first = self._carried
        last = self._last_decided
        code = (ready - last, refused_first - last)
        if code != self._code:  # the same code relative to a later L: nothing to write
            encode_counts(ready, refused_first, last, self._counts)
            self._code = code

    def ride(self, buffer: torch.Tensor, group: Any) -> torch.futures.Future[torch.Tensor]:
        """All-reduce `buffer` (divided by the world size, as DDP's default) with this rank's code
        appended, and record the summed code. Appends zeros when no round is staged, so every
        rank's collective has the same shape whatever happens."""
        n = buffer.numel()
        cuda = buffer.is_cuda
        buf = self._buf
        if (
            buf is None
            or buf.numel() != n + WIDTH
            or buf.dtype != buffer.dtype
            or buf.device != buffer.device
        ):
            buf = self._ride_buffer(n, buffer)
        torch.div(buffer, self.world_size, out=self._head)
        tail = self._tail
        if not self._staged:
            tail.zero_()
        else:
            if self._make_offer():
                self._write_code()
            if cuda:
                pinned = self._pinned
                if pinned is None:
                    pinned = self._pinned = torch.empty(WIDTH, dtype=torch.float64).pin_memory()
                elif self._h2d is not None:
                    self._h2d.synchronize()  # the last step's copy to the device has read it
                pinned.copy_(self._counts)
                tail.copy_(pinned, non_blocking=True)
                self._h2d = torch.cuda.Event()  # type: ignore[no-untyped-call]
                self._h2d.record()
            else:
                tail.copy_(self._counts)
        self._mark_fired(cuda)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        split: torch.futures.Future[torch.Tensor] = fut.then(self._split_cuda if cuda else self._split_host)
        return split

    def side(self, group: Any) -> None:
        """Launch the offer's own int64 MIN all-reduce (when a round is staged)."""
        if not self._staged:
            return
        self._make_offer()
        ready, refused_first = self._carried
        if (ready, refused_first) != self._min_key:
            for i, value in enumerate(encode(Offer(ready, refused_first, False, 1, 1))):
                self._mins[i] = value
            self._min_key = (ready, refused_first)
        tensor = self._mins.clone()
        device = _group_device(group)
        if device is not None:
            tensor = tensor.to(device)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group, async_op=True)
        self._side = (work, tensor)
        self._mark_fired(False)

    def _mark_fired(self, cuda: bool) -> None:
        if self._staged:
            self._fired = True
            self._settle = 1 if cuda else 0
            self.carried += 1

    def _ride_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        # The first bucket changes size once, when DDP rebuilds its buckets after step 1.
        buf = self._buf = torch.empty(n + WIDTH, dtype=like.dtype, device=like.device)
        self._head, self._tail = buf[:n], buf[n:]
        if not buf.is_cuda:
            self._sums = self._tail  # the all-reduce leaves the summed codes there
        return buf

    def _split_host(self, fut: torch.futures.Future[Any]) -> torch.Tensor:
        fut.value()  # re-raises a failed all-reduce (a dead peer), as DDP's default hook does
        return self._head

    def _split_cuda(self, fut: torch.futures.Future[Any]) -> torch.Tensor:
        fut.value()  # re-raises a failed all-reduce (a dead peer), as DDP's default hook does
        sums = self._sums
        if sums is None or not sums.is_pinned():
            sums = self._sums = torch.empty(WIDTH, dtype=self._tail.dtype).pin_memory()
        sums.copy_(self._tail, non_blocking=True)
        self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._event.record()
        return self._head


def _group_device(group: Any) -> torch.device | None:
    """The device a collective on `group` takes: CUDA for an NCCL group, else host memory."""
    try:
        backend = dist.get_backend(group)
    except Exception:
        return None
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


class PiggybackHook:
    """The state of the communication hook (`piggyback_hook`): DDP's process group, the user's
    own hook if any, and the agreement transport it carries once a threadlet connects.

    Args:
        process_group: DDP's group (None: the default group).
        user_state, user_hook: a hook the user wanted registered (`wrap_comm_hook`); None runs DDP's
            default (divide by the world size, all-reduce).
    """

    def __init__(
        self, process_group: Any = None, user_state: Any = None, user_hook: HookFn | None = None
    ) -> None:
        self.process_group = process_group
        self.user_state = user_state
        self.user_hook = user_hook
        self.transport: PiggybackTransport | None = None
        self.calls = 0  # hook calls (a statistic; tests check a user's hook still runs)

    @property
    def mode(self) -> str:
        """'piggyback' (the offer appended to the first bucket) or 'side' (its own small all-reduce)."""
        return "side" if self.user_hook is not None else "piggyback"

    def run(self, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.calls += 1
        transport = self.transport
        if transport is None or bucket.index() != 0:
            return self._plain(bucket)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        if self.user_hook is None and exact_ranks(buffer.dtype) >= transport.world_size:
            return transport.ride(buffer, group)
        fut = self._plain(bucket)
        transport.side(group)
        return fut

    def _plain(self, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        if self.user_hook is not None:
            return self.user_hook(self.user_state, bucket)
        return default_hooks.allreduce_hook(self.process_group, bucket)


def piggyback_hook(state: PiggybackHook, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: gradients as DDP (or the user's hook) reduces them, plus the
    agreement round of this step."""
    return state.run(bucket)


# DDP checks a hook's annotations against the real classes; this module's are strings (PEP 563).
piggyback_hook.__annotations__ = {
    "state": PiggybackHook,
    "bucket": GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def wrap_comm_hook(state: Any, hook: HookFn) -> tuple[PiggybackHook, HookFn]:
    """Wrap a communication hook of yours so the step agreement can ride along with it.

    DDP takes one hook; register the wrapped pair instead of yours, before `threadlet.attach`:
    `ddp.register_comm_hook(*threadlet.wrap_comm_hook(state, hook))`. Your hook still reduces every
    bucket; the agreement's offer travels beside it as one small int64 all-reduce on DDP's group.

    Returns:
        The `(state, hook)` to pass to `DistributedDataParallel.register_comm_hook`.
    """
    group = state if isinstance(state, dist.ProcessGroup) else None
    return PiggybackHook(group, state, hook), piggyback_hook


def install(ddp: DistributedDataParallel) -> PiggybackHook | None:
    """The piggyback hook state of `ddp`, registering it (wrapping DDP's default reduction) when no
    hook is registered yet; None when a hook that is not ours is registered (the agreement then
    keeps its own gloo rounds: wrap that hook with `wrap_comm_hook` to ride along)."""
    for hook, state in getattr(ddp, "_comm_hooks", ()):
        if isinstance(state, PiggybackHook):
            if state.process_group is None:
                state.process_group = ddp.process_group
            return state
        log.warning(
            "threadlet: DDP already has the communication hook %s; the step agreement keeps its own "
            "gloo rounds (register threadlet.wrap_comm_hook(state, hook) instead to ride along)",
            getattr(hook, "__qualname__", hook),
        )
        return None
    try:
        logging_data = ddp._get_ddp_logging_data()  # type: ignore[no-untyped-call]
        builtin = logging_data.get("comm_hook")
    except Exception:
        builtin = None
    if builtin:
        log.warning(
            "threadlet: DDP already has the built-in communication hook %s; the step agreement keeps "
            "its own gloo rounds",
            builtin,
        )
        return None
    state = PiggybackHook(ddp.process_group)
    ddp.register_comm_hook(state, piggyback_hook)
    return state


def find_ddp(model: Any) -> DistributedDataParallel | None:
    """The DistributedDataParallel wrapping `model` (`model` itself when it is one), found among live
    objects when a framework wrapped it (HF Trainer, accelerate, Lightning); None when there is
    none or more than one."""
    if model is None:
        return None
    if isinstance(model, DistributedDataParallel):
        return model
    if not isinstance(model, torch.nn.Module):
        return None
    found = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, DistributedDataParallel) and any(m is model for m in obj.module.modules())
    ]
    return found[0] if len(found) == 1 else None


def connect(agreement: Agreement, model: Any, group: Any) -> str:
    """Carry `agreement`'s rounds in the backward of the DDP wrapping `model`, when every rank can.

    A collective over the agreement's gloo `group`: call it on every rank at the same point (attach
    does). Every rank takes the same path: DDP over the whole world with our hook registered on
    every rank, else the gloo rounds.

    Returns:
        "piggyback" (the offer appended to the first bucket), "side" (a user's hook reduces the
        gradients; the offer is its own small all-reduce in the same backward) or "gloo".
    """
    ddp = find_ddp(model)
    state = None
    if ddp is not None and dist.get_world_size(ddp.process_group) == dist.get_world_size():
        state = install(ddp)
    flag = torch.tensor([0 if state is None else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if state is None or not int(flag.item()):
        return "gloo"
    transport = PiggybackTransport(dist.get_world_size(group))
    state.transport = transport
    agreement.use_piggyback(transport)
    dtype = _reduce_dtype(ddp)
    if state.mode == "piggyback" and exact_ranks(dtype) < transport.world_size:
        return "side"  # the counts would not stay exact in this dtype at this world size
    return state.mode


def _reduce_dtype(ddp: Any) -> torch.dtype:
    mixed = getattr(ddp, "mixed_precision", None)
    reduce = getattr(mixed, "reduce_dtype", None)
    if isinstance(reduce, torch.dtype):
        return reduce
    for param in ddp.parameters():
        return param.dtype  # type: ignore[no-any-return]
    return torch.float32
