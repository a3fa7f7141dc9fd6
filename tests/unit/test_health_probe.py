"""Device probes: NvmlProbe against FakeNvml (the NVML boundary), CpuProbe against a fixture procfs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threadlet import nvml_fake
from threadlet.health import (
    APPLICATION_XIDS,
    CpuProbe,
    NvmlProbe,
    ProbeConfig,
    describe_xid,
    make_probe,
)
from threadlet.nvml_fake import FakeNvml, FakeNVMLError
from torchloom.messages import DeviceHealth


def _probe(fake: FakeNvml, **kw: object) -> NvmlProbe:
    return NvmlProbe(fake, **kw)  # type: ignore[arg-type]


def test_healthy_sample_fills_every_field() -> None:
    fake = FakeNvml()
    dev = fake.devices[0]
    dev.ecc_corrected, dev.clock_event_reasons, dev.pcie_replay = 4, 0x4, 7
    with _probe(fake) as probe:
        h = probe.sample()
    assert h == DeviceHealth(
        kind="cuda",
        device=dev.uuid,
        index=0,
        nvml_available=True,
        utilization_pct=37.0,
        memory_used_bytes=12 * 2**30,
        memory_total_bytes=80 * 2**30,
        temperature_c=55.0,
        power_w=250.0,
        ecc_volatile_uncorrected=0,
        ecc_volatile_corrected=4,
        remapped_rows_pending=0,
        remapped_rows_failed=0,
        clock_event_reasons=0x4,
        pcie_replay_count=7,
        xids=(),
        healthy=True,
        unhealthy_reason="",
        cpu_load_pct=h.cpu_load_pct,
        rss_bytes=h.rss_bytes,
    )
    assert h.rss_bytes > 0
    assert fake.init_count == 0  # close() shut down what the probe initialized


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (lambda f: f.fail_at(5, xid=79), "XID 79: GPU has fallen off the bus"),
        (lambda f: f.fail_at(5, xid=48), "XID 48: double bit ECC error"),
        (lambda f: f.fail_at(5, xid=999), "XID 999: critical error"),
        (lambda f: f.ecc_rise_at(5, 2), "volatile uncorrected ECC errors rose from 0 to 2"),
        (lambda f: f.overheat_at(5, 95), "temperature 95 C above 90 C"),
        (lambda f: f.remap_at(5, failed=True), "row remapping failed"),
        (lambda f: f.remap_at(5, pending=True, failed=False), "row remapping pending"),
    ],
)
def test_scripted_fault_turns_unhealthy_exactly_at_its_step(script: object, reason: str) -> None:
    fake = FakeNvml()
    script(fake)  # type: ignore[operator]
    probe = _probe(fake)
    for step in range(5):
        fake.set_step(step)
        assert probe.sample().healthy, step
    fake.set_step(5)
    h = probe.sample()
    assert not h.healthy
    assert reason in h.unhealthy_reason


@pytest.mark.parametrize("xid", sorted(APPLICATION_XIDS))
def test_application_xids_are_reported_but_leave_the_device_healthy(xid: int) -> None:
    fake = FakeNvml()
    fake.fail_at(3, xid=xid)
    probe = _probe(fake)
    fake.set_step(3)
    h = probe.sample()
    assert h.xids == (xid,)
    assert h.healthy and h.unhealthy_reason == ""
    assert probe.sample().xids == ()  # xids holds only those since the last sample


def test_fatal_xid_is_sticky_and_reported_once() -> None:
    fake = FakeNvml()
    fake.fail_at(2, xid=74, lose_device=False)
    probe = _probe(fake)
    fake.set_step(2)
    first = probe.sample()
    assert (first.xids, first.healthy) == ((74,), False)
    for step in range(3, 6):
        fake.set_step(step)
        later = probe.sample()
        assert later.xids == ()
        assert not later.healthy
        assert later.unhealthy_reason == "XID 74: NVLink error"
    assert probe.xids_seen == (74,)


def test_xid79_loses_the_device_but_the_sample_survives() -> None:
    fake = FakeNvml()
    fake.fail_at(1, xid=79)
    probe = _probe(fake)
    fake.set_step(1)
    h = probe.sample()
    assert not h.healthy
    assert h.unhealthy_reason == "XID 79: GPU has fallen off the bus; NVML: GPU is lost"
    assert (h.temperature_c, h.memory_total_bytes, h.power_w) == (0.0, 0, 0.0)
    assert h.nvml_available and h.kind == "cuda"


def test_temperature_verdict_recovers_when_the_gpu_cools() -> None:
    fake = FakeNvml()
    fake.overheat_at(1, 96)
    probe = _probe(fake, config=ProbeConfig(max_temperature_c=95))
    fake.set_step(1)
    assert not probe.sample().healthy
    fake.devices[0].temperature_c = 95  # at the threshold is fine: only above is unhealthy
    assert probe.sample().healthy


def test_ecc_counts_present_at_start_are_the_baseline() -> None:
    fake = FakeNvml()
    fake.devices[0].ecc_uncorrected = 3
    fake.ecc_rise_at(4, 1)
    probe = _probe(fake)
    assert probe.sample().healthy
    fake.set_step(4)
    h = probe.sample()
    assert (h.healthy, h.ecc_volatile_uncorrected) == (False, 4)
    assert h.unhealthy_reason == "volatile uncorrected ECC errors rose from 3 to 4"


def test_faults_hit_only_their_device() -> None:
    fake = FakeNvml(device_count=2)
    fake.fail_at(1, xid=79, index=0)
    fake.ecc_rise_at(1, 1, index=1)
    p0, p1 = _probe(fake, index=0), _probe(fake, index=1)
    fake.set_step(1)
    h0, h1 = p0.sample(), p1.sample()
    assert h0.unhealthy_reason.startswith("XID 79")
    assert h1.xids == () and h1.unhealthy_reason.startswith("volatile uncorrected ECC")
    assert (h0.index, h1.index) == (0, 1)
    assert h0.device != h1.device


def test_probe_by_uuid() -> None:
    fake = FakeNvml(device_count=3)
    probe = _probe(fake, index=2, uuid=fake.devices[2].uuid)
    assert probe.sample().device == fake.devices[2].uuid


_FIELD_OF = {
    "nvmlDeviceGetUtilizationRates": "utilization_pct",
    "nvmlDeviceGetMemoryInfo": "memory_total_bytes",
    "nvmlDeviceGetTemperature": "temperature_c",
    "nvmlDeviceGetPowerUsage": "power_w",
    "nvmlDeviceGetTotalEccErrors": "ecc_volatile_corrected",
    "nvmlDeviceGetRemappedRows": "remapped_rows_failed",
    "nvmlDeviceGetCurrentClocksEventReasons": "clock_event_reasons",
    "nvmlDeviceGetPcieReplayCounter": "pcie_replay_count",
}


@pytest.mark.parametrize(("function", "field"), sorted(_FIELD_OF.items()))
def test_one_unsupported_metric_leaves_only_its_field_empty(function: str, field: str) -> None:
    fake = FakeNvml()
    dev = fake.devices[0]
    dev.ecc_corrected, dev.clock_event_reasons, dev.pcie_replay = 2, 1, 3
    baseline = _probe(fake).sample()
    fake.set_error(function, nvml_fake.NVML_ERROR_NOT_SUPPORTED)
    h = _probe(fake).sample()
    assert h.healthy
    assert getattr(h, field) == 0
    if field != "remapped_rows_failed":  # zero on a healthy device, so nothing to compare
        assert getattr(baseline, field) != 0
    untouched = [
        f.name for f in dataclasses.fields(DeviceHealth) if f.name not in {field, "cpu_load_pct", "rss_bytes"}
    ]
    related = {
        "memory_total_bytes": "memory_used_bytes",
        "ecc_volatile_corrected": "ecc_volatile_uncorrected",
    }
    for name in untouched:
        if name != related.get(field):
            assert getattr(h, name) == getattr(baseline, name), name


def test_clock_reasons_fall_back_to_the_throttle_name_on_old_drivers() -> None:
    fake = FakeNvml()
    fake.devices[0].clock_event_reasons = 0x40
    fake.set_error("nvmlDeviceGetCurrentClocksEventReasons", nvml_fake.NVML_ERROR_FUNCTION_NOT_FOUND)
    assert _probe(fake).sample().clock_event_reasons == 0x40


def test_without_xid_events_the_other_checks_still_run() -> None:
    fake = FakeNvml()
    fake.set_error("nvmlDeviceRegisterEvents", nvml_fake.NVML_ERROR_NOT_SUPPORTED)
    fake.fail_at(1, xid=79, lose_device=False)
    fake.overheat_at(1, 99)
    probe = _probe(fake)
    assert probe.events_error == "XID events unavailable: Not Supported"
    fake.set_step(1)
    h = probe.sample()
    assert h.xids == ()
    assert h.unhealthy_reason == "temperature 99 C above 90 C"


def test_close_is_idempotent_and_releases_nvml() -> None:
    fake = FakeNvml()
    probe = _probe(fake)
    assert fake.init_count == 1
    probe.close()
    probe.close()
    assert fake.init_count == 0


def test_constructor_failure_shuts_nvml_down() -> None:
    fake = FakeNvml()
    with pytest.raises(FakeNVMLError):
        _probe(fake, index=5)
    assert fake.init_count == 0


@given(st.lists(st.lists(st.sampled_from([13, 31, 43, 45, 48, 68, 74, 79, 94]), max_size=3), max_size=6))
def test_verdict_is_unhealthy_from_the_first_fatal_xid_on(batches: list[list[int]]) -> None:
    fake = FakeNvml()
    for step, batch in enumerate(batches):
        for xid in batch:
            fake.fail_at(step, xid=xid, lose_device=False)
    probe = _probe(fake)
    seen: list[int] = []
    for s, batch in enumerate(batches):
        fake.set_step(s)
        h = probe.sample()
        seen.extend(batch)
        assert list(h.xids) == batch
        fatal = [x for x in seen if x not in APPLICATION_XIDS]
        assert h.healthy == (not fatal)
        assert h.unhealthy_reason == (describe_xid(fatal[0]) if fatal else "")


@pytest.mark.parametrize(
    ("xid", "text"),
    [
        (79, "XID 79: GPU has fallen off the bus"),
        (48, "XID 48: double bit ECC error"),
        (7, "XID 7: critical error"),
    ],
)
def test_describe_xid(xid: int, text: str) -> None:
    assert describe_xid(xid) == text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_temperature_c": 0}, "max_temperature_c=0 rejected: must be in (0, 200]"),
        ({"max_temperature_c": float("nan")}, "max_temperature_c=nan rejected"),
        ({"max_events_per_sample": 0}, "max_events_per_sample=0 rejected: must be >= 1"),
    ],
)
def test_probe_config_rejects_bad_thresholds(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ProbeConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.fail_at(1, index=3), r"index=3 rejected: must be in \[0, 0\]"),
        (lambda f: f.ecc_rise_at(-1), "step=-1 rejected: must be >= 0"),
        (lambda f: f.ecc_rise_at(1, 0), "count=0 rejected: must be >= 1"),
    ],
)
def test_fake_rejects_bad_scripts(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(FakeNvml())  # type: ignore[operator]


# ---- make_probe ---------------------------------------------------------------------------------


def test_make_probe_uses_an_injected_nvml_on_the_local_rank_device() -> None:
    fake = FakeNvml(device_count=2)
    probe = make_probe(1, nvml=fake)
    assert isinstance(probe, NvmlProbe)
    assert probe.sample().device == fake.devices[1].uuid
    assert make_probe(0, device="cuda:1", nvml=fake).sample().index == 1


def test_make_probe_falls_back_to_cpu_when_nvml_does_not_initialize() -> None:
    fake = FakeNvml()
    fake.set_error("nvmlInit", nvml_fake.NVML_ERROR_DRIVER_NOT_LOADED)
    assert isinstance(make_probe(0, nvml=fake), CpuProbe)


@pytest.mark.parametrize("device", ["cpu", None])
def test_make_probe_without_cuda_is_a_cpu_probe(device: str | None) -> None:
    torch = pytest.importorskip("torch")
    if device is None and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    probe = make_probe(0, device=device)
    assert isinstance(probe, CpuProbe)
    assert probe.sample().kind == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_rank": -1}, "local_rank=-1 rejected: must be >= 0"),
        (
            {"local_rank": 0, "device": "cuda:x"},
            "device='cuda:x' rejected: expected 'cpu', 'cuda' or 'cuda:N'",
        ),
        ({"local_rank": 0, "device": 1.5}, "device=1.5 rejected"),
    ],
)
def test_make_probe_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_probe(**kwargs)  # type: ignore[arg-type]


# ---- CpuProbe -----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cpu_probe_reads_procfs_and_computes_load(tmp_path: Path) -> None:
    import os

    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "statm").write_text("5000 1234 300 10 0 900 0\n")
    (tmp_path / "meminfo").write_text(
        "MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    4000000 kB\n"
    )
    wall, cpu = _Clock(), _Clock()
    probe = CpuProbe(proc_root=tmp_path, clock=wall, cpu_clock=cpu, host="node7")
    wall.t, cpu.t = 2.0, 1.0
    h = probe.sample()
    assert h.kind == "cpu" and h.device == "cpu:node7" and not h.nvml_available and h.healthy
    assert h.cpu_load_pct == pytest.approx(50.0)
    assert h.rss_bytes == 1234 * os.sysconf("SC_PAGE_SIZE")
    assert (h.memory_total_bytes, h.memory_used_bytes) == (16_000_000 * 1024, 12_000_000 * 1024)
    wall.t, cpu.t = 3.0, 2.5  # load is per interval, not since start
    assert probe.sample().cpu_load_pct == pytest.approx(150.0)
    assert probe.sample().cpu_load_pct == 0.0  # no wall time elapsed: no division by zero


def test_cpu_probe_without_procfs_uses_getrusage_and_sysconf(tmp_path: Path) -> None:
    h = CpuProbe(proc_root=tmp_path / "missing").sample()
    assert h.rss_bytes > 0
    assert h.memory_total_bytes > 0
    assert h.memory_used_bytes == 0


def test_cpu_probe_on_the_real_proc_measures_this_process() -> None:
    probe = CpuProbe()
    total = sum(i * i for i in range(200_000))  # burn some CPU so the load is above zero
    assert total > 0
    h = probe.sample()
    assert h.rss_bytes > 1_000_000
    assert h.memory_total_bytes >= h.memory_used_bytes > 0
    assert h.cpu_load_pct > 0.0


def test_fault_spec_scripts_the_fake() -> None:
    fake = nvml_fake.from_spec("xid:79@5, temp:97@3/1, ecc@4/1", device_count=2)
    p0, p1 = _probe(fake, index=0), _probe(fake, index=1)
    fake.set_step(4)
    assert p0.sample().healthy
    assert p1.sample().unhealthy_reason == (
        "volatile uncorrected ECC errors rose from 0 to 1; temperature 97 C above 90 C"
    )
    fake.set_step(5)
    assert p0.sample().unhealthy_reason.startswith("XID 79: GPU has fallen off the bus")


@pytest.mark.parametrize("spec", ["xid79@5", "xid:79", "boom@3", "remap:1@3", "ecc:-1@3", "temp:95@x"])
def test_bad_fault_spec_names_the_expected_form(spec: str) -> None:
    with pytest.raises(ValueError, match=r"rejected: expected KIND\[:VALUE\]@STEP\[/INDEX\]"):
        nvml_fake.from_spec(spec)
