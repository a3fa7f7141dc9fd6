"""The layering of STYLE.md, read from the source: the core (`torchloom`, without `torchloom.app`)
imports neither service nor the application; `weaver` and `threadlet` never import each other nor the
application; `torchloom.app` alone may import all three. And no import cycles among our modules.

Every import counts, also those inside functions: a lazy import hides an arrow, it does not remove it.
Only imports under `if TYPE_CHECKING:` are left out of the cycle check (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torchloom", "weaver", "threadlet")

# Which layers each layer may import.
ALLOWED = {
    "core": {"core"},
    "weaver": {"core", "weaver"},
    "threadlet": {"core", "threadlet"},
    "app": {"core", "weaver", "threadlet", "app"},
}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or package)
    line: int
    typing_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def layer(module: str) -> str:
    if module == "torchloom.app" or module.startswith("torchloom.app."):
        return "app"
    return "core" if module.split(".")[0] == "torchloom" else module.split(".")[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import statement of `module` that names one of our packages, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                out.append(Import(module, target, getattr(node, "lineno", 0), typing_only))
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(tree, False)
    return out


def collect() -> list[Import]:
    modules = all_modules()
    known = set(modules)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def layer_violations(imports: list[Import]) -> list[str]:
    return [
        f"{imp.where()}: a {layer(imp.source)} module may import only {sorted(ALLOWED[layer(imp.source)])}"
        for imp in imports
        if layer(imp.target) not in ALLOWED[layer(imp.source)]
    ]


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.typing_only:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def describe_cycle(component: list[str], imports: list[Import]) -> str:
    inside = set(component)
    arrows = [imp.where() for imp in imports if imp.source in inside and imp.target in inside]
    return f"import cycle among {', '.join(component)}: " + "; ".join(arrows)


def test_every_package_is_seen() -> None:
    imports = collect()
    assert {layer(i.source) for i in imports} == set(ALLOWED)


def test_layers_point_down() -> None:
    problems = layer_violations(collect())
    assert not problems, "layering broken (STYLE.md, 'Layout'):\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    imports = collect()
    problems = [describe_cycle(c, imports) for c in cycles(imports)]
    assert not problems, "\n".join(problems)


# ---- the checker itself, on made-up modules ---------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "ok"),
    [
        ("torchloom.wire", "torchloom.messages", True),
        ("torchloom.wire", "weaver.state", False),
        ("torchloom.naming", "threadlet.resume", False),
        ("torchloom.client", "torchloom.app.cli", False),
        ("weaver.state", "threadlet.agent", False),
        ("threadlet.agent", "weaver.state", False),
        ("weaver.service", "torchloom.app.launcher", False),
        ("torchloom.app.launcher", "weaver.app", True),
        ("torchloom.app.cli", "threadlet.replay", True),
    ],
)
def test_layer_rules(source: str, target: str, ok: bool) -> None:
    problems = layer_violations([Import(source, target, 7, False)])
    assert (not problems) is ok
    if not ok:
        assert f"{source} (line 7) imports {target}" in problems[0]


def test_function_level_imports_count(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from weaver.service import Weaver\n"
        "def f():\n    from weaver.app import serve\n    import threadlet.agent\n"
        "from . import sibling\n"
    )
    got = imports_of("torchloom.m", path, {"torchloom.sibling"})
    assert [(i.target, i.typing_only) for i in got] == [
        ("weaver.service", True),
        ("weaver.app", False),
        ("threadlet.agent", False),
        ("torchloom.sibling", False),
    ]


def test_cycles_are_found_and_named() -> None:
    imports = [
        Import("weaver.a", "weaver.b", 3, False),
        Import("weaver.b", "weaver.a", 9, False),
        Import("weaver.b", "weaver.c", 4, False),
        Import("weaver.c", "weaver.b", 5, True),  # typing only: not a cycle
    ]
    (component,) = cycles(imports)
    assert component == ["weaver.a", "weaver.b"]
    text = describe_cycle(component, imports)
    assert "weaver.a (line 3) imports weaver.b" in text and "weaver.b (line 9) imports weaver.a" in text
