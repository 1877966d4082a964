"""Code-shape rules ruff has no check for: a function body holds at most 60 lines.

The body is what follows the signature and the docstring: a typed CLI command declares one
line per option, and that declaration is not logic to split. `make test` runs this file with
ruff (line length, docstrings, imports) and mypy.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
    decorators = getattr(body[0], "decorator_list", [])
    first = min([body[0].lineno, *(d.lineno for d in decorators)])
    return (node.end_lineno or node.lineno) - first + 1


def long_functions() -> list[str]:
    found, seen = [], set()
    for folder in ("onnxcompress", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in seen:  # onnxcompress/passes links to passes/
                continue
            seen.add(path.resolve())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = body_lines(node)
                    if lines > LIMIT:
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        found.append(f"{where} {node.name}: {lines} lines")
    return found


def test_function_bodies_stay_within_60_lines() -> None:
    long = long_functions()
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_body_is_counted_without_signature_and_docstring() -> None:
    source = 'def f(\n    a: int,\n    b: int,\n) -> None:\n    """Doc."""\n' + "    x = 1\n" * 61
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert body_lines(node) == LIMIT + 1
