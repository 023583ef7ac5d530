"""The package layout (issue 16, docs/architecture.md): one subpackage per pipeline stage, imports one way.

Read from the source with `ast`, so function-level imports count as much as module-level ones.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lean_onnx"
#: the stages in import order: a module may import its own stage and the stages before it, never after
STAGES = ("io", "graph", "select", "rewrite", "runtime", "train", "cli")
#: top-level modules every stage may import: they import no stage themselves
LEAVES = ("lean_onnx", "lean_onnx.errors", "lean_onnx.report")
MAX_LINES = 450


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def existing_module(dotted: str) -> str | None:
    """The module a dotted name is: a .py file or a package; None when it is neither."""
    path = ROOT.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return dotted
    return None


def imports_of(path: pathlib.Path) -> set[str]:
    """Every lean_onnx module `path` imports, anywhere in the file (module level or inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lean_onnx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lean_onnx":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import ondisk` imports a module, `from .x import f` a name
                found.add(existing_module(f"{target}.{alias.name}") or target)
    return {m for m in found if existing_module(m)} - {here}


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_stages_are_subpackages_and_the_top_is_small():
    subpackages = [d.name for d in PACKAGE.iterdir() if (d / "__init__.py").is_file()]
    assert set(STAGES) <= set(subpackages) and len(subpackages) >= 4
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    for stage in STAGES:  # each stage says what it takes and gives
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 15, stage


def test_no_import_circle(import_graph):
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(import_graph.get(module, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target] if target in stack else [module, target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(import_graph):
        if module not in state:
            visit(module, [module])


def test_imports_run_one_way_through_the_stages(import_graph):
    wrong = []
    for module, targets in import_graph.items():
        source = stage_of(module)
        for target in targets:
            if target in LEAVES or target.startswith("lean_onnx.__main__"):
                continue
            dest = stage_of(target)
            if module in LEAVES and dest is not None:
                wrong.append(f"{module} (a leaf) -> {target}")
            elif source is not None and dest is not None and STAGES.index(dest) > STAGES.index(source):
                wrong.append(f"{module} ({source}) -> {target} ({dest})")
    assert not wrong, "imports against the stage order:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_a_circle_and_a_wrong_direction(tmp_path, monkeypatch):
    """The two checks above can fail: a made-up graph with a circle and an upward import trips them."""
    graph = {"lean_onnx.graph.a": {"lean_onnx.select.b"}, "lean_onnx.select.b": {"lean_onnx.graph.a"}}
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circle(graph)
    with pytest.raises(AssertionError, match="lean_onnx.graph.a"):
        test_imports_run_one_way_through_the_stages(graph)


def test_function_level_imports_are_seen():
    targets = imports_of(PACKAGE / "cli" / "prune.py")
    assert "lean_onnx.runtime.validate" in targets  # imported inside cmd_prune only


@pytest.mark.parametrize("folder", ["lean_onnx", "tools"])
def test_no_file_over_the_line_limit(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_declared_dependency_is_imported_by_the_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in declared}
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    assert names <= imported, f"declared but never imported: {sorted(names - imported)}"
