"""`make demo` is the Quickstart: examples/demo.py must pass as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_demo_passes(subprocess_env: dict[str, str]) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py")],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: every rank applied every command at the same step" in res.stdout
    assert "lr=-1 was rejected as expected: lr=-1 rejected: must be in (0, 10]" in res.stdout
