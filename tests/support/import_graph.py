"""The project's import graph, read statically (ast) from the installed packages' sources.

An edge a -> b means module a imports module b when a is imported: module-level imports, including
those under a top-level `if`/`try` but not under `if TYPE_CHECKING:`. Importing `p.q.r` also
imports the packages `p.q` and `p` (their `__init__`), so those count as edges too, except a
module's own parent packages (already loading when it runs). Imports inside functions are lazy:
`lazy_imports` lists them apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dsjax", "models", "pallas_kernels", "serving")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)


def _top_level_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in tree.body:
        if _is_type_checking(node):
            continue
        ids.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            for child in ast.walk(node):
                ids.add(id(child))
    return ids


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    return []


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, lazy edges) between the project's modules."""
    files = module_files()
    eager: dict[str, set[str]] = {m: set() for m in files}
    lazy: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        top = _top_level_nodes(tree)
        for node in ast.walk(tree):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _resolve(name, files)
                if target is None or target == module or module.startswith(target + "."):
                    continue  # unknown, itself, or its own package (already loading)
                (eager if id(node) in top else lazy)[module].add(target)
    for module, targets in eager.items():  # importing p.q.r runs p/__init__ and p/q/__init__ too
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        targets |= {p for p in parents if p in files and not module.startswith(p + ".") and p != module}
    return eager, lazy


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain (modules, importer first); raises ValueError on a cycle."""
    memo: dict[str, list[str]] = {}

    def chain(m: str, stack: tuple[str, ...]) -> list[str]:
        if m in stack:
            raise ValueError("import cycle: " + " -> ".join(stack[stack.index(m):] + (m,)))
        if m not in memo:
            below = [chain(t, stack + (m,)) for t in sorted(graph[m])]
            memo[m] = [m] + max(below, key=len, default=[])
        return memo[m]

    return max((chain(m, ()) for m in sorted(graph)), key=len)
