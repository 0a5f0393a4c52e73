"""Layers that point one way: every project import (module level, lazy, or type-checking only) goes down.

Order, lowest first (a package may import only packages of a lower rank, or of its own)::

    core  <-  transport, conveyor  <-  codec  <-  pipeline  <-  stages  <-  benchmarks

``transport`` and ``conveyor`` share a rank and must not import each other. Read with ``ast`` only: nothing is
imported, so the test is cheap and sees imports inside functions too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"core": 0, "transport": 1, "conveyor": 1, "codec": 2, "pipeline": 3, "stages": 4, "benchmarks": 5}

#: known upward imports, "file:imported.module" -> why it is still there. Keep this empty or shrinking.
ALLOWED_UPWARD: dict[str, str] = {}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative imports resolved against the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if node.level == 0 and node.module in RANK:  # `from pipeline import errors`: the submodules count
                out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> ["file:line module", ...] across the project's packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for pkg in RANK:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, mod in _imports(path):
                top = mod.split(".")[0]
                if top in RANK and top != pkg:
                    edges.setdefault((pkg, top), []).append(f"{rel}:{line} {mod}")
    return edges


def test_every_package_exists():
    for pkg in RANK:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_core_imports_nothing_from_the_project():
    bad = [hit for (src, _), hits in _edges().items() if src == "core" for hit in hits]
    assert not bad, "core/ must stay the bottom layer:\n" + "\n".join(bad)


def test_imports_point_down():
    bad = []
    for (src, dst), hits in _edges().items():
        if RANK[dst] < RANK[src]:
            continue
        for hit in hits:
            where, mod = hit.split(" ", 1)
            if f"{where.rsplit(':', 1)[0]}:{mod}" not in ALLOWED_UPWARD:
                bad.append(f"{hit}  ({src} -> {dst})")
    assert not bad, ("imports against the layer order core <- transport, conveyor <- codec <- pipeline <- stages "
                     "<- benchmarks:\n" + "\n".join(bad))


def test_allowed_exceptions_are_still_needed():
    """An allow-list entry whose import is gone must be deleted, so the list only shrinks."""
    seen = set()
    for hits in _edges().values():
        for hit in hits:
            where, mod = hit.split(" ", 1)
            seen.add(f"{where.rsplit(':', 1)[0]}:{mod}")
    assert not set(ALLOWED_UPWARD) - seen, set(ALLOWED_UPWARD) - seen


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {pkg: set() for pkg in RANK}
    for src, dst in _edges():
        graph[src].add(dst)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for pkg in RANK:
        if pkg not in state:
            cycle = visit(pkg)
            assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_tests_import_core_not_the_old_homes():
    """Inside the project the moved names are imported from core/; the old homes are for third-party code."""
    old = {"pipeline.errors", "pipeline.offline"}
    moved = {("stages.edge", "letterbox_image"), ("stages.edge", "letterbox_params"),
             ("stages.consumers", "map_boxes"), ("stages.consumers", "map_class_map"),
             ("codec.tasks", "map_boxes"), ("codec.tasks", "map_class_map"),
             ("codec.tasks", "rle_encode"), ("codec.tasks", "rle_decode"),
             ("stages.sinks", "rle_encode"), ("stages.sinks", "rle_decode"), ("pipeline.stage", "Letterbox")}
    bad = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] not in {*RANK, "tests"} or rel in {"pipeline/errors.py", "pipeline/offline.py"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad += [f"{rel}:{node.lineno} {a.name}" for a in node.names if a.name in old]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                if node.module in old:
                    bad.append(f"{rel}:{node.lineno} {node.module}")
                bad += [f"{rel}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if (node.module, a.name) in moved and "noqa: F401" not in _line(path, node.lineno)]
    assert not bad, "import these from core/ instead:\n" + "\n".join(bad)


def _line(path: Path, lineno: int) -> str:
    return path.read_text(encoding="utf-8").splitlines()[lineno - 1]
