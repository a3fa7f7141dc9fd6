"""The committed generated code in torchloom/v1 must be exactly what `make proto` produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = "torchloom/v1/torchloom.proto"
GENERATED = ("torchloom_pb2.py", "torchloom_pb2.pyi", "torchloom_pb2_grpc.py", "torchloom_pb2_grpc.pyi")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    if not (bindir / "protoc-gen-mypy").exists():
        pytest.fail(f"protoc-gen-mypy not in {bindir}: install the dev extras (make venv)")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    # Same include root and relative proto path as `make proto`, so the descriptors match byte for byte.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            f"proto/{PROTO}",
        ],
        cwd=REPO,
        env=env,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "torchloom" / "v1" / name).read_bytes()
        committed = (REPO / "torchloom" / "v1" / name).read_bytes()
        assert fresh == committed, f"torchloom/v1/{name} is stale: run `make proto` and commit the result"
