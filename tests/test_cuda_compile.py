"""Every cuda_src/*.cu compiles with the local nvcc for sm_90 (no GPU needed; skipped without nvcc)."""
import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")
FILES = sorted(glob.glob(os.path.join(SRC, "*.cu")))


def _compile(path, tmp):
    with open(path) as fh:
        text = fh.read()
    arch = ["-gencode=arch=compute_90a,code=sm_90a"] if "wgmma" in text else ["-arch=sm_90"]
    out = os.path.join(tmp, os.path.basename(path) + ".cubin")
    cmd = ["nvcc", *arch, "-std=c++17", "-cubin", "-I", SRC, "-o", out, path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return path, r.returncode, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_all_kernels_compile(tmp_path):
    assert FILES, "no cuda_src/*.cu files"
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(lambda p: _compile(p, str(tmp_path)), FILES))
    failed = [(os.path.basename(p), log) for p, rc, log in results if rc != 0]
    assert not failed, "\n".join(f"{name}:\n{log}" for name, log in failed)
