"""The package's imports go one way: no module imports, directly or through others, a module that imports it.

Built from the source with ast, imports inside functions included (a lazy import that closes a circle still makes
the modules depend on each other; it only hides the circle until one of them is imported first)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"imgsearch": ROOT / "imgsearch", "imgsearch.ingest": ROOT / "ingest", "imgsearch.api": ROOT / "api"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` depends on the module; `from module import name` on the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    (folder / "sub").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (folder / "b.py").write_text("from . import a\nfrom .sub import c\n")
    (folder / "sub" / "__init__.py").write_text("")
    (folder / "sub" / "c.py").write_text("from ..a import f\n")
    monkeypatch.setattr(__import__(__name__), "FOLDERS", {"pkg": folder})
    graph = import_graph()
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a", "pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) is not None


@pytest.mark.parametrize("layer", ["scoring", "abstention", "enrolment_check", "review", "knn", "head"])
def test_recognition_layers_import_only_those_below(layer):
    order = ["scoring", "abstention", "enrolment_check", "review", "knn", "head"]
    graph = import_graph()
    name = f"imgsearch.recognition.{layer}"
    above = {f"imgsearch.recognition.{other}" for other in order[order.index(layer) + 1 :]} | {"imgsearch.recognition"}
    assert not graph[name] & above, f"{name} imports {sorted(graph[name] & above)}, which are above it"
