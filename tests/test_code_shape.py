"""The shape the handbook asks of ``mgfa_ray/``: functions about a screen long, or a reason.

A function whose body (its docstring left out) runs over ``MAX_LINES`` lines must say why in its
docstring, in a paragraph that starts with ``Length:`` — a parser built in one place, a class
defined inside a function so its import stays lazy. Nested functions count on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mgfa_ray"
MAX_LINES = 60


def long_functions(source: str, *, max_lines: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """``(name, line, body lines)`` of every function in ``source`` over ``max_lines`` with no
    ``Length:`` paragraph in its docstring."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node) or ""
        body = node.body[1:] if doc and len(node.body) > 1 else node.body
        lines = node.end_lineno - body[0].lineno + 1
        if lines > max_lines and "\nLength:" not in f"\n{doc}":
            out.append((node.name, node.lineno, lines))
    return out


def test_no_function_in_the_package_runs_long_without_a_reason():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} {name}() has {n} lines"
             for path in sorted(PACKAGE.rglob("*.py")) for name, line, n in long_functions(path.read_text())]
    assert not found, ("functions over %d lines without a 'Length:' reason in their docstring:\n  " % MAX_LINES
                       + "\n  ".join(found))


def test_the_check_counts_the_body_and_accepts_a_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    assert long_functions(f"def f():\n    '''Doc.'''\n{body}") == [("f", 1, 61)]
    assert long_functions(f"def f():\n    '''Doc.\n\n    Length: one table.\n    '''\n{body}") == []
    assert long_functions("def f():\n    '''Doc.'''\n" + "".join(f"    x{i} = {i}\n" for i in range(60))) == []


def private_imports(source: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from .module import _name`` in ``source``: a private name taken
    across a module boundary inside the package."""
    return [(node.module or ".", alias.name) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.level >= 1
            for alias in node.names if alias.name.startswith("_")]


def test_no_private_name_crosses_a_module_boundary():
    found = {str(path.relative_to(PACKAGE)): private_imports(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_import_check_sees_a_private_name():
    assert private_imports("from .model import WeightsError, _read_state\nfrom ..x import y\n") == [("model", "_read_state")]
    assert private_imports("from . import _cache\nimport os\n") == [(".", "_cache")]
