"""A fake NVML provider with the function surface of NVIDIA's `pynvml` (nvidia-ml-py) that scripts
device faults by training step, so the NVML probe and the demo run deterministically without a GPU.

Modelled on torchft's `EventInjector.fail_at(rank, step)`: faults are declared up front
(`fail_at`, `ecc_rise_at`, `overheat_at`, `remap_at`) and fire when the threadlet calls `set_step`.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

# NVML ABI constants, same values as in pynvml.py.
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
nvmlEventTypeXidCriticalError = 0x0000000000000008
nvmlEventTypeNone = 0x0000000000000000

_ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}

# XIDs after which the real device stops answering (the driver reports it lost).
_LOSING_XIDS = frozenset({79})


class FakeNVMLError(Exception):
    """Stands in for `pynvml.NVMLError`: carries the NVML return code in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_NAMES.get(self.value, f"NVML error {self.value}")


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """A device handle; NVML's is an opaque pointer."""

    index: int


@dataclass(frozen=True, slots=True)
class FakeUtilization:
    gpu: int
    memory: int


@dataclass(frozen=True, slots=True)
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass(frozen=True, slots=True)
class FakeEventData:
    """Same fields as pynvml's `c_nvmlEventData_t`; `eventData` holds the XID."""

    device: FakeHandle
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(slots=True)
class FakeEventSet:
    registrations: dict[int, int] = field(default_factory=dict)  # device index -> event type mask
    queue: deque[FakeEventData] = field(default_factory=deque)
    freed: bool = False


@dataclass(slots=True, kw_only=True)
class FakeDevice:
    """The mutable state of one fake GPU; tests may set fields directly."""

    index: int
    uuid: str
    utilization_pct: int = 37
    memory_used_bytes: int = 12 * 2**30
    memory_total_bytes: int = 80 * 2**30
    temperature_c: int = 55
    power_mw: int = 250_000
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    remapped_corrected: int = 0
    remapped_uncorrected: int = 0
    remap_pending: bool = False
    remap_failed: bool = False
    clock_event_reasons: int = 0
    pcie_replay: int = 0
    lost: bool = False


@dataclass(slots=True, kw_only=True)
class _Fault:
    step: int
    index: int
    kind: str  # "xid" | "ecc" | "temp" | "remap"
    value: int
    lose_device: bool = False
    pending: bool = False
    failed: bool = False
    fired: bool = False


class FakeNvml:
    """A scripted NVML: the same function names as `pynvml`, state in memory, faults by step.

    Example:
        fake = FakeNvml(device_count=2)
        fake.fail_at(100, xid=79)          # device 0 falls off the bus at step 100
        fake.ecc_rise_at(50, 2, index=1)   # two uncorrected ECC errors on device 1 at step 50
        probe = NvmlProbe(fake, index=0)
        fake.set_step(100); probe.sample().healthy  # -> False

    Args:
        device_count: number of fake GPUs.

    Attributes:
        devices: per-index state, mutable by tests.
        step: the last step given to `set_step`.
        init_count: how many times `nvmlInit` succeeded minus `nvmlShutdown` calls.
    """

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError

    def __init__(self, device_count: int = 1) -> None:
        if device_count < 1:
            raise ValueError(f"device_count={device_count} rejected: must be >= 1")
        self.devices = [
            FakeDevice(index=i, uuid=f"GPU-fa4e0000-0000-4000-8000-{i:012x}") for i in range(device_count)
        ]
        self.step = -1
        self.init_count = 0
        self._faults: list[_Fault] = []
        self._errors: dict[tuple[str, int | None], int] = {}
        self._event_sets: list[FakeEventSet] = []
        self._lock = threading.Lock()

    # ---- fault scripting -------------------------------------------------------------------

    def fail_at(self, step: int, xid: int = 79, *, index: int = 0, lose_device: bool | None = None) -> None:
        """Deliver a critical XID event on device `index` once `set_step` reaches `step`.

        Args:
            step: training step at which the fault fires.
            xid: the XID code (79: GPU has fallen off the bus).
            index: device index.
            lose_device: whether device queries then fail with GPU_IS_LOST; by default only for
                XIDs after which real hardware stops answering (79).
        """
        lose = xid in _LOSING_XIDS if lose_device is None else lose_device
        self._add(_Fault(step=step, index=index, kind="xid", value=xid, lose_device=lose))

    def ecc_rise_at(self, step: int, count: int = 1, *, index: int = 0) -> None:
        """Add `count` volatile uncorrected ECC errors on device `index` at `step`."""
        if count < 1:
            raise ValueError(f"count={count} rejected: must be >= 1")
        self._add(_Fault(step=step, index=index, kind="ecc", value=count))

    def overheat_at(self, step: int, temp_c: int = 95, *, index: int = 0) -> None:
        """Set the GPU temperature of device `index` to `temp_c` at `step`."""
        self._add(_Fault(step=step, index=index, kind="temp", value=temp_c))

    def remap_at(self, step: int, *, pending: bool = False, failed: bool = True, index: int = 0) -> None:
        """Set the row-remapper pending / failure flags of device `index` at `step`."""
        self._add(_Fault(step=step, index=index, kind="remap", value=0, pending=pending, failed=failed))

    def set_error(
        self, function: str, code: int = NVML_ERROR_NOT_SUPPORTED, *, index: int | None = None
    ) -> None:
        """Make NVML function `function` raise `NVMLError(code)` (for device `index`, or for all)."""
        with self._lock:
            self._errors[(function, index)] = code

    def set_step(self, step: int) -> None:
        """Advance to `step`: every scripted fault whose step is reached and not yet fired fires now."""
        with self._lock:
            self.step = step
            for fault in sorted(self._faults, key=lambda f: f.step):
                if not fault.fired and fault.step <= step:
                    fault.fired = True
                    self._fire(fault)

    def _add(self, fault: _Fault) -> None:
        if fault.step < 0:
            raise ValueError(f"step={fault.step} rejected: must be >= 0")
        if not 0 <= fault.index < len(self.devices):
            raise ValueError(f"index={fault.index} rejected: must be in [0, {len(self.devices) - 1}]")
        with self._lock:
            self._faults.append(fault)

    def _fire(self, fault: _Fault) -> None:
        dev = self.devices[fault.index]
        if fault.kind == "xid":
            for event_set in self._event_sets:
                mask = event_set.registrations.get(fault.index, 0)
                if not event_set.freed and mask & nvmlEventTypeXidCriticalError:
                    event_set.queue.append(
                        FakeEventData(
                            device=FakeHandle(fault.index),
                            eventType=nvmlEventTypeXidCriticalError,
                            eventData=fault.value,
                        )
                    )
            dev.lost = dev.lost or fault.lose_device
        elif fault.kind == "ecc":
            dev.ecc_uncorrected += fault.value
        elif fault.kind == "temp":
            dev.temperature_c = fault.value
        elif fault.kind == "remap":
            dev.remap_pending = fault.pending
            dev.remap_failed = fault.failed

    # ---- the pynvml surface ------------------------------------------------------------------

    def _check(self, function: str, handle: FakeHandle | None = None) -> FakeDevice | None:
        index = None if handle is None else handle.index
        for key in ((function, index), (function, None)):
            if key in self._errors:
                raise FakeNVMLError(self._errors[key])
        if function not in ("nvmlInit", "nvmlShutdown") and self.init_count <= 0:
            raise FakeNVMLError(NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return None
        dev = self.devices[handle.index]
        if dev.lost:
            raise FakeNVMLError(NVML_ERROR_GPU_IS_LOST)
        return dev

    def _device(self, function: str, handle: FakeHandle) -> FakeDevice:
        dev = self._check(function, handle)
        assert dev is not None  # _check returns the device whenever a handle is given
        return dev

    def nvmlInit(self) -> None:
        with self._lock:
            self._check("nvmlInit")
            self.init_count += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            self._check("nvmlShutdown")
            if self.init_count <= 0:
                raise FakeNVMLError(NVML_ERROR_UNINITIALIZED)
            self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        with self._lock:
            self._check("nvmlDeviceGetCount")
            return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        with self._lock:
            self._check("nvmlDeviceGetHandleByIndex")
            if not 0 <= index < len(self.devices):
                raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        with self._lock:
            self._check("nvmlDeviceGetHandleByUUID")
            for dev in self.devices:
                if dev.uuid == text:
                    return FakeHandle(dev.index)
            raise FakeNVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        with self._lock:
            return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        with self._lock:
            dev = self._device("nvmlDeviceGetUtilizationRates", handle)
            return FakeUtilization(gpu=dev.utilization_pct, memory=dev.utilization_pct // 2)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> FakeMemory:
        with self._lock:
            dev = self._device("nvmlDeviceGetMemoryInfo", handle)
            used, total = dev.memory_used_bytes, dev.memory_total_bytes
            return FakeMemory(total=total, free=total - used, used=used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        with self._lock:
            dev = self._device("nvmlDeviceGetTemperature", handle)
            if sensor != NVML_TEMPERATURE_GPU:
                raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return dev.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        with self._lock:
            dev = self._device("nvmlDeviceGetTotalEccErrors", handle)
            if counterType not in (NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC):
                raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
                return dev.ecc_uncorrected
            if errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED:
                return dev.ecc_corrected
            raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        with self._lock:
            dev = self._device("nvmlDeviceGetRemappedRows", device)
            return (
                dev.remapped_corrected,
                dev.remapped_uncorrected,
                int(dev.remap_pending),
                int(dev.remap_failed),
            )

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_event_reasons

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        with self._lock:
            return self._device("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def nvmlEventSetCreate(self) -> FakeEventSet:
        with self._lock:
            self._check("nvmlEventSetCreate")
            event_set = FakeEventSet()
            self._event_sets.append(event_set)
            return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:
        with self._lock:
            self._device("nvmlDeviceRegisterEvents", handle)
            eventSet.registrations[handle.index] = eventSet.registrations.get(handle.index, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: FakeEventSet, timeoutms: int) -> FakeEventData:
        # Never sleeps: an empty queue answers TIMEOUT at once, as the real call does with timeout 0.
        with self._lock:
            self._check("nvmlEventSetWait_v2")
            if eventSet.freed:
                raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if not eventSet.queue:
                raise FakeNVMLError(NVML_ERROR_TIMEOUT)
            return eventSet.queue.popleft()

    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        with self._lock:
            self._check("nvmlEventSetFree")
            eventSet.freed = True
            if eventSet in self._event_sets:
                self._event_sets.remove(eventSet)

    def nvmlErrorString(self, result: int) -> str:
        return _ERROR_NAMES.get(result, f"NVML error {result}")


_SPEC_FORM = "KIND[:VALUE]@STEP[/INDEX] with KIND one of xid, ecc, temp, remap (e.g. xid:79@50,ecc:2@80/1)"


def from_spec(spec: str, *, device_count: int = 1) -> FakeNvml:
    """Build a scripted `FakeNvml` from a compact fault list, e.g. for an environment variable.

    `"xid:79@50,temp:95@120/1"` fails device 0 with XID 79 at step 50 and overheats device 1 to
    95 C at step 120. `ecc:N` adds N uncorrected ECC errors; `remap` sets the row-remapper failure.

    Raises:
        ValueError: an item is not of the form KIND[:VALUE]@STEP[/INDEX].
    """
    fake = FakeNvml(device_count=device_count)
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        head, at, where = item.partition("@")
        kind, _, value = head.partition(":")
        step_s, _, index_s = where.partition("/")
        numbers = [s for s in (value, step_s, index_s) if s]
        if not at or not step_s or not all(s.isdigit() for s in numbers):
            raise ValueError(f"fault {item!r} rejected: expected {_SPEC_FORM}")
        step, index = int(step_s), int(index_s) if index_s else 0
        if kind == "xid":
            fake.fail_at(step, int(value) if value else 79, index=index)
        elif kind == "ecc":
            fake.ecc_rise_at(step, int(value) if value else 1, index=index)
        elif kind == "temp":
            fake.overheat_at(step, int(value) if value else 95, index=index)
        elif kind == "remap" and not value:
            fake.remap_at(step, index=index)
        else:
            raise ValueError(f"fault {item!r} rejected: expected {_SPEC_FORM}")
    return fake
