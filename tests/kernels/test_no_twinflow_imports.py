"""``kernels/`` imports nothing from ``twinflow`` (issue 13 item 3): callers pass plain scalars and
tensors, and ``twinflow`` imports the kernels, never the other way round. Checked on the syntax tree of
every file, so an import inside a function or a ``try`` counts, and a mention in a docstring does not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imported_modules(tree: ast.AST) -> list[str]:
    """Absolute names of the modules imported anywhere in ``tree`` (relative imports stay inside kernels/)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return names


@pytest.mark.parametrize("path", sorted(KERNELS.glob("**/*.py")), ids=lambda p: str(p.relative_to(KERNELS)))
def test_kernel_file_imports_nothing_from_twinflow(path):
    imported = _imported_modules(ast.parse(path.read_text(), filename=str(path)))
    offending = [name for name in imported if name == "twinflow" or name.startswith("twinflow.")]
    assert not offending, f"kernels/{path.relative_to(KERNELS)} imports {offending}: pass plain scalars and tensors"


def test_the_check_sees_imports():
    tree = ast.parse("def f():\n    from twinflow.method import x\nimport twinflow.kernels as k\n"
                     "importlib.import_module('twinflow.config')\n'import twinflow'\n")
    assert sorted(_imported_modules(tree)) == ["twinflow.config", "twinflow.kernels", "twinflow.method"]
