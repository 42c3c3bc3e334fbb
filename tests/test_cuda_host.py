"""Host-side helpers of the CUDA backend (no GPU needed)."""
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest

from gpt2job.backends.cuda.backend import PREFILL_TILE_ROWS, kv_groups, prefill_passes, prefill_tiles


def test_prefill_passes_cover_every_prompt_once_within_the_row_limit():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, 50)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    for b0, b1, limit in ((0, 50, 64), (7, 31, 10), (0, 50, 10 ** 9), (3, 4, 1)):
        passes = list(prefill_passes(offsets, b0, b1, limit))
        assert passes[0][0] == b0 and passes[-1][1] == b1
        assert all(a[1] == b[0] for a, b in zip(passes, passes[1:]))
        for p0, p1 in passes:
            assert p1 - p0 == 1 or offsets[p1] - offsets[p0] <= limit
    assert list(prefill_passes(offsets, 0, 50, 10 ** 9)) == [(0, 50)]


def test_kv_groups_fit_the_budget_cover_every_prompt_and_are_even():
    rng = np.random.default_rng(1)
    for _ in range(200):
        B = int(rng.integers(1, 60))
        lens = np.sort(rng.integers(1, 100, B))[::-1]
        extra, bpp = int(rng.integers(0, 20)), int(rng.integers(1, 5))
        budget = int(rng.integers(50, 5000))
        groups = kv_groups(lens, extra, bpp, budget)
        assert groups[0][0] == 0 and groups[-1][1] == B
        assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:] + [(B, None)]))
        for a, b in groups:
            assert b - a == 1 or (b - a) * (lens[a:b].max() + extra) * bpp <= budget
    # 2,048 prompts of one length that fit 1,583 at a time: two groups of 1,024, not 1,583 + 465
    assert kv_groups(np.full(2048, 768), 0, 1, 1583 * 768) == [(0, 1024), (1024, 2048)]
    assert kv_groups([5, 3], 2, 10, 10 ** 9) == [(0, 2)]


def test_prefill_tiles_cover_each_prompt_in_consecutive_tiles():
    rng = np.random.default_rng(2)
    for lens in (rng.integers(1, 600, 300), np.array([1, 15, 16, 17, 32, 33]), np.array([7]), np.zeros(0, int)):
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        tiles, tile_off = prefill_tiles(offsets)
        assert tiles.dtype == np.int32 and tiles.shape == (int(tile_off[-1]), 2) and tile_off[0] == 0
        for b, n in enumerate(lens):
            t = tiles[tile_off[b]:tile_off[b + 1]]
            assert len(t) == -(-n // PREFILL_TILE_ROWS)
            assert (t[:, 1] >= 1).all() and (t[:, 1] <= PREFILL_TILE_ROWS).all()
            assert (t[:-1, 1] == PREFILL_TILE_ROWS).all()
            # the tiles cover the prompt's rows offsets[b]..offsets[b+1]-1 in order, once each
            rows = np.concatenate([np.arange(f, f + k) for f, k in t])
            np.testing.assert_array_equal(rows, np.arange(offsets[b], offsets[b + 1]))


# ---------------------------------------------------------------- Kernels wiring, with a stand-in for pycuda

class _FakeDrv:
    """Just enough of pycuda.driver for Kernels.__init__ and pick_f16 without a GPU."""

    class device_attribute:
        MULTIPROCESSOR_COUNT = "sm_count"

    class function_attribute:
        MAX_DYNAMIC_SHARED_SIZE_BYTES = "max_dyn_smem"

    class _Device:
        def compute_capability(self):
            return (9, 0)

        def get_attribute(self, attr):
            return 132

    class Context:
        @staticmethod
        def get_device():
            return _FakeDrv._Device()

    class _Alloc(int):
        def free(self):
            pass

    @staticmethod
    def mem_alloc(n):
        return _FakeDrv._Alloc(1 << 20)

    @staticmethod
    def pagelocked_empty(n, dtype):
        return np.empty(n, dtype)

    class _Function:
        def __init__(self, name):
            self.name = name
            self.sig = None

        def prepare(self, sig):
            self.sig = sig

        def set_attribute(self, attr, value):
            pass

    class _Module:
        def __init__(self, text):
            self.text = text

        def get_function(self, name):
            assert re.search(rf"(?<!\w){name}\s*\(", self.text), f"{name} is not in this module"
            return _FakeDrv._Function(name)

    @staticmethod
    def module_from_buffer(text):
        return _FakeDrv._Module(text)


def _preprocess(src, no_extern_c, arch, options, include_dirs, cache_dir):
    """nvcc -E of the source with the job's defines: what the module would define."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".cu", delete=False) as fh:
        fh.write(src)
    r = subprocess.run(["nvcc", "-E", "-x", "cu", f"-arch={arch}", *options, *[f"-I{d}" for d in include_dirs],
                        fh.name], capture_output=True, text=True)
    os.unlink(fh.name)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernels_find_every_kernel_in_its_module_and_pick_products(monkeypatch, tmp_path):
    fake_pycuda = types.ModuleType("pycuda")
    fake_compiler = types.ModuleType("pycuda.compiler")
    fake_compiler.compile = _preprocess
    fake_pycuda.driver = _FakeDrv
    fake_pycuda.compiler = fake_compiler
    monkeypatch.setitem(sys.modules, "pycuda", fake_pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", _FakeDrv)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", fake_compiler)
    monkeypatch.delitem(sys.modules, "gpt2job.backends.cuda.kernels", raising=False)
    monkeypatch.setenv("GPT2JOB_PYCUDA_CACHE", str(tmp_path))
    import gpt2job.backends.cuda.kernels as ck
    try:
        k = ck.Kernels(0)                       # the default variants of a Hopper GPU
        assert k.f16_variants == ck.F16_DEFAULT
        tma_jobs = {ck.variant_module(v) for v in ck.F16_VARIANTS if ck.F16_VARIANTS[v][0] == -2}
        assert len({j[0] for j in tma_jobs}) == 9 and all(j[2] for j in tma_jobs)   # one module per TMA variant
        for v in ck.F16_VARIANTS:   # every kernel's shared memory fits an H100 block (227 KB)
            if ck.F16_VARIANTS[v][0] == -2:
                assert max(ck.f16_smem(v, True), ck.f16_smem(v, False)) <= 227 * 1024, v
        assert k.funcs["gemm_f16_tma256_outh"].sig == "PP" + ck._F16_SIG
        # the picks measured fastest on H100 (benchmarks/RESULTS.md kernel tables): staged epilogues by default
        assert k.tma_staged and k.pick_f16(131072, 2304, True, 768) == "tma192s"
        assert k.pick_f16(8192, 768, False, 3072) == "tma128s"
        assert k.pick_f16(8192, 50257, False, 768) == "t128x128k64s3"   # the LM head is not staged
        k.tma_staged = False                                            # GPT2JOB_TMA_STAGED=0
        assert k.pick_f16(131072, 2304, True, 768) == "tma128"
        assert k.pick_f16(131072, 768, False, 3072) == "tma256"
        assert k.pick_f16(8192, 768, False, 3072) == "tma192"
        assert k.pick_f16(8192, 768, False, 768) == "t128x128k64s3"
        assert k.pick_f16(8192, 2304, True, 768) == "wgmma"
        assert k.pick_f16(8192, 50257, False, 768) == "t128x128k64s3"
        assert ck.Kernels(0, f16_variants=("t128x128k64s3",)).pick_f16(131072, 2304) == "t128x128k64s3"
        every = ck.Kernels(0, f16_variants=tuple(ck.F16_VARIANTS))   # every variant's kernels in its module
        every.tma_staged = False
        assert every.pick_f16(131072, 3072, True, 768) == "tma128"
        every.tma_persistent = True                                     # GPT2JOB_TMA_PERSISTENT=1
        assert every.pick_f16(131072, 3072, True, 768) == "tma128p"
        assert every.pick_f16(8192, 50257, False, 768) == "t128x128k64s3"
        every.tma_persistent, every.tma_staged = False, True            # GPT2JOB_TMA_STAGED=1
        assert every.pick_f16(131072, 2304, True, 768) == "tma192s"
        assert every.pick_f16(8192, 3072, True, 768) == "tma128"
        assert every.pick_f16(131072, 768, False, 768) == "tma128s"
        assert every.pick_f16(8192, 768, False, 768) == "tma192s"
        assert every.pick_f16(8192, 768, False, 3072) == "tma128s"
        assert every.pick_f16(4096, 768, False, 3072) == "tma192"          # not measured below 8192 rows
        assert every.pick_f16(8192, 50257, False, 768) == "t128x128k64s3"   # the LM head is not staged
        # the greedy LM head: a persistent TMA kernel (M tiles fastest), else the plain product's pick
        assert k.pick_argmax(8192, 50257) == "tma192p" and every.pick_argmax(8192, 50257) == "tma192p"
        assert ck.Kernels(0, f16_variants=("tma192s", "tma128")).pick_argmax(8192, 50257) == "tma192s"
        assert ck.Kernels(0, f16_variants=("tma128", "t128x128k64s3")).pick_argmax(8192, 50257) == "t128x128k64s3"
        k.argmax_forced = "tma128s"                                     # GPT2JOB_ARGMAX_VARIANT=tma128s
        assert k.pick_argmax(8192, 50257) == "tma128s"
        for bad in ("tma128x", "tma256s"):   # misspelt; not compiled by default
            monkeypatch.setenv("GPT2JOB_ARGMAX_VARIANT", bad)
            with pytest.raises(ValueError, match="GPT2JOB_ARGMAX_VARIANT"):
                ck.Kernels(0)
        monkeypatch.delenv("GPT2JOB_ARGMAX_VARIANT")
    finally:
        sys.modules.pop("gpt2job.backends.cuda.kernels", None)
