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


def test_every_kernel_waits_for_the_kernels_before_it_first():
    """A decode step's graph lets each kernel start while the one before it runs (graphs.py, programmatic edges):
    every kernel must begin with pdl_wait() (common.cuh), or it could read its inputs before they are written."""
    import re
    seen = []
    for path in FILES:
        with open(path) as fh:
            text = fh.read()
        for m in re.finditer(r"__global__", text):
            body = text[text.index("{", m.end()) + 1:]
            first = re.sub(r"[\s\\]+", " ", body[:200]).strip()
            line = text.count("\n", 0, m.start()) + 1
            seen.append(f"{os.path.basename(path)}:{line}")
            assert first.startswith("pdl_wait();"), f"{seen[-1]}: the kernel starts with {first[:40]!r}"
    assert len(seen) >= 25, seen
