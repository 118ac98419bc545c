"""The shape of the code: imports point one way, with no cycles (imports inside functions
included), modules stay small, long functions say why.

Rooms, from the bottom: the model core (``diffusion_core``'s own modules) <- data <- evaluation,
safety, report (side by side, never importing each other) <- pipeline <- tasks <- flows. A room
imports only from the rooms below it; the library never imports Prefect, MLflow or the flows."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as.
PACKAGES = {
    "diffusion_core": "diffusion_core",
    "flows": "diffpipe.flows",
    "tasks": "diffpipe.tasks",
}
MAX_MODULE_LINES = 460
# Modules allowed to be longer, and why.
LONG_MODULES = {
    "diffusion_core.config": "every setting with its description, the source of the README's "
    "configuration reference; one place to read what a run can set",
}
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_NOTE = "# Long function:"  # a comment in the function saying why it is long

RANKS = {
    "core": 0,
    "data": 1,
    "evaluation": 2,
    "safety": 2,
    "report": 2,
    "pipeline": 3,
    "tasks": 4,
    "flows": 5,
}
ORCHESTRATION = ("prefect", "mlflow")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def modules() -> dict[str, Module]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [] if rel.name == "__init__" else [rel.name]
            name = ".".join([package, *rel.parent.parts, *parts])
            found[name] = Module(name, path, rel.name == "__init__")
    return found


def imports(module: Module) -> Iterator[str]:
    """Every module name ``module`` imports, at the top or inside functions."""
    tree = ast.parse(module.path.read_text())
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for target in imports(module) if target in known and target != name}
        for name, module in known.items()
    }


def room(name: str) -> str:
    if name.startswith("diffpipe.flows"):
        return "flows"
    if name.startswith("diffpipe.tasks"):
        return "tasks"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else "core"


def test_every_module_is_in_a_room() -> None:
    for name in modules():
        assert room(name) in RANKS, name


def test_imports_point_down_only() -> None:
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            mine, theirs = room(name), room(target)
            if mine == theirs:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_library_knows_nothing_of_orchestration() -> None:
    for name, module in modules().items():
        if not name.startswith("diffusion_core"):
            continue
        found = [t for t in imports(module) if t.split(".")[0] in (*ORCHESTRATION, "diffpipe")]
        assert not found, f"{name} imports {found}"


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_cycle_check_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above see imports inside functions: a cycle hidden there is found."""
    fake = {"diffusion_core.a": {"diffusion_core.b"}, "diffusion_core.b": {"diffusion_core.a"}}
    monkeypatch.setitem(globals(), "graph", lambda: fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    source = "def f():\n    from diffusion_core.data import load_dataset\n"
    tree_module = Module("diffusion_core.x", Path("x.py"), False)
    monkeypatch.setattr(Path, "read_text", lambda self: source)
    assert "diffusion_core.data" in set(imports(tree_module))


def test_modules_stay_small_and_long_functions_say_why() -> None:
    too_long, unexplained = [], []
    for name, module in modules().items():
        text = module.path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES and name not in LONG_MODULES:
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not any(
                    LONG_FUNCTION_NOTE in line for line in body
                ):
                    unexplained.append(f"{name}.{node.name}: {len(body)} lines")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
    assert not unexplained, (
        f"functions over {MAX_FUNCTION_LINES} lines with no reason: {unexplained}"
    )


def test_stages_never_branch_on_tensor_shapes() -> None:
    """Images and volumes differ only in ``pipeline/modality.py``."""
    for path in sorted((REPO / "diffusion_core" / "pipeline" / "stages").glob("*.py")):
        assert ".ndim" not in path.read_text(), path.name
