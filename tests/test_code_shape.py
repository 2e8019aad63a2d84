"""The shape the handbook asks of ``mgfa_ray/``: functions about a screen long, or a reason.

A function whose body (its docstring left out) runs over ``MAX_LINES`` lines must say why in its
docstring, in a paragraph that starts with ``Length:`` — a parser built in one place, a class
defined inside a function so its import stays lazy. Nested functions count on their own.
"""

from __future__ import annotations

import ast
import re
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


# --- The import graph: floors, as drawn in the README's "Layout" section --------------------------

README = PACKAGE.parent / "README.md"
BENCHMARK_ONLY = ("CurveTable", "StudyPolicy", "RayStockPolicy")  # benchmarks/replay_policies.py


def readme_floors(text: str) -> dict[str, int]:
    """``{unit: floor}`` from the README's layout block: lines ``<floor>  <unit> [<unit> ...]  <what>``
    where a unit is a package (``search/``) or a module (``config.py``) directly under ``mgfa_ray/``."""
    block = text.split("<!-- floors -->")[1]
    floors = {}
    for line in block.splitlines():
        m = re.match(r"^\s*(\d+)\s+((?:[a-z_]+(?:/|\.py) ?)+?)(?:\s{2,}|$)", line)
        for unit in (m.group(2).split() if m else []):
            floors[unit.removesuffix("/").removesuffix(".py")] = int(m.group(1))
    return floors


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken, line)`` for every import of ``mgfa_ray`` in ``source`` (at
    any depth: imports inside functions count), relative imports resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "mgfa_ray"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "mgfa_ray":
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def unit_of(module: str) -> str:
    """The top-level unit under ``mgfa_ray`` a module belongs to (``search`` for ``mgfa_ray.search.asha``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): imports_of(p.read_text(), module_name(p), is_package=p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(graph, floors: dict[str, int]) -> list[str]:
    """Imports from a unit to a unit on a higher floor, or to another unit on the same floor."""
    bad = []
    for module, imports in graph.items():
        src = unit_of(module)
        for target, _, line in imports:
            dst = unit_of(target)
            if src and dst and src != dst and floors[dst] >= floors[src]:
                bad.append(f"{module}:{line} imports {target} (floor {floors[dst]} from floor {floors[src]})")
    return bad


def import_cycles(graph) -> list[list[str]]:
    """Cycles among the package's modules (an import of a name that is a submodule counts as that
    submodule), found by depth-first search."""
    edges = {m: {(f"{t}.{n}" if f"{t}.{n}" in graph else t) for t, names, _ in imps for n in (names or [""])}
             & set(graph) - {m} for m, imps in graph.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_the_readme_draws_every_unit_of_the_package_on_a_floor():
    units = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert set(readme_floors(README.read_text())) == units


def test_imports_only_go_down_the_floors_and_never_in_a_circle():
    graph = package_graph()
    floors = readme_floors(README.read_text())
    assert upward_imports(graph, floors) == []
    assert import_cycles(graph) == []


def test_no_private_name_is_imported_from_another_module_of_the_package():
    found = [f"{m}:{line} takes {name} from {t}" for m, imps in package_graph().items()
             for t, names, line in imps for name in names if name.startswith("_") and t != m]
    assert found == []


def test_benchmark_only_code_is_not_in_the_package():
    defined = {node.name for p in PACKAGE.rglob("*.py") for node in ast.parse(p.read_text()).body
               if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    assert defined & set(BENCHMARK_ONLY) == set()
    policies = ast.parse((PACKAGE.parent / "benchmarks" / "replay_policies.py").read_text())
    assert set(BENCHMARK_ONLY) <= {n.name for n in policies.body if isinstance(n, ast.ClassDef)}


def test_the_graph_checks_see_an_upward_import_a_cycle_and_a_private_name():
    floors = {"data": 1, "search": 2, "config": 0}
    graph = {
        "mgfa_ray.data.manifest": imports_of("from mgfa_ray.search.driver import run\n", "mgfa_ray.data.manifest"),
        "mgfa_ray.search.driver": imports_of("def f():\n    from ..data import manifest\n", "mgfa_ray.search.driver"),
        "mgfa_ray.search": imports_of("from .driver import _private\n", "mgfa_ray.search", is_package=True),
        "mgfa_ray.config": [],
    }
    assert upward_imports(graph, floors) == [
        "mgfa_ray.data.manifest:1 imports mgfa_ray.search.driver (floor 2 from floor 1)"]
    assert import_cycles(graph) == [["mgfa_ray.data.manifest", "mgfa_ray.search.driver", "mgfa_ray.data.manifest"]]
    assert graph["mgfa_ray.search"] == [("mgfa_ray.search.driver", ["_private"], 1)]
    assert readme_floors("x\n<!-- floors -->\n```\n 2  search/  the search\n 0  errors.py runtime.py  base\n```\n") == {
        "search": 2, "errors": 0, "runtime": 0}
