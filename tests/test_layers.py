"""The package's floor plan holds: no import cycle, and no import from a lower floor to a higher one.

Floors follow the data flow (README, "Layout"): errors at the bottom; storage, configs,
label sets and metrics; checkpoints and the face stage; the shard contract and loaders;
models; ingest and reports; the sample corpus; training and checkpoint joins; labelling
and sweeps; the demo and the command line on top. Every import counts, module level and
inside functions alike (read with ``ast``, nothing is imported): a function-local import
hides a dependency from a reader, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "affectray"

FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("storage", "config", "labels", "metrics", "runtime"),
    ("checkpoints", "faces"),
    ("data",),
    ("models",),
    ("ingest", "report", "importers"),
    ("sample",),
    ("train", "combine"),
    ("label", "tune", "predict"),
    ("demo", "cli"),
]
FLOOR = {area: level for level, areas in enumerate(FLOORS) for area in areas}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("affectray", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The affectray modules ``name`` imports anywhere in its source (a name imported from a
    package counts as the submodule when there is one)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "affectray")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "affectray":
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {module for module in found if module != name and module != "affectray"}


def area(module: str) -> str:
    return module.split(".")[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_lives_on_a_floor():
    strays = sorted(name for name in modules() if name != "affectray" and area(name) not in FLOOR)
    assert not strays, f"modules outside the floor plan (add their area to FLOORS, in order): {strays}"


def test_no_import_reaches_up_a_floor():
    upward = [
        f"{name} (floor {FLOOR[area(name)]}) imports {target} (floor {FLOOR[area(target)]})"
        for name, targets in graph().items()
        if name != "affectray"
        for target in sorted(targets)
        if area(target) in FLOOR and area(name) in FLOOR and FLOOR[area(target)] > FLOOR[area(name)]
    ]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [node, target]) if target in stack else target)
            elif target not in state:
                visit(target, [*stack, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The check itself can fail: a function-local upward import is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from affectray.tune import run_tune\n    from . import shards\n")
    found = imports("affectray.data.m", source, {"affectray.data.shards": source})
    assert found == {"affectray.tune", "affectray.data.shards"}
