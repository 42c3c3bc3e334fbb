"""A built wheel and a plain (non-editable) install ship the CUDA kernel sources inside the package, and the backend
finds them there (gpt2job.backends.cuda.cuda_src_dir), not in a repository checkout. Builds from a copy of the
sources, offline (no build isolation: setuptools and wheel from this environment, the [test] extra brings wheel)."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "cuda_src", "*.cu*")))


def _pip(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index", "-q"],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    if importlib.util.find_spec("wheel") is None and importlib.util.find_spec("setuptools.command.bdist_wheel") is None:
        if os.environ.get("CI"):
            pytest.fail("no bdist_wheel: pip install -e '.[test]' installs the wheel package")
        pytest.skip("the wheel package is not installed (pip install -e '.[test]')")
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("gpt2job", "cuda_src"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_wheel_holds_every_kernel_source_and_module(source_copy, tmp_path):
    assert {"common.cuh", "gemm_f16.cu", "transformer.cu"} <= set(KERNEL_SOURCES)
    _pip("wheel", ".", "-w", str(tmp_path), cwd=source_copy)
    (whl,) = glob.glob(str(tmp_path / "gpt2job-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    missing = [f for f in KERNEL_SOURCES if f"gpt2job/cuda_src/{f}" not in names]
    assert not missing, f"kernel sources missing from the wheel: {missing}"
    modules = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gpt2job", "**", "*.py"), recursive=True)}
    assert modules - names == set(), "modules missing from the wheel"


def test_plain_install_finds_the_kernel_sources_it_installed(source_copy, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--target", str(target), ".", cwd=source_copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import gpt2job.backends.cuda as c, sys; print(c.cuda_src_dir()); print('pycuda' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    where, pycuda = r.stdout.split()
    assert where == str(target / "gpt2job" / "cuda_src") and pycuda == "False"
    assert sorted(os.listdir(where)) == KERNEL_SOURCES
    # the installed `gpt2job` command runs what `python -m gpt2job` runs, with its set-up (SIGUSR1 ignored from the
    # start, BLAS threads shared between a node's ranks): it called gpt2job.cli:main, past that set-up
    script = target / "bin" / "gpt2job"
    assert "from gpt2job.__main__ import main" in script.read_text()
    r = subprocess.run([sys.executable, str(script), "--version"], cwd=elsewhere, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0 and r.stdout.startswith("gpt2job "), r.stdout + r.stderr
