"""The import graph of llmforge, read from its source (nothing is imported or run): for tests on its shape."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "llmforge"


def _module_name(path: Path) -> tuple[str, str]:
    """(module, package it resolves relative imports against) of a file under ``PACKAGE``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a module imports at run time (``if TYPE_CHECKING:`` blocks never run, so they are skipped)."""
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import chat` imports a module
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> llmforge modules it imports, without edges to its own parent packages.

    Python imports a module's parent packages before the module itself whatever the module says, so an edge
    to an ancestor (``from . import chat`` names ``llmforge.tokenizer``) is not a dependency the module chose.
    """
    raw: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, package = _module_name(path)
        raw[name] = imports_of(ast.parse(path.read_text(encoding="utf-8")), package)
    return {
        m: {d for d in deps if d in raw and d != m and not m.startswith(d + ".")} for m, deps in raw.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, …, a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None
