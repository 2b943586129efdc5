"""No Python loop in the product indexes a tensor by its loop variable.

Indexing ``x[:, t]`` inside a time loop makes the backward pass quadratic in length (69 s
against 0.74 s for a 1024-step scan on these machines); time loops iterate ``unbind``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pkg in ("model", "stability") for p in (ROOT / pkg).rglob("*.py"))


def _loop_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _compiled(tree: ast.AST) -> set[ast.AST]:
    """Nodes inside numba-compiled functions: there indexing by time is the point (they run
    on numpy arrays with no autograd, so the quadratic backward cannot happen)."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and any("njit" in ast.unparse(d) or "numba" in ast.unparse(d)
                                                   for d in fn.decorator_list):
            inside.update(ast.walk(fn))
    return inside


def time_indexing_sites(source: str) -> list[int]:
    """Lines where a subscript inside a ``for`` loop uses the loop variable in a
    multi-axis index (``x[:, t]``), or any index when the loop runs over ``range``;
    numba-compiled functions excepted."""
    sites = []
    tree = ast.parse(source)
    compiled = _compiled(tree)
    for loop in ast.walk(tree):
        if loop in compiled:
            continue
        if not isinstance(loop, ast.For):
            continue
        names = _loop_names(loop.target)
        over_range = isinstance(loop.iter, ast.Call) and getattr(loop.iter.func, "id", "") == "range"
        for node in (n for stmt in loop.body for n in ast.walk(stmt)):
            if not isinstance(node, ast.Subscript):
                continue
            used = _loop_names(node.slice) & names
            if used and (isinstance(node.slice, ast.Tuple) or over_range):
                sites.append(node.lineno)
    return sites


def test_checker_catches_time_indexing():
    bad = "for t in range(n):\n    h = h * a[:, t] + b[t]\n"
    assert time_indexing_sites(bad) == [2, 2]
    good = "for a_t, b_t in zip(a.unbind(1), b.unbind(1)):\n    h = h * a_t + b_t\n"
    assert time_indexing_sites(good) == []
    compiled = "@numba.njit(cache=True)\ndef k(a, h):\n    for t in range(n):\n        h = h * a[:, t]\n"
    assert time_indexing_sites(compiled) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_loop_indexes_a_tensor_by_time(path):
    sites = time_indexing_sites(path.read_text())
    assert not sites, f"{path.relative_to(ROOT)}: loop-variable indexing at lines {sites}; iterate unbind()"
