"""Imports run one way (issue 13, item 2): no cycle among the modules of ``twinflow/`` and ``kernels/``.

Each module's imports are read from its source (the AST, every ``import`` statement, including those
inside functions: a lazy import that closes a circle is still a circle), resolved to the modules of this
repository they name, and the resulting graph is checked for cycles. A package's ``__init__`` counts as a
module; ``from package import name`` is an edge to the submodule when ``name`` is one, else to the
package. Once Qwen-Image's ``config``, ``build`` and ``lora`` imported each other in a circle, through a
lazy ``config.__getattr__``.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "twinflow").rglob("*.py")):
        if "kernels" in path.relative_to(REPO).parts[:2]:
            continue  # the symlink some worktrees have; kernels/ is read below under its installed name
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "kernels").glob("*.py")):
        name = "twinflow.kernels" if path.stem == "__init__" else f"twinflow.kernels.{path.stem}"
        found[name] = path
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases, names = [base], [a.name for a in node.names]
        else:
            continue
        for base in bases:
            for sub in names or [None]:
                full = f"{base}.{sub}" if sub else base
                target = full if full in modules else base
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
    return targets


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_edges_only(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges into a package's ``__init__`` from its own submodules are how Python imports a submodule
    (the parent runs first), not a design dependency: drop them, keep everything else."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    modules = _modules()
    graph = _package_edges_only({name: _edges(name, path, modules) for name, path in modules.items()})
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
