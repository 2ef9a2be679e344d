"""Layout rules the code must keep: the runtime package imports no fixtures, and scripts share
code through modules, never through ``sys.path``: neither their own folder (sibling scripts'
helpers) nor the repository root (which would hide a broken install)."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, pkgutil, sys
import mam_clap_plugin
names = [m.name for m in pkgutil.walk_packages(mam_clap_plugin.__path__, "mam_clap_plugin.")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(n for n in sys.modules if n.split(".")[0] == "mam_clap_fixtures"))
"""


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
