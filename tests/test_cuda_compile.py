"""Every cuda_src/*.cu compiles with the local nvcc for sm_90 (no GPU needed; skipped without nvcc)."""
import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")
FILES = sorted(glob.glob(os.path.join(SRC, "*.cu")))


def _compile(path, tmp, defines=(), name=None):
    with open(path) as fh:
        text = fh.read()
    arch = ["-gencode=arch=compute_90a,code=sm_90a"] if "wgmma" in text else ["-arch=sm_90"]
    out = os.path.join(tmp, (name or os.path.basename(path)) + ".cubin")
    cmd = ["nvcc", *arch, "-std=c++17", "-cubin", *defines, "-I", SRC, "-o", out, path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return name or path, r.returncode, r.stdout + r.stderr


def _tile_jobs():
    """gemm_swap.cu makes its kernel only under a tile's defines (SWAP_NAME, ...): the narrowest and the widest
    swapped tiles. gemm_tma.cu, the longest to compile whole (~75 s of one core), tile by tile: the same kernels
    (its defines only pick among them), in parallel. Each as kernels.py compiles it."""
    from gpt2job.backends.cuda.kernels import F16_TILES
    swap = sorted((t for t in F16_TILES.values() if t.family == "swap"), key=lambda t: t.bm * t.bn)
    tma = [t for t in F16_TILES.values() if t.source == "gemm_tma.cu"]
    return [(os.path.join(SRC, t.source), t.defines, t.name) for t in (*tma, swap[0], swap[-1])]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_all_kernels_compile(tmp_path):
    assert FILES, "no cuda_src/*.cu files"
    first = os.path.join(SRC, "gemm_f16.cu")   # the longest whole file (~35 s): first, beside the tiles
    tiles = _tile_jobs()
    jobs = [(first, (), None), *tiles, *((p, (), None) for p in FILES if p != first and not p.endswith("gemm_tma.cu"))]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(lambda j: _compile(j[0], str(tmp_path), j[1], j[2]), jobs))
    failed = [(os.path.basename(p), log) for p, rc, log in results if rc != 0]
    assert not failed, "\n".join(f"{name}:\n{log}" for name, log in failed)
    assert os.path.getsize(tmp_path / (tiles[-1][2] + ".cubin")) > 10_000   # a swapped tile's kernel was made


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


def test_the_cuda_backend_runs_every_activation_the_config_accepts():
    """model/config.py refuses any other activation when it reads a config, so the CUDA model maps exactly these."""
    from gpt2job.backends.cuda.model import ACTIVATIONS
    from gpt2job.model.config import SUPPORTED_ACTIVATIONS
    assert sorted(ACTIVATIONS) == sorted(SUPPORTED_ACTIVATIONS)
