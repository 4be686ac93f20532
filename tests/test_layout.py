"""The shape of the code: the engine's packages import one way, and nothing imports in a circle.

``engine/__init__.py`` states the rules; this test keeps them. Imports are read from the
source (``ast``), so it checks every module, including ones no other test imports.
"""
import ast
from pathlib import Path

from conftest import ROOT

FACES = {"interface", "model", "trainer", "response_generator", "bench"}  # top-level modules
BELOW = {  # each engine package: the engine packages it may import
    "model": set(),
    "runtime": {"model"},
    "data": {"model", "runtime"},
    "folder": {"model", "runtime", "data"},
    "training": {"model", "runtime", "data", "folder"},
    "generation": {"model", "runtime", "data", "folder"},
    "export": {"model", "runtime", "data", "folder"},
    "serving": {"model", "runtime", "data", "folder", "generation"},
    "app": {"model", "runtime", "data", "folder", "training", "generation", "export", "serving"},
}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for the engine and the top-level modules (tests and scripts left out)."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for path in (ROOT / "engine").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from engine.data import tokenizer`` counts as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_every_engine_package_is_known_and_says_what_it_owns():
    packages = {p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(BELOW)
    for name in packages:
        doc = ast.get_docstring(ast.parse((ROOT / "engine" / name / "__init__.py").read_text()))
        assert doc and "import" in doc, f"engine/{name}/__init__.py must say what it owns and may import"


def test_engine_packages_import_only_the_packages_below_them():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        if not name.startswith("engine."):
            continue
        package = name.split(".")[1]
        for target in imports_of(path, modules) - {name}:
            if target in FACES:
                wrong.append(f"{name} imports the top-level {target}")
            elif target.startswith("engine.") and (other := target.split(".")[1]) != package \
                    and other not in BELOW[package]:
                wrong.append(f"{name} ({package}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_around_a_circle():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, cycles
