"""Device health probes for one rank: `NvmlProbe` reads a GPU through NVML (the real `pynvml` module
or `FakeNvml`, injected), `CpuProbe` reads the process from /proc; both return `DeviceHealth`.

The healthy/unhealthy verdict follows the Kubernetes NVIDIA device plugin: critical XIDs mark the
device unhealthy except the application XIDs (13, 31, 43, 45, 68), and the verdict stays unhealthy
once such an XID was seen. Rising volatile uncorrected ECC counts, row-remapper failure or pending
remaps, a lost GPU and a temperature above the threshold also mark it unhealthy.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from torchloom.messages import DeviceHealth

# NVML ABI constants (identical in pynvml.py and the fake); fixed by the C API, so not looked up.
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8

# XIDs the device plugin treats as application errors: the program faulted, the GPU is fine.
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68})

# Well-known XID meanings (NVIDIA's "XID Errors" table), for readable unhealthy reasons.
XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    32: "invalid or corrupted push buffer stream",
    38: "driver firmware error",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    48: "double bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    68: "video processor exception",
    69: "graphics engine class error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def describe_xid(xid: int) -> str:
    """Return `"XID 79: GPU has fallen off the bus"` (or `"XID n: critical error"` when unknown)."""
    return f"XID {xid}: {XID_MEANINGS.get(xid, 'critical error')}"


def is_application_xid(xid: int, ignored: frozenset[int] = APPLICATION_XIDS) -> bool:
    """Whether `xid` is an application error that leaves the device healthy."""
    return xid in ignored


class DeviceProbe(Protocol):
    """What the threadlet samples for its heartbeat."""

    def sample(self) -> DeviceHealth:
        """Read the device now; never raises for an unsupported metric."""
        ...

    def close(self) -> None:
        """Release NVML resources (idempotent)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeConfig:
    """Thresholds of the device verdict.

    Attributes:
        max_temperature_c: GPU temperature above which the device is unhealthy.
        application_xids: XIDs that leave the device healthy (the device plugin's list).
        max_events_per_sample: bound on XID events drained by one `sample()`.
    """

    max_temperature_c: float = 90.0
    application_xids: frozenset[int] = APPLICATION_XIDS
    max_events_per_sample: int = 64

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_temperature_c) or not 0 < self.max_temperature_c <= 200:
            raise ValueError(f"max_temperature_c={self.max_temperature_c!r} rejected: must be in (0, 200]")
        if self.max_events_per_sample < 1:
            raise ValueError(f"max_events_per_sample={self.max_events_per_sample!r} rejected: must be >= 1")


def _nvml_code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


class NvmlProbe:
    """Samples one GPU through an NVML module (`pynvml` in production, `FakeNvml` in tests).

    Every metric is read on its own: one raising `NVMLError` (NOT_SUPPORTED on consumer boards,
    GPU_IS_LOST after XID 79) leaves that field at its default and the rest of the sample intact.

    Args:
        nvml: the NVML module or an object with the same functions.
        index: NVML device index (NVML numbers GPUs by PCI bus, ignoring CUDA_VISIBLE_DEVICES).
        uuid: NVML device UUID; takes precedence over `index` when given.
        config: thresholds of the verdict.
        init: call `nvmlInit` here (and `nvmlShutdown` in `close`).

    Raises:
        Exception: the module's `NVMLError` when NVML cannot be initialized or the device not found.
    """

    def __init__(
        self,
        nvml: Any,
        *,
        index: int = 0,
        uuid: str | None = None,
        config: ProbeConfig | None = None,
        init: bool = True,
    ) -> None:
        self._nvml = nvml
        self._error: type[BaseException] = nvml.NVMLError
        self._config = config or ProbeConfig()
        self._lock = threading.Lock()
        self._owns_init = False
        self._closed = False
        if init:
            nvml.nvmlInit()
            self._owns_init = True
        try:
            self._handle = (
                nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
            )
        except BaseException:
            self._shutdown()
            raise
        self.index = index
        self.uuid = uuid or self._uuid_or_none() or f"nvml:{index}"
        self._event_set: Any = None
        self.events_error = ""  # why XID events are not watched, when they are not
        self._open_events()
        # Volatile counts since the driver loaded: only a rise after this probe starts is news.
        self._ecc_baseline: int | None = self._ecc_uncorrected_or_none()
        self._fatal_reason = ""  # sticky: set by the first non-application XID
        self._all_xids: list[int] = []
        self._process = CpuProbe()  # the training process's CPU load and RSS ride along

    def _uuid_or_none(self) -> str | None:
        try:
            raw = self._nvml.nvmlDeviceGetUUID(self._handle)
        except self._error:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def _ecc_uncorrected_or_none(self) -> int | None:
        try:
            return int(
                self._nvml.nvmlDeviceGetTotalEccErrors(
                    self._handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC
                )
            )
        except self._error:
            return None

    def _open_events(self) -> None:
        try:
            self._event_set = self._nvml.nvmlEventSetCreate()
            self._nvml.nvmlDeviceRegisterEvents(
                self._handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR, self._event_set
            )
        except self._error as exc:
            # XID events are unsupported on some boards and in some containers; the other checks still run.
            self.events_error = f"XID events unavailable: {exc}"
            self._free_events()

    def _free_events(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(self._error):
                self._nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None

    def _shutdown(self) -> None:
        if self._owns_init:
            self._owns_init = False
            with contextlib.suppress(self._error):
                self._nvml.nvmlShutdown()

    def close(self) -> None:
        """Free the event set and shut NVML down if this probe initialized it (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free_events()
            self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def xids_seen(self) -> tuple[int, ...]:
        """Every critical XID seen since the probe started, application ones included."""
        return tuple(self._all_xids)

    def _drain_xids(self) -> list[int]:
        if self._event_set is None:
            return []
        xids: list[int] = []
        for _ in range(self._config.max_events_per_sample):
            try:
                # Timeout 0: the call returns at once; sample() must never block the heartbeat.
                data = self._nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except self._error as exc:
                if _nvml_code(exc) != NVML_ERROR_TIMEOUT:
                    self.events_error = f"XID event wait failed: {exc}"
                break
            if int(data.eventType) == NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                xids.append(int(data.eventData))
        return xids

    def _read(self, errors: dict[str, int | None], name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._error as exc:
            errors[name] = _nvml_code(exc)
            return None

    def _clock_reasons(self) -> int:
        getter = getattr(self._nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is not None:
            try:
                return int(getter(self._handle))
            except self._error as exc:
                # Drivers older than r535 lack the "event" name; only then try the deprecated one.
                if _nvml_code(exc) != NVML_ERROR_FUNCTION_NOT_FOUND:
                    raise
        return int(self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons(self._handle))

    def sample(self) -> DeviceHealth:
        """Read every metric, drain XID events and judge the device.

        Returns:
            A `DeviceHealth` with kind "cuda"; `xids` holds the critical XIDs seen since the last sample.
        """
        with self._lock:
            return self._sample()

    def _sample(self) -> DeviceHealth:
        nvml, handle = self._nvml, self._handle
        errors: dict[str, int | None] = {}
        xids = self._drain_xids()
        self._all_xids.extend(xids)
        for xid in xids:
            if not self._fatal_reason and not is_application_xid(xid, self._config.application_xids):
                self._fatal_reason = describe_xid(xid)

        util = self._read(errors, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        mem = self._read(errors, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temp = self._read(
            errors, "temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU)
        )
        power_mw = self._read(errors, "power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        ecc_unc = self._read(
            errors,
            "ecc",
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC
            ),
        )
        ecc_corr = self._read(
            errors,
            "ecc_corrected",
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC
            ),
        )
        remap = self._read(errors, "remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        clocks = self._read(errors, "clock_reasons", self._clock_reasons)
        replay = self._read(errors, "pcie_replay", lambda: nvml.nvmlDeviceGetPcieReplayCounter(handle))

        reasons: list[str] = []
        if self._fatal_reason:
            reasons.append(self._fatal_reason)
        if NVML_ERROR_GPU_IS_LOST in errors.values():
            reasons.append("NVML: GPU is lost")
        if ecc_unc is not None:
            if self._ecc_baseline is None:
                self._ecc_baseline = int(ecc_unc)
            elif int(ecc_unc) > self._ecc_baseline:
                reasons.append(
                    f"volatile uncorrected ECC errors rose from {self._ecc_baseline} to {int(ecc_unc)}"
                )
        process = self._process.sample()
        pending, failed = (int(remap[2]), int(remap[3])) if remap is not None else (0, 0)
        if failed:
            reasons.append("row remapping failed")
        if pending:
            reasons.append("row remapping pending (GPU reset required)")
        if temp is not None and float(temp) > self._config.max_temperature_c:
            reasons.append(f"temperature {float(temp):g} C above {self._config.max_temperature_c:g} C")

        return DeviceHealth(
            kind="cuda",
            device=self.uuid,
            index=self.index,
            nvml_available=True,
            utilization_pct=float(util.gpu) if util is not None else 0.0,
            memory_used_bytes=int(mem.used) if mem is not None else 0,
            memory_total_bytes=int(mem.total) if mem is not None else 0,
            temperature_c=float(temp) if temp is not None else 0.0,
            power_w=float(power_mw) / 1000.0 if power_mw is not None else 0.0,
            ecc_volatile_uncorrected=int(ecc_unc) if ecc_unc is not None else 0,
            ecc_volatile_corrected=int(ecc_corr) if ecc_corr is not None else 0,
            remapped_rows_pending=pending,
            remapped_rows_failed=failed,
            clock_event_reasons=int(clocks) if clocks is not None else 0,
            pcie_replay_count=int(replay) if replay is not None else 0,
            xids=tuple(xids),
            healthy=not reasons,
            unhealthy_reason="; ".join(reasons),
            cpu_load_pct=process.cpu_load_pct,
            rss_bytes=process.rss_bytes,
        )


def _rss_bytes(proc: Path) -> int:
    try:
        fields = (proc / "self" / "statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # ru_maxrss is the peak, in KiB on Linux: the best available without /proc.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _meminfo(proc: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


class CpuProbe:
    """Samples the training process on a machine without a GPU.

    Args:
        proc_root: where procfs lives (tests point it at a fixture directory).
        clock: monotonic wall clock in seconds.
        cpu_clock: this process's CPU time in seconds.
        host: host name for the `device` field (default: `socket.gethostname()`).
    """

    def __init__(
        self,
        *,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        host: str | None = None,
    ) -> None:
        self._proc = proc_root
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._host = host or socket.gethostname()
        self._lock = threading.Lock()
        self._last_wall = clock()
        self._last_cpu = cpu_clock()

    def _memory(self) -> tuple[int, int]:
        info = _meminfo(self._proc)
        total = info.get("MemTotal", 0)
        if not total:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (OSError, ValueError):
                total = 0
        available = info.get("MemAvailable")
        used = max(total - available, 0) if available is not None else 0
        return used, total

    def sample(self) -> DeviceHealth:
        """Read RSS, CPU load since the previous sample (or creation) and host memory.

        Returns:
            A `DeviceHealth` with kind "cpu", always healthy; `cpu_load_pct` may exceed 100 with threads.
        """
        with self._lock:
            wall, cpu = self._clock(), self._cpu_clock()
            wall_delta = wall - self._last_wall
            load = max(cpu - self._last_cpu, 0.0) / wall_delta * 100.0 if wall_delta > 0 else 0.0
            self._last_wall, self._last_cpu = wall, cpu
        used, total = self._memory()
        return DeviceHealth(
            kind="cpu",
            device=f"cpu:{self._host}",
            index=0,
            nvml_available=False,
            memory_used_bytes=used,
            memory_total_bytes=total,
            healthy=True,
            cpu_load_pct=load,
            rss_bytes=_rss_bytes(self._proc),
        )

    def close(self) -> None:
        """Nothing to release; present so every probe closes the same way."""


def _parse_device(device: object) -> tuple[str | None, int | None]:
    """`None`, `"cpu"`, `"cuda:1"`, `1` or a `torch.device` -> (type, index)."""
    if device is None:
        return None, None
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda", device
    kind = getattr(device, "type", None)
    if isinstance(kind, str):
        index = getattr(device, "index", None)
        return kind, index if isinstance(index, int) else None
    if isinstance(device, str):
        kind, _, idx = device.partition(":")
        if idx and not idx.isdigit():
            raise ValueError(f"device={device!r} rejected: expected 'cpu', 'cuda' or 'cuda:N'")
        return kind, int(idx) if idx else None
    raise ValueError(f"device={device!r} rejected: expected None, an int, 'cuda:N', 'cpu' or a torch.device")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _nvml_target(cuda_index: int) -> tuple[int, str | None]:
    """Map a CUDA ordinal to an NVML (index, uuid): CUDA renumbers visible devices, NVML does not."""
    try:
        import torch

        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            return cuda_index, text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
    except Exception:  # any torch failure falls back to CUDA_VISIBLE_DEVICES
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.isdigit():
            return int(entry), None
        return cuda_index, entry
    return cuda_index, None


def make_probe(
    local_rank: int,
    *,
    device: object = None,
    nvml: Any = None,
    config: ProbeConfig | None = None,
) -> DeviceProbe:
    """Pick the probe for this rank.

    An injected `nvml` (e.g. `FakeNvml`) is used whatever the device, on NVML index `device`'s index
    or `local_rank`: the caller asked for that NVML. Otherwise the real `pynvml` is used when CUDA is
    in use (`device` is a CUDA device, or `device` is None and CUDA is available). When NVML does not
    load or initialize, the probe is a `CpuProbe`: health reporting never stops training.

    Args:
        local_rank: this rank's index on its node (the default CUDA ordinal).
        device: the training device: None, an int ordinal, "cpu", "cuda:N" or a `torch.device`.
        nvml: an NVML module to use instead of importing `pynvml`.
        config: thresholds for the NVML verdict.

    Returns:
        A probe whose `sample()` returns `DeviceHealth`.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank={local_rank} rejected: must be >= 0")
    kind, index = _parse_device(device)
    cuda_index = local_rank if index is None else index
    if nvml is None:
        if kind not in (None, "cuda") or not _cuda_available():
            return CpuProbe()
        try:
            import pynvml
        except ImportError:
            return CpuProbe()
        nvml = pynvml
        nvml_index, uuid = _nvml_target(cuda_index)
    else:
        nvml_index, uuid = cuda_index, None
    try:
        return NvmlProbe(nvml, index=nvml_index, uuid=uuid, config=config)
    except nvml.NVMLError:
        # No driver, no library, or the device is not visible to NVML: health degrades to the CPU view.
        return CpuProbe()
