"""A CLI call's start stays cheap: what `python -m torchloom.app.cli` imports before it parses its
arguments (module level, read from the source) reaches no NATS client, aiohttp, weaver service or
control plane. status, set and journal talk gRPC only; the modules that need the rest import it where
they use it. Together those cost every CLI call about 0.5 s (the test suite makes about 100)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from tests.unit.test_layers import PACKAGES, _is_type_checking, all_modules

# Imported by a command that needs them, never by the CLI module itself or what it imports at load.
NOT_AT_LOAD = (
    "nats",
    "aiohttp",
    "torch",
    "bcrypt",
    "cryptography",
    "importlib.metadata",
    "torchloom.bus",
    "torchloom.nats_server",
    "torchloom.app.controlplane",
    "torchloom.app.launcher",
    "torchloom.app.history",
    "torchloom.app.run_args",
    "weaver.app",
    "weaver.service",
    "weaver.ui_server",
)


def load_time_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """What importing `module` imports (any package), leaving out imports in functions and under
    `if TYPE_CHECKING:`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from importlib import metadata` loads a module; a name that is no module is harmless.
                found.add(sub if sub in known or base.split(".")[0] not in PACKAGES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def closure(start: str) -> set[str]:
    """Every module importing `start` loads: ours followed through their load-time imports, with the
    packages that contain them; others by the name they are imported as."""
    modules = all_modules()
    known = set(modules)
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            seen.add(prefix)
            if prefix in modules:
                todo.extend(load_time_imports(prefix, modules[prefix], known))
    return seen


def reached(loaded: set[str], name: str) -> bool:
    return any(m == name or m.startswith(f"{name}.") for m in loaded)


def test_a_cli_call_loads_no_nats_aiohttp_or_weaver_service() -> None:
    loaded = closure("torchloom.app.cli")
    assert "torchloom.client" in loaded and "grpc" in loaded  # what status, set and journal use
    heavy = [name for name in NOT_AT_LOAD if reached(loaded, name)]
    assert not heavy, f"torchloom.app.cli loads {heavy} at import: import them where they are used"


def test_function_level_and_typing_imports_are_not_load_time(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "import nats\n"
        "if TYPE_CHECKING:\n    from weaver.service import Weaver\n"
        "def f():\n    from weaver.app import serve\n"
        "class C:\n    import aiohttp\n"
        "from . import sibling\n"
    )
    got = load_time_imports("torchloom.m", path, {"torchloom.sibling"})
    assert got == {"typing.TYPE_CHECKING", "nats", "aiohttp", "torchloom.sibling"}


def test_a_rank_start_loads_no_distributed_checkpoint() -> None:
    """`import threadlet` (every rank, every start) leaves torch.distributed.checkpoint (DTensor,
    sympy: about 1 s of CPU) to the first checkpoint a rank saves or loads."""
    loaded = closure("threadlet")
    assert "threadlet.agent" in loaded and "torch" in loaded
    assert not reached(loaded, "torch.distributed.checkpoint"), "import it where a checkpoint is taken"
    assert "threadlet.checkpoint" not in loaded
