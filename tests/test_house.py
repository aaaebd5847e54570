"""The structure of the house, read from the source (ast): imports run one way, no cycles.

Layers, bottom up: lora_core (torch + safetensors only) -> tasks/common -> tasks/records ->
tasks/interface -> a task kind (tasks/classification, tasks/causal) -> tasks/register, the
kind registry (tasks/kinds) and tasks/train_adapter -> tasks/stages -> flows. A module imports
only from its own layer or below, never from the other task kind, and only at module level
(the CLI's lazy imports, which keep `--help` and `check-config` fast, are the one exception).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "lora_core")
PROJECT = (*PACKAGES, "testkit")
LAZY_IMPORTS_ALLOWED = {"flows.cli"}
MAX_FUNCTION_LINES = 60
LAYERS = [  # (module prefix, layer); the longest matching prefix decides
    ("lora_core", 0),
    ("tasks", 1),  # tasks/__init__.py
    ("tasks.common", 1),
    ("tasks.records", 2),
    ("tasks.interface", 3),
    ("tasks.classification", 4),
    ("tasks.causal", 4),
    ("tasks.register", 5),
    ("tasks.kinds", 5),
    ("tasks.train_adapter", 5),  # the train stage's work, in-process or on each rank
    ("tasks.search", 5),  # the search stage: trials of the train stage's work
    ("tasks.watch", 5),  # the data watch: reads what production was trained on
    ("tasks.stages", 6),
    ("flows", 7),
]
KINDS = ("tasks.classification", "tasks.causal")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[ast.Module, bool]]:
    """module name -> (its syntax tree, whether it is a package's __init__)."""
    return {
        module_name(path): (
            ast.parse(path.read_text(), filename=str(path)),
            path.stem == "__init__",
        )
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imported(node: ast.AST, module: str, is_package: bool = False) -> list[str]:
    """Absolute names an import statement brings in (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = module.split(".")
            package = parts[: len(parts) - node.level + (1 if is_package else 0)]
            base = ".".join([*package, node.module] if node.module else package)
        else:
            base = node.module or ""
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module a dotted name refers to (a module, or a name inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def layer(module: str) -> int:
    return max((len(p), rank) for p, rank in LAYERS if module == p or module.startswith(p + "."))[1]


def kind_of(module: str) -> str | None:
    return next((k for k in KINDS if module == k or module.startswith(k + ".")), None)


@pytest.fixture(scope="module")
def house():
    parsed = sources()
    trees = {module: tree for module, (tree, _) in parsed.items()}
    modules = set(trees)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy, third_party = [], {m: set() for m in modules}
    for module, (tree, is_package) in parsed.items():
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            for name in imported(node, module, is_package):
                target = resolve(name, modules)
                if target is None:
                    if name.split(".")[0] not in PROJECT:
                        third_party[module].add(name.split(".")[0])
                    continue
                if target != module:
                    edges[module].add(target)
                if id(node) not in top_level and module not in LAZY_IMPORTS_ALLOWED:
                    lazy.append(f"{module} imports {target} inside a function")
    return trees, edges, lazy, third_party


def test_no_import_cycles(house):
    _, edges, _, _ = house
    seen, on_path, cycles = set(), [], []

    def visit(module):
        if module in on_path:
            cycles.append(" -> ".join([*on_path[on_path.index(module) :], module]))
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for target in sorted(edges[module]):
            visit(target)
        on_path.pop()

    for module in sorted(edges):
        visit(module)
    assert cycles == []


def test_imports_run_down_the_layers(house):
    _, edges, _, _ = house
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in edges.items()
        for t in targets
        if layer(t) > layer(m)
    ]
    assert upward == []


def test_a_task_kind_never_imports_the_other(house):
    _, edges, _, _ = house
    crossing = [
        f"{m} imports {t}"
        for m, targets in edges.items()
        for t in targets
        if kind_of(m) and kind_of(t) and kind_of(m) != kind_of(t)
    ]
    assert crossing == []


def test_lora_core_needs_only_torch_and_safetensors(house):
    _, edges, _, third_party = house
    allowed = {"torch", "safetensors", *sys.stdlib_module_names}
    extra = {m: sorted(third_party[m] - allowed) for m in third_party if m.startswith("lora_core")}
    assert {m: names for m, names in extra.items() if names} == {}
    assert all(
        t.startswith("lora_core") for m in edges if m.startswith("lora_core") for t in edges[m]
    )


def test_project_modules_are_imported_at_module_level(house):
    _, _, lazy, _ = house
    assert lazy == []


def test_functions_are_at_most_60_lines(house):
    trees, _, _, _ = house
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_only_the_kind_registry_branches_on_the_task(house):
    """No `config.task == ...` outside tasks/kinds.py: a new kind is a folder plus one entry."""
    trees, _, _, _ = house
    branches = [
        f"{module}:{node.lineno}"
        for module, tree in trees.items()
        if module != "tasks.kinds"
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(
            isinstance(side, ast.Attribute) and side.attr == "task"
            for side in (node.left, *node.comparators)
        )
    ]
    assert branches == []


def test_the_checks_see_a_violation(tmp_path):
    """The graph reader finds a function-level import and resolves relative imports."""
    tree = ast.parse("from .config import X\ndef f():\n    from tasks.kinds import kind_of\n")
    names = [n for node in ast.walk(tree) for n in imported(node, "lora_core.io")]
    assert "lora_core.config.X" in names and "tasks.kinds.kind_of" in names
    init = [n for node in ast.walk(tree) for n in imported(node, "lora_core", is_package=True)]
    assert "lora_core.config.X" in init
    assert layer("tasks.common.config") == 1 and layer("tasks.causal.data") == 4
    assert kind_of("tasks.causal.data") == "tasks.causal" and kind_of("tasks.records") is None
