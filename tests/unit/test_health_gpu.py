"""The NVML probe against a real GPU and the real `pynvml`; skipped where there is none."""

from __future__ import annotations

from typing import Any

import pytest

from threadlet.health import NvmlProbe, make_probe


def _real_nvml() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML does not initialize: {exc}")
    pynvml.nvmlShutdown()
    return pynvml


@pytest.mark.gpu
def test_real_gpu_sample_is_plausible() -> None:
    _real_nvml()
    probe = make_probe(0)
    assert isinstance(probe, NvmlProbe)
    try:
        first, second = probe.sample(), probe.sample()
    finally:
        probe.close()
    assert first.kind == "cuda" and first.nvml_available
    assert first.device.startswith(("GPU-", "MIG-"))
    assert 0 < first.memory_used_bytes <= first.memory_total_bytes
    assert 0.0 <= first.utilization_pct <= 100.0
    assert first.temperature_c > 0.0
    assert second.healthy == (second.unhealthy_reason == "")  # a verdict always says why
