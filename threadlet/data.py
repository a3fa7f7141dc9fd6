"""A deterministic data-mixture sampler whose mixture (`mix`) and `batch_size` are live knobs, and
whose sources can grow at run time (`add_source`); its state rides along checkpoints and rollbacks.

The sample order is global and independent of the world size: global sample `n` is drawn from
(seed, n) under the weights in effect at position `n`, and at each draw rank r of W takes its slice
of the global batch. The state records the global position, so a job restarted on a different number
of ranks continues the same global order where it stopped (docs/design.md, "Data order and
resharding")."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, validate_set
from torchloom.messages import KnobValue

Batch = list[tuple[str, int]]
Loader = Callable[[str], Any]

log = logging.getLogger("threadlet")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# How many mix / batch-size / world-size changes the state keeps (the current one is all a restore
# needs; older ones let `samples()` reproduce earlier stretches of the global order).
HISTORY_LIMIT = 256
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment


def _stream_key(seed: int) -> int:
    """The 64-bit key of the run's global sample stream, from its data seed."""
    digest = hashlib.blake2b(f"torchloom.mixture:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _splitmix64(key: int, counters: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 output number `counter` of the stream `key`: a counter-based generator, so any
    sample is drawn without drawing the ones before it, the same on every machine."""
    z = (counters + np.uint64(1)) * np.uint64(_GAMMA) + np.uint64(key)  # uint64 arrays wrap around
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _length(name: str, source: Sized | int) -> int:
    n = source if isinstance(source, int) and not isinstance(source, bool) else None
    if n is None:
        if not isinstance(source, Sized):
            raise ValueError(f"source {name!r} rejected: expected a Sized dataset or an int length")
        n = len(source)
    if n < 1:
        raise ValueError(f"source {name!r} rejected: length {n} must be >= 1")
    return n


def format_mix(weights: Mapping[str, float]) -> str:
    """`{"code": 0.25, "math": 0.75}` as `"code:0.25,math:0.75"` (sorted by name)."""
    return ",".join(f"{name}:{w:.6g}" for name, w in sorted(weights.items()))


def parse_mix(text: str, known: tuple[str, ...]) -> dict[str, float]:
    """Parse `NAME:WEIGHT,...` into normalized weights over every known source (absent ones get 0).

    Args:
        text: e.g. "code:1,math:3" (weights need not sum to 1).
        known: the sampler's source names.

    Raises:
        CommandRejected: on a malformed pair, an unknown or repeated name, a negative or
            non-finite weight, or all weights 0. The message names the expected form and the
            known sources.
    """
    names = ", ".join(known)
    example = ",".join(f"{n}:{1 / min(len(known), 2):g}" for n in known[:2]) or "code:0.5,math:0.5"
    form = f"expected NAME:WEIGHT,... with weights >= 0, e.g. {example}; known sources: {names}"

    def bad(why: str = "") -> CommandRejected:
        return CommandRejected(f"mix={text!r} rejected: {why}{form}", key="mix")

    raw: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition(":")
        name = name.strip()
        if not sep or not name:
            raise bad()
        try:
            w = float(weight)
        except ValueError:
            raise bad() from None
        if not math.isfinite(w) or w < 0:
            raise bad(f"weight of {name!r} must be a finite number >= 0; ")
        if name not in known:
            raise bad(f"unknown source {name!r}; ")
        if name in raw:
            raise bad(f"source {name!r} appears twice; ")
        raw[name] = w
    total = sum(raw.values())
    if total <= 0:
        raise bad("at least one weight must be > 0; ")
    return {name: raw.get(name, 0.0) / total for name in known}


class MixtureSampler:
    """Yields batches of `(source_name, index)` drawn from several sources by weight.

    The order is one global stream of samples, independent of the world size: global sample `n`
    depends only on (seed, n), the weights in effect at position `n` and the source lengths. Every
    rank calls `next_batch()` in lockstep (once per micro-batch, with the same batch size B); at each
    call rank r of W takes samples [p + r*B, p + (r+1)*B) of the stream, and the global position p
    moves on by W*B. So ranks draw disjoint samples, restoring `state_dict()` (after a rollback, say)
    reproduces the same batches, and a restore on a different world size (a reconfiguration from
    N to M ranks) continues the global order where it stopped: no sample skipped or repeated. A mix
    change applies from the global position where it happens, for every rank.
    Use it on the training thread; the `mix` validator may run on the threadlet's bus thread and
    reads only an immutable snapshot of the source names.

    Args:
        sources: name to a Sized dataset (kept for `dataset(name)`) or a length.
        weights: name to weight >= 0 (at least one > 0); normalized; unnamed sources get 0.
        batch_size: samples per batch and rank, in [1, 65536].
        seed: the run's data seed (the same on every rank).
        rank: this rank: which slice of each global batch it takes.
        world_size: number of ranks: the global batch is world_size x batch_size samples.

    Raises:
        ValueError: on an empty or malformed source, bad weights or an out-of-range batch size.
    """

    def __init__(
        self,
        sources: Mapping[str, Sized | int],
        weights: Mapping[str, float],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not sources:
            raise ValueError("sources rejected: give at least one NAME: dataset or length")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} rejected: must be in [0, world_size={world_size})")
        self._lengths: dict[str, int] = {}
        self._datasets: dict[str, Any] = {}
        self._paths: dict[str, str] = {}
        for name, src in sources.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"source name {name!r} rejected: expected [A-Za-z0-9_.-]{{1,64}}")
            self._lengths[name] = _length(name, src)
            if not isinstance(src, int):
                self._datasets[name] = src
        self.known: tuple[str, ...] = tuple(self._lengths)
        try:
            self._weights = parse_mix(format_mix(weights), self.known)
        except CommandRejected as exc:
            raise ValueError(exc.reason) from None
        self.batch_size = self._checked_batch_size(batch_size)
        self.seed = seed
        self._key = _stream_key(seed)
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global samples consumed by all ranks together; the same on every rank
        self.batches = 0  # batches this rank has drawn (information only)
        # (start position, weights) of every stretch of the global order, oldest first.
        self._segments: list[tuple[int, dict[str, float]]] = [(0, dict(self._weights))]
        self._history: list[dict[str, Any]] = []
        self._note("start")

    @staticmethod
    def _checked_batch_size(value: KnobValue) -> int:
        try:
            out = validate_set({"batch_size": BUILTIN_SPECS["batch_size"]}, {"batch_size": value})
        except CommandRejected as exc:
            raise ValueError(exc.reason) from None
        size = out["batch_size"]
        assert isinstance(size, int)
        return size

    def _note(self, why: str) -> None:
        """Record a change of what shapes the order from the current position on (bounded)."""
        self._history.append(
            {
                "position": self.position,
                "why": why,
                "weights": dict(self._weights),
                "batch_size": self.batch_size,
                "world_size": self.world_size,
            }
        )
        del self._history[:-HISTORY_LIMIT]

    # ---- sampling -----------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """Normalized weight per source (a copy)."""
        return dict(self._weights)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The recorded changes (start, mix, batch size, world size), each with the global position
        from which it applies (a copy; the last HISTORY_LIMIT)."""
        return [dict(h) for h in self._history]

    def lengths(self) -> dict[str, int]:
        """Length per source (a copy)."""
        return dict(self._lengths)

    def dataset(self, name: str) -> Any:
        """The dataset object of a source (None when it was given as a length)."""
        return self._datasets.get(name)

    def samples(self, start: int, stop: int) -> Batch:
        """Global samples [start, stop) of the stream (no state change), each under the weights in
        effect at its position as far as this sampler knows them (mix changes up to now)."""
        if not 0 <= start <= stop:
            raise ValueError(f"samples({start}, {stop}) rejected: expected 0 <= start <= stop")
        if start < self._segments[0][0]:
            raise ValueError(
                f"samples({start}, {stop}) rejected: the order before position {self._segments[0][0]} "
                f"is no longer known (only the last {HISTORY_LIMIT} mix changes are kept)"
            )
        out: Batch = []
        bounds = [s for s, _ in self._segments[1:]] + [max(stop, self._segments[-1][0])]
        for (seg_start, weights), seg_stop in zip(self._segments, bounds, strict=True):
            lo, hi = max(start, seg_start), min(stop, seg_stop)
            if lo < hi:
                out.extend(self._draw(lo, hi, weights))
        return out

    def _draw(self, start: int, stop: int, weights: Mapping[str, float]) -> Batch:
        names = self.known
        n = np.arange(start, stop, dtype=np.uint64)
        pick = _splitmix64(self._key, n * np.uint64(2))
        index = _splitmix64(self._key, n * np.uint64(2) + np.uint64(1))
        w = np.array([weights.get(name, 0.0) for name in names], dtype=np.float64)
        cum = np.cumsum(w)
        cum /= cum[-1]  # ends at exactly 1.0; zero-weight sources are empty intervals
        u = (pick >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
        which = np.searchsorted(cum, u, side="right")
        lengths = np.array([self._lengths[name] for name in names], dtype=np.uint64)
        idx = index % lengths[which]
        return [(names[s], i) for s, i in zip(which.tolist(), idx.tolist(), strict=True)]

    def next_batch(self) -> Batch:
        """Draw this rank's slice of the next global batch and advance (every rank calls it in
        lockstep, with the same batch size)."""
        first = self.position + self.rank * self.batch_size
        batch = self.samples(first, first + self.batch_size)
        self.position += self.world_size * self.batch_size
        self.batches += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    # ---- knobs ----------------------------------------------------------------------------------

    def validate_mix(self, value: KnobValue) -> None:
        """Check a `mix` value without changing anything (safe on the bus thread).

        Raises:
            CommandRejected: naming the expected form and the known sources.
        """
        if not isinstance(value, str):
            raise CommandRejected(f"mix={value!r} rejected: expected a string NAME:WEIGHT,...", key="mix")
        parse_mix(value, self.known)

    def set_mix(self, value: KnobValue) -> None:
        """Apply a `mix` value (validated again first, so a bad value changes nothing)."""
        self.validate_mix(value)
        assert isinstance(value, str)
        self._set_weights(parse_mix(value, self.known))
        self._note("mix")

    def _set_weights(self, weights: dict[str, float]) -> None:
        """The global order uses `weights` from the current position on."""
        self._weights = weights
        if self._segments[-1][0] == self.position:
            self._segments[-1] = (self.position, dict(weights))
        else:
            self._segments.append((self.position, dict(weights)))
            del self._segments[:-HISTORY_LIMIT]

    def get_mix(self) -> str:
        return format_mix(self._weights)

    def set_batch_size(self, value: KnobValue) -> None:
        self.batch_size = self._checked_batch_size(value)
        self._note("batch_size")

    def knob_definitions(self) -> list[dict[str, Any]]:
        """Keyword arguments for `Threadlet.knob`, one dict per knob (`mix`, `batch_size`).

        The `validate` entry is the structural check of `mix`; pass it where `Threadlet.knob`
        accepts `validate=` (without it, the apply hook still refuses before changing anything).
        """
        mix, bs = BUILTIN_SPECS["mix"], BUILTIN_SPECS["batch_size"]
        return [
            {
                "name": "mix",
                "type": mix.type,
                "description": mix.description,
                "get": self.get_mix,
                "apply": self.set_mix,
                "validate": self.validate_mix,
            },
            {
                "name": "batch_size",
                "type": bs.type,
                "min": bs.min,
                "max": bs.max,
                "description": bs.description,
                "get": lambda: self.batch_size,
                "apply": self.set_batch_size,
            },
        ]

    def register_knobs(self, tl: Any) -> None:
        """Register `mix` and `batch_size` on a Threadlet (or anything with its `knob` method).

        Uses `validate=` when `tl.knob` accepts it, so every rank refuses a bad mix at filing time.
        """
        import inspect

        takes_validate = "validate" in inspect.signature(tl.knob).parameters
        for definition in self.knob_definitions():
            kwargs = dict(definition)
            if not takes_validate:
                kwargs.pop("validate", None)
            tl.knob(kwargs.pop("name"), kwargs.pop("type"), **kwargs)

    # ---- sources --------------------------------------------------------------------------------

    def add_source(self, name: str, path: str | Path, loader: Loader | None = None) -> int:
        """Load a source and make it available with weight 0 (until `mix` names it).

        Args:
            name: a new source name, `[A-Za-z0-9_.-]{1,64}`.
            path: a `.pt` file holding a tensor (its rows are the samples) or a list of tensors,
                read with `torch.load(path, weights_only=True)`; or anything `loader` reads.
            loader: optional callable `loader(path) -> Sized dataset`.

        Returns:
            The new source's length.

        Raises:
            ValueError: on a bad or taken name, or a file that holds no samples.
            OSError: when the file cannot be read.
        """
        if not _NAME.fullmatch(name):
            raise ValueError(f"source name {name!r} rejected: expected [A-Za-z0-9_.-]{{1,64}}")
        if name in self._lengths:
            raise ValueError(f"source {name!r} rejected: a source of that name already exists")
        data = loader(str(path)) if loader is not None else torch.load(str(path), weights_only=True)
        if loader is None and not (
            (isinstance(data, torch.Tensor) and data.dim() >= 1)
            or (isinstance(data, list | tuple) and all(isinstance(t, torch.Tensor) for t in data))
        ):
            raise ValueError(
                f"source {name!r} from {str(path)!r} rejected: expected a tensor (rows are samples) "
                f"or a list of tensors, got {type(data).__name__}"
            )
        length = _length(name, data)
        self._lengths[name] = length
        self._datasets[name] = data
        self._paths[name] = str(path)
        self._weights = {**self._weights, name: 0.0}
        self.known = (*self.known, name)  # a new tuple: the bus thread sees old or new, never half
        return length

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the global order: the global position, the mix stretches
        and history, batch size, seed and sources. `world_size` and `batches` are information: a
        restore on another world size continues from `position`."""
        return {
            "position": self.position,
            "batches": self.batches,
            "segments": [[start, dict(w)] for start, w in self._segments],
            "history": self.history,
            "weights": dict(self._weights),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "world_size": self.world_size,
            "lengths": dict(self._lengths),
            "paths": dict(self._paths),
        }

    def load_state_dict(self, state: Mapping[str, Any], loader: Loader | None = None) -> None:
        """Restore a `state_dict()`; sources added later than this sampler's are re-added from
        their recorded paths (with `loader` when given).

        A state saved on another world size is resharded: this rank continues the global order
        from the saved position, taking its slice of each global batch of this world size.

        Raises:
            ValueError: when the seed or a source length differs from the state's, or the state
                lacks the global position (saved by a sampler older than the global order).
        """
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state rejected: seed={state['seed']} but this sampler has {self.seed}")
        if "position" not in state:
            raise ValueError(
                "sampler state rejected: it has no global 'position' (saved before the sample order "
                "became global); start the run afresh"
            )
        for name, path in state["paths"].items():
            if name not in self._lengths:
                self.add_source(name, path, loader)
        for name, length in state["lengths"].items():
            if self._lengths.get(name) != length:
                raise ValueError(
                    f"sampler state rejected: source {name!r} has length {self._lengths.get(name)}, "
                    f"the state expects {length}"
                )
        self._weights = {name: float(state["weights"].get(name, 0.0)) for name in self.known}
        self._segments = [
            (int(start), {name: float(w) for name, w in weights.items()})
            for start, weights in state["segments"]
        ]
        self.batch_size = self._checked_batch_size(state["batch_size"])
        self.position = int(state["position"])
        self.batches = int(state["batches"])
        self._history = [dict(h) for h in state["history"]]
        saved_world = int(state["world_size"])
        if saved_world != self.world_size:
            self._note("reshard")
            log.info(
                "threadlet: data order resharded from %d to %d ranks at global sample %d: rank %d "
                "continues the same global order (nothing skipped or repeated)",
                saved_world,
                self.world_size,
                self.position,
                self.rank,
            )
