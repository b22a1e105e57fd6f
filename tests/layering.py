"""The import arrows between the project's packages, read from the source with ``ast``.

    python tests/layering.py [REPO_ROOT]

prints every import from one top-level package (``dino``, ``service``, ``training``, ``benchmarks``)
into another, grouped by arrow, then any import cycle between modules, then the rule violations,
and exits 1 when a rule is broken. Function-level imports count: they hide dependencies, they do
not remove them. ``tests/test_layering.py`` runs the same check.

The rules (the project's layering):

- ``dino`` is the torch-free core: it imports none of the other packages, nor torch;
- ``training`` stands on ``dino`` and never imports ``service``;
- ``service`` stands on ``dino`` and never imports ``training`` or torch;
- no module imports itself back through a chain of imports (no cycles).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("dino", "service", "training", "benchmarks")
#: (importing package, imported top-level name) pairs that break the layering
FORBIDDEN = {
    ("dino", "service"),
    ("dino", "training"),
    ("dino", "benchmarks"),
    ("dino", "torch"),
    ("training", "service"),
    ("service", "training"),
    ("service", "torch"),
    ("service", "torchvision"),
    ("service", "timm"),
}


@dataclass(frozen=True)
class Import:
    """One import statement: who imports what, and where."""

    module: str  #: importing module, e.g. ``training.export``
    target: str  #: imported module, e.g. ``dino.model_folder``
    path: str
    line: int
    lazy: bool  #: inside a function

    @property
    def arrow(self) -> tuple[str, str]:
        return self.module.split(".")[0], self.target.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the modules an ``ImportFrom`` may bring in (the module and ``module.name``)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def read_imports(root: Path) -> list[Import]:
    """Every import of every module of the project's packages below ``root``."""
    found: list[Import] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            tree = ast.parse(path.read_text(), filename=str(path))
            lazy_nodes = {
                id(inner)
                for outer in ast.walk(tree)
                if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
                for inner in ast.walk(outer)
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = _resolve(module, path.name == "__init__.py", node)
                else:
                    continue
                rel = str(path.relative_to(root))
                for target in targets:
                    found.append(Import(module, target, rel, node.lineno, id(node) in lazy_nodes))
    return found


def cross_package(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    """Imports from one project package into another (or into torch), grouped by arrow, deduplicated."""
    arrows: dict[tuple[str, str], dict[tuple[str, int], Import]] = defaultdict(dict)
    for imp in imports:
        src, dst = imp.arrow
        if src != dst and (dst in PACKAGES or (src, dst) in FORBIDDEN):
            arrows[(src, dst)].setdefault((imp.path, imp.line), imp)
    return {arrow: list(by_line.values()) for arrow, by_line in sorted(arrows.items())}


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of project modules (Tarjan): each is an import cycle."""
    modules = {imp.module for imp in imports}
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.target in modules and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(modules):
        if node not in index:
            visit(node)
    return groups


def violations(imports: list[Import]) -> list[Import]:
    """Import statements that break a rule of :data:`FORBIDDEN` (one entry per statement)."""
    by_statement: dict[tuple[str, int], Import] = {}
    for imp in imports:
        if imp.arrow in FORBIDDEN:
            by_statement.setdefault((imp.path, imp.line), imp)
    return list(by_statement.values())


def report(root: Path) -> int:
    """Print the arrows, cycles and violations of the tree at ``root``; 1 when a rule is broken."""
    imports = read_imports(root)
    print(f"cross-package imports in {root}:")
    for (src, dst), found in cross_package(imports).items():
        lazy = sum(imp.lazy for imp in found)
        print(f"  {src} -> {dst}: {len(found)} import statements ({lazy} inside functions)")
        for imp in found:
            print(f"      {imp.path}:{imp.line} {imp.target}{'  (lazy)' if imp.lazy else ''}")
    found_cycles = cycles(imports)
    print(f"import cycles: {len(found_cycles)}")
    for group in found_cycles:
        print(f"  {' <-> '.join(group)}")
    broken = violations(imports)
    print(f"layering violations: {len(broken)}")
    for imp in broken:
        print(f"  {imp.path}:{imp.line} imports {imp.target}")
    return 1 if broken or found_cycles else 0


if __name__ == "__main__":
    sys.exit(report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])))
