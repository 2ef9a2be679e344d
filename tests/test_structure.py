"""Layout rules the code and the tests must keep: imports, module docstrings, the fast lane.

The runtime package imports no fixtures, and scripts share code through modules, never through
``sys.path``: neither their own folder (sibling scripts' helpers) nor the repository root (which
would hide a broken install). Test modules share code through conftest.py and the helper modules
(never by importing another test module), each says what it covers, and a test outside the
`slow` lane cannot start a process."""
import ast
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, pkgutil, sys
import mam_clap_plugin
names = [m.name for m in pkgutil.walk_packages(mam_clap_plugin.__path__, "mam_clap_plugin.")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(n for n in sys.modules if n.split(".")[0] == "mam_clap_fixtures"))
"""


@pytest.mark.slow
def test_runtime_package_imports_no_fixtures():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, fixtures = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 10 and fixtures == "[]", proc.stdout


def _edits_sys_path(tree: ast.AST) -> bool:
    """``sys.path.insert(...)`` / ``sys.path.append(...)`` anywhere in the script."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append", "extend") and ast.unparse(node.func.value) == "sys.path"):
            return True
    return False


def test_scripts_do_not_import_through_sys_path():
    """Scripts import the installed packages (``make env`` / ``pip install -e .``) and nothing else."""
    scripts = sorted(p for d in ("examples", "benchmarks", "upstream") for p in (REPO / d).rglob("*.py"))
    assert scripts
    offenders = [str(p.relative_to(REPO)) for p in scripts if _edits_sys_path(ast.parse(p.read_text()))]
    assert offenders == []


TEST_MODULES = sorted((REPO / "tests").glob("test_*.py"))


def _imported_modules(tree: ast.AST, package: str = "tests") -> set:
    """Every module an ``import`` / ``from ... import`` anywhere in the tree names, relative imports
    resolved against ``package`` (``from . import x`` names ``tests.x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_test_module_imports_another():
    """Shared fixtures live in tests/conftest.py, shared helpers in tests/helpers.py and the other
    non-test modules of tests/; a test module that imports another runs its tests' module-level
    code and autouse fixtures where nobody reads them."""
    assert len(TEST_MODULES) > 30
    offenders = {}
    for path in TEST_MODULES:
        imported = _imported_modules(ast.parse(path.read_text()))
        others = sorted(n for n in imported if n.split(".")[-1].startswith("test_") or ".test_" in n)
        if others:
            offenders[path.name] = others
    assert offenders == {}


def test_every_test_module_says_what_it_covers():
    """A module docstring whose first line is a one-line summary (a sentence, then a blank line)."""
    unclear = []
    for path in TEST_MODULES:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        lines = doc.splitlines() or [""]
        if not (lines[0].endswith(".") and (len(lines) == 1 or not lines[1].strip())):
            unclear.append(path.name)
    assert unclear == []


def test_fast_tests_cannot_start_processes():
    """tests/conftest.py refuses a process started by a test outside the `slow` lane (this one)."""
    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        multiprocessing.get_context("spawn").Process(target=print).start()
