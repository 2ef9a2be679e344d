"""What setup.py, requirements*.txt, constraints.txt and the Makefile declare.

The packages installed (``upstream`` with its config), the interpreter check, and pins that
agree."""
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup (run in the repository root)."""
    captured = {}
    original, cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        os.chdir(REPO)
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = original
        os.chdir(cwd)
    return captured


def read_pins(path: Path) -> dict:
    """``name==version`` lines of a requirements/constraints file -> {canonical name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
            pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_packages_include_upstream_and_its_config(setup_kwargs):
    packages = setup_kwargs["packages"]
    assert "upstream" in packages and "mam_clap_plugin" in packages
    assert {"mam_clap_plugin.tasks", "mam_clap_plugin.models", "mam_clap_plugin.criterions"} <= set(packages)
    assert not any(p.startswith(("tests", "examples", "benchmarks")) for p in packages)
    patterns = setup_kwargs["package_data"]["upstream"]
    shipped = {p.name for pattern in patterns for p in (REPO / "upstream").glob(pattern)}
    assert "speech_commands.yaml" in shipped


def test_python_requires_is_what_runs(setup_kwargs):
    spec = SpecifierSet(setup_kwargs["python_requires"])
    assert "3.11" in spec and "3.12" in spec  # ve-fairseq's cp311 / cp312 wheels
    assert "3.10" not in spec and "3.13" not in spec
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in spec
    torch_req = next(Requirement(r) for r in setup_kwargs["install_requires"] if r.startswith("torch>"))
    assert "2.4" not in torch_req.specifier and "2.5" in torch_req.specifier  # torch.serialization.safe_globals
    assert not any(canonical(Requirement(r).name) in ("fairseq", "ve-fairseq")
                   for r in setup_kwargs["install_requires"])


def test_constraints_pin_every_requirement_consistently(setup_kwargs):
    constraints = read_pins(REPO / "constraints.txt")
    for name in ("requirements.txt", "requirements-parity.txt"):
        for pkg, version in read_pins(REPO / name).items():
            assert constraints.get(pkg) == version, f"{name}: {pkg}=={version}, constraints.txt: {constraints.get(pkg)}"
    declared = list(setup_kwargs["install_requires"]) + [r for extra in setup_kwargs["extras_require"].values()
                                                          for r in extra]
    for line in declared:
        req = Requirement(line)
        pinned = constraints.get(canonical(req.name))
        assert pinned is not None, f"setup.py requires {req.name}, which constraints.txt does not pin"
        assert req.specifier.contains(pinned, prereleases=True), f"{req}: constraints.txt pins {pinned}"
    for pkg in ("numpy", "huggingface-hub", "hydra-core", "omegaconf", "setuptools"):  # the ones that floated
        assert pkg in constraints


@pytest.mark.slow
def test_upstream_imports_from_another_directory(tmp_path):
    """s3prl users import the hub entry from anywhere: upstream is an installed package."""
    code = ("import os, upstream.hubconf as h, upstream.run_downstream as r; "
            "print(os.path.dirname(os.path.dirname(h.__file__))); print(callable(h.register))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root, ok = proc.stdout.split()
    assert ok == "True" and Path(root) == REPO


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_refuses_another_python(tmp_path):
    """`make` names the variable to set when python3 is not 3.11 / 3.12 (checked before any venv exists)."""
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\necho 3.10\n")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "python-check", f"VENV={venv}", f"PYTHON={fake}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "is Python 3.10; mam-clap needs Python 3.11 or 3.12" in proc.stderr
    assert "PYTHON=python3.11" in proc.stderr
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "python-check", f"VENV={venv}",
                           f"PYTHON={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not a working Python interpreter" in proc.stderr
    ok = subprocess.run(["make", "-s", "-C", str(REPO), "python-check", f"VENV={venv}", f"PYTHON={sys.executable}"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert not venv.exists()
    # the install target runs that check first and installs with the constraints
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), "env", f"VENV={venv}",
                          f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=60)
    lines = [line for line in dry.stdout.splitlines() if line.strip()]
    assert "3.11|3.12" in lines[0]
    installs = [line for line in lines if " -m pip install " in line]
    assert len(installs) == 3 and all("-c constraints.txt" in line for line in installs[:2])
