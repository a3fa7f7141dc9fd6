"""A simple CPU device probe for heartbeats; `sample_device` is the one seam a richer probe replaces."""

from __future__ import annotations

import os
import socket

from torchloom.messages import DeviceHealth

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HOST = socket.gethostname()
_CPUS = os.cpu_count() or 1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_load_pct() -> float:
    try:
        return 100.0 * os.getloadavg()[0] / _CPUS
    except OSError:
        return 0.0


def sample_device() -> DeviceHealth:
    """Sample this process's device health: the CPU host, its load and our resident memory."""
    return DeviceHealth(
        kind="cpu",
        device=f"cpu:{_HOST}",
        index=0,
        healthy=True,
        cpu_load_pct=_cpu_load_pct(),
        rss_bytes=_rss_bytes(),
    )
