"""The code stays a codebase a new engineer can live in (counted with ``ast`` over src/capsrun):
modules of at most 450 lines, functions of at most 80, at most 8 parameters outside model
constructors, no import cycle (function-level imports counted), no import upwards from the
capsule math and the samplers into the commands or Hydra; and the documents stay a reference:
README at most 300 lines, docs/capsrbm.md at most 250 under at least 5 real headings, and no
path to a folder a user of the repository does not have."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "capsrun"
# the pure layers: they know nothing of commands, files of runs, configs or Hydra
PURE = ("capsrun.layers", "capsrun.models", "capsrun.mcmc", "capsrun.losses", "capsrun.judge", "capsrun.datasets")
UPWARD = (
    "capsrun.cli",
    "capsrun.commands",
    "capsrun.build",
    "capsrun.settings",
    "capsrun.registry",
    "hydra",
    "omegaconf",
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, tree: ast.AST, modules: dict) -> set[str]:
    """Every capsrun module (or external top-level package) ``name`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _constructor(name: str, node: ast.FunctionDef) -> bool:
    """A model's or a layer's constructor (``__init__`` of a class in models/ or layers/), or the
    helper that builds the capsule models' shared trunk."""
    in_models = name.startswith(("capsrun.models", "capsrun.layers"))
    return in_models and (node.name == "__init__" or node.name == "capsule_trunk")


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_module_over_450_lines_and_no_function_over_80():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in long_modules.items() if k > 450}
    long_functions = {
        f"{n}:{f.name}": f.end_lineno - f.lineno + 1
        for n, p in _modules().items()
        for f in _functions(ast.parse(p.read_text()))
        if f.end_lineno - f.lineno + 1 > 80
    }
    assert not long_functions


def test_no_function_outside_model_constructors_takes_more_than_8_parameters():
    many = {}
    for name, path in _modules().items():
        for f in _functions(ast.parse(path.read_text())):
            a = f.args
            count = len([x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")])
            if count > 8 and not _constructor(name, f):
                many[f"{name}:{f.name}"] = count
    assert not many


def test_no_import_cycle_and_no_import_upwards():
    modules = _modules()
    graph = {n: _imports(n, ast.parse(p.read_text()), modules) for n, p in modules.items()}
    upward = {n: sorted(i for i in deps if i.startswith(UPWARD)) for n, deps in graph.items() if n.startswith(PURE)}
    assert not {n: i for n, i in upward.items() if i}
    internal = {n: {d for d in deps if d in modules and d != n} for n, deps in graph.items()}
    cycles = []
    for start in internal:  # a path from a module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in internal[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles


def test_the_documents_stay_a_reference():
    readme = (ROOT / "README.md").read_text().splitlines()
    capsrbm = (ROOT / "docs" / "capsrbm.md").read_text().splitlines()
    assert len(readme) <= 300, len(readme)
    assert len(capsrbm) <= 250 and sum(line.startswith("## ") for line in capsrbm) >= 5


def test_nothing_points_to_a_folder_users_do_not_have():
    """The repository's files never cite the developers' folder beside the checkout."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    needle = "../" + "shared"  # not written whole: this file would cite it
    cited = [f for f in tracked.split() if (ROOT / f).is_file() and needle in (ROOT / f).read_text(errors="ignore")]
    assert not cited
