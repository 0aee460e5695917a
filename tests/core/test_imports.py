"""The import graph of llmforge has no cycles, lazy imports inside functions included.

A cycle hidden in function bodies (``chat`` importing ``info`` which imports ``chat``) still couples two modules
both ways: neither can be read, tested or moved alone, and import order starts to matter. This reads every
``import`` statement in the package (not running anything) and fails naming the cycle.
"""

from __future__ import annotations

import ast

from tests.core.import_graph import find_cycle, import_graph, imports_of


def test_find_cycle_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_inside_functions_are_seen():
    tree = ast.parse(
        "def f():\n    from .info import load\n\nif TYPE_CHECKING:\n    from .stage import run\n"
    )
    assert imports_of(tree, "llmforge.tokenizer") == {
        "llmforge.tokenizer.info",
        "llmforge.tokenizer.info.load",
    }


def test_llmforge_has_no_import_cycle():
    graph = import_graph()
    assert "llmforge.tokenizer.chat" in graph and "llmforge.errors" in graph["llmforge.tokenizer.chat"]
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle: " + " -> ".join(cycle) + ". Move what both need into the lower module, or pass it in."
    )
