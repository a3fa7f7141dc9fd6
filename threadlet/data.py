"""A deterministic data-mixture sampler whose mixture (`mix`) and `batch_size` are live knobs, and
whose sources can grow at run time (`add_source`); its state rides along checkpoints and rollbacks."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import torch

from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, validate_set
from torchloom.messages import KnobValue

Batch = list[tuple[str, int]]
Loader = Callable[[str], Any]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit generator seed from (seed, step, rank): independent streams, reproducible anywhere."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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

    Batch `k` depends only on (seed, k, rank), the weights, the batch size and the source lengths:
    each batch uses its own generator seeded from (seed, k, rank), so restoring `state_dict()`
    (after a rollback, say) reproduces the same batches, and ranks draw independent samples.
    Use it on the training thread; the `mix` validator may run on the threadlet's bus thread and
    reads only an immutable snapshot of the source names.

    Args:
        sources: name to a Sized dataset (kept for `dataset(name)`) or a length.
        weights: name to weight >= 0 (at least one > 0); normalized; unnamed sources get 0.
        batch_size: samples per batch, in [1, 65536].
        seed: the run's data seed (the same on every rank).
        rank: this rank (sharding comes from the per-rank stream).
        world_size: number of ranks (recorded in the state; a restore checks it).

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
        self.rank = rank
        self.world_size = world_size
        self.step = 0  # batches drawn so far; the next batch is number `step`

    @staticmethod
    def _checked_batch_size(value: KnobValue) -> int:
        try:
            out = validate_set({"batch_size": BUILTIN_SPECS["batch_size"]}, {"batch_size": value})
        except CommandRejected as exc:
            raise ValueError(exc.reason) from None
        size = out["batch_size"]
        assert isinstance(size, int)
        return size

    # ---- sampling -----------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """Normalized weight per source (a copy)."""
        return dict(self._weights)

    def lengths(self) -> dict[str, int]:
        """Length per source (a copy)."""
        return dict(self._lengths)

    def dataset(self, name: str) -> Any:
        """The dataset object of a source (None when it was given as a length)."""
        return self._datasets.get(name)

    def batch_at(self, step: int) -> Batch:
        """The batch number `step` under the current weights and batch size (no state change)."""
        g = torch.Generator().manual_seed(_seed(self.seed, step, self.rank))
        names = self.known
        probs = torch.tensor([self._weights[n] for n in names], dtype=torch.float64)
        which = torch.multinomial(probs, self.batch_size, replacement=True, generator=g)
        lengths = torch.tensor([self._lengths[n] for n in names], dtype=torch.float64)
        u = torch.rand(self.batch_size, generator=g, dtype=torch.float64)
        idx = (u * lengths[which]).floor().to(torch.int64)
        return [(names[s], i) for s, i in zip(which.tolist(), idx.tolist(), strict=True)]

    def next_batch(self) -> Batch:
        """Draw the next batch and advance."""
        batch = self.batch_at(self.step)
        self.step += 1
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
        self._weights = parse_mix(value, self.known)

    def get_mix(self) -> str:
        return format_mix(self._weights)

    def set_batch_size(self, value: KnobValue) -> None:
        self.batch_size = self._checked_batch_size(value)

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
        """Everything needed to reproduce the next batches: step, weights, batch size, sources."""
        return {
            "step": self.step,
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

        Raises:
            ValueError: when the seed, world size or a source length differs from the state's.
        """
        for key in ("seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state rejected: {key}={state[key]} but this sampler has {getattr(self, key)}"
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
        self.batch_size = self._checked_batch_size(state["batch_size"])
        self.step = int(state["step"])
