"""Host side of the CUDA backend without a GPU: the pure planning (plan.py), the tile picks (picks.py), the kernel
options, and the kernel registry against the .cu sources (with a stand-in for pycuda and nvcc -E)."""
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

from gpt2job import envs
from gpt2job.backends.cuda import cuda_src_dir, prefix_share
from gpt2job.backends.cuda.options import ALL_TILES, KernelOptions
from gpt2job.backends.cuda.picks import TilePicker
from gpt2job.backends.cuda.plan import (PREFILL_TILE_ROWS, Layout, check_prompts, group_rows, kv_groups,
                                        prefill_passes, prefill_tiles)
from gpt2job.errors import UserError
from gpt2job.settings import max_prompt_length


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


def _passes_by_loop(offsets, b0, b1, max_rows):
    """prefill_passes' rule prompt by prompt: each pass takes prompts while they fit (at least one)."""
    p0 = b0
    while p0 < b1:
        p1 = p0 + 1
        while p1 < b1 and offsets[p1 + 1] - offsets[p0] <= max_rows:
            p1 += 1
        yield p0, p1
        p0 = p1


def test_prefill_passes_take_as_many_prompts_as_fit_the_same_as_a_loop_over_the_prompts():
    rng = np.random.default_rng(5)
    for _ in range(300):
        B = int(rng.integers(1, 80))
        offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 30, B))])
        b0 = int(rng.integers(0, B))
        b1 = int(rng.integers(b0 + 1, B + 1))
        limit = int(rng.integers(1, 200))
        assert list(prefill_passes(offsets, b0, b1, limit)) == list(_passes_by_loop(offsets, b0, b1, limit))


def test_kv_groups_fit_the_budget_cover_every_prompt_and_are_even():
    rng = np.random.default_rng(1)
    for _ in range(200):
        B = int(rng.integers(1, 60))
        lens = np.sort(rng.integers(1, 100, B))[::-1]
        extra, bpp = int(rng.integers(0, 20)), int(rng.integers(1, 5))
        budget = int(rng.integers(50, 5000))
        most = int(rng.integers(1, 80))
        groups = kv_groups(lens, extra, bpp, budget, most)
        assert groups[0][0] == 0 and groups[-1][1] == B
        assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:] + [(B, None)]))
        for a, b in groups:
            assert b - a == 1 or ((b - a) * (lens[a:b].max() + extra) * bpp <= budget and b - a <= most)
    # 2,048 prompts of one length that fit 1,583 at a time: two groups of 1,024, not 1,583 + 465
    assert kv_groups(np.full(2048, 768), 0, 1, 1583 * 768) == [(0, 1024), (1024, 2048)]
    assert kv_groups([5, 3], 2, 10, 10 ** 9) == [(0, 2)]
    # 65,536 short prompts (--chunk-size 65536) in groups of plan.group_rows (4 head groups of 8,192), the size of
    # each decode buffer Runner.reserve took
    assert group_rows(131072, 8192) == 32768 and group_rows(1024, 512) == 1024
    assert kv_groups(np.full(65536, 24), 0, 1, 10 ** 9, 32768) == [(0, 32768), (32768, 65536)]


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


def test_prompt_checks_use_the_one_length_rule():
    n_pos, new = 64, 6
    longest = max_prompt_length(n_pos, new)
    assert longest == n_pos - new + 1
    check_prompts(np.array([1, longest]), np.zeros(longest + 1, np.int32), n_pos, 100, new)
    with pytest.raises(UserError, match="exceeds"):
        check_prompts(np.array([longest + 1]), np.zeros(longest + 1, np.int32), n_pos, 100, new)
    with pytest.raises(UserError, match="no tokens"):
        check_prompts(np.array([3, 0]), np.zeros(3, np.int32), n_pos, 100, new)
    with pytest.raises(UserError, match="vocabulary"):
        check_prompts(np.array([2]), np.array([5, 100], np.int32), n_pos, 100, new)
    check_prompts(np.zeros(0, np.int64), np.zeros(0, np.int32), n_pos, 100, new)   # an empty chunk


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("tiles", [False, True])
def test_upload_layout_holds_every_part_where_the_device_reads_it(share, tiles):
    rng = np.random.default_rng(3)
    stem = rng.integers(0, 50, 6)
    prompts = [np.concatenate([stem[:rng.integers(1, 7)], rng.integers(0, 50, rng.integers(0, 30))]) for _ in range(41)]
    lens = np.array([len(p) for p in prompts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.concatenate(prompts).astype(np.int32)
    rows = np.arange(41, dtype=np.int64) * 7 + 3
    sp = prefix_share.plan(offsets, tokens, lambda ls: kv_groups(ls, 4, 1, 10 ** 9)) if share else None
    assert (sp is not None) == share
    lay = Layout.of(offsets, lens, tokens, rows, sp, tiles)
    host = np.full(lay.nbytes + 64, 0xEE, np.uint8)
    lay.write(host)
    assert lay.at_rows % 8 == 0 and lay.at_tiles % 8 == 0 and host[lay.nbytes] == 0xEE
    T, B = lay.T, lay.B
    w = host[:4 * lay.n32].view(np.int32)
    off = sp.offsets if share else offsets
    order = sp.perm if share else np.arange(41)
    assert T == off[-1] and B == 41 and (T < lens.sum()) == share
    np.testing.assert_array_equal(w[3 * T:3 * T + B], off[1:] - 1)                         # each prompt's last row
    np.testing.assert_array_equal(w[3 * T + B:3 * T + 2 * B], np.arange(B))
    np.testing.assert_array_equal(host[lay.at_rows:lay.at_tiles].view(np.int64), rows[order])
    for i in range(B):   # computed tokens of prompt i (the plan's order): its last ones, at their positions
        r = slice(off[i], off[i + 1])
        p = prompts[order[i]]
        np.testing.assert_array_equal(w[T:2 * T][r], np.arange(len(p) - (off[i + 1] - off[i]), len(p)))
        np.testing.assert_array_equal(w[:T][r], p[w[T:2 * T][r]])
        assert (w[2 * T:3 * T][r] == i).all()
    np.testing.assert_array_equal(host[lay.at_tiles:lay.at_copies].view(np.int32).reshape(-1, 2),
                                  prefill_tiles(off)[0] if tiles else np.zeros((0, 2)))
    np.testing.assert_array_equal(host[lay.at_copies:lay.nbytes].view(np.int32).reshape(-1, 3),
                                  sp.copies if share else np.zeros((0, 3)))


def test_kernel_options_from_the_environment(monkeypatch):
    monkeypatch.setattr(envs, "_values", {})
    for name in envs.VARS:
        monkeypatch.delenv(name, raising=False)
    assert KernelOptions.from_env() == KernelOptions()
    monkeypatch.setattr(envs, "_values", {})
    for name, value in (("GPT2JOB_F16_VARIANTS", "all"), ("GPT2JOB_F32_BK", "8"), ("GPT2JOB_FUSE_ARGMAX", "0"),
                        ("GPT2JOB_PREFIX_SHARE", "off"), ("GPT2JOB_PREFILL_ATTN", "0"), ("GPT2JOB_TMA_STAGED", "0"),
                        ("GPT2JOB_TMA_PERSISTENT", "1"), ("GPT2JOB_ARGMAX_VARIANT", "tma192s")):
        monkeypatch.setenv(name, value)
    o = KernelOptions.from_env()
    assert o == KernelOptions(ALL_TILES, "tma192s", 8, False, False, False, False, True)
    assert o.describe()["f16_variants"] == ["all"] and o.describe()["tma_persistent"] is True
    monkeypatch.setattr(envs, "_values", {})
    monkeypatch.setenv("GPT2JOB_F16_VARIANTS", "tma128,,wgmma")
    monkeypatch.setenv("GPT2JOB_F32_BK", "32")
    with pytest.raises(UserError, match="GPT2JOB_F32_BK"):
        KernelOptions.from_env()
    monkeypatch.setattr(envs, "_values", {})
    monkeypatch.delenv("GPT2JOB_F32_BK")
    assert KernelOptions.from_env().f16_variants == ("tma128", "wgmma")


# ---------------------------------------------------------------- which fp16 tile runs a product (H100: 132 SMs)

def picker(variants=None, **opts):
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, F16_TILES
    return TilePicker(F16_TILES, F16_DEFAULT if variants is None else variants, 132, KernelOptions(**opts))


def check_decode_and_mid_picks(k):
    """The picks under 8,192 rows of GPT-2 124M's four layer products (QKV, attention out, MLP up, MLP down)."""
    layer = ((2304, True, 768), (768, False, 768), (3072, True, 768), (768, False, 3072))
    # decode-sized products (RESULTS.md, sessions 13 and 15): narrow tiles up to 800k outputs
    # on 128-wide k slices where the 32x64 blocks fit two an SM at once (session 25)
    # ... and from SWAP_ROWS[0] (192) rows on the swapped tiles, sized to the product (session 28)
    assert [k.pick_f16(546, *p) for p in layer] == ["s80x128", "s64x64", "s112x128", "s64x64"]
    assert [k.pick_f16(256, *p) for p in layer] == ["s96x64", "s32x64", "s80x128", "s32x64"]
    assert [k.pick_f16(192, *p) for p in layer] == ["s64x64", "s32x64", "s96x64", "s32x64"]
    # ... the products with more outputs than inputs (QKV, MLP up) from SWAP_WIDE_FROM (128) rows (session 33)
    assert [k.pick_f16(191, *p) for p in layer] == ["s64x64", "t32x64k128s4", "s96x64", "t32x64k128s4"]
    assert [k.pick_f16(127, *p) for p in layer] == ["t32x64k128s4", "t32x32k128s4"] * 2
    # ... and 32x32 tiles where they fit on the SMs in one wave (session 17)
    assert [k.pick_f16(137, *p) for p in layer] == ["s64x64", "t32x32k128s4", "s96x64", "t32x32k128s4"]
    assert k.pick_f16(160, 768, False, 768) == "t32x32k128s4" and k.pick_f16(161, 768, False, 768) == "t32x64k128s4"
    # prefill passes and decode steps of 1,024-8,191 rows: the ping-pong kernel where compiled (session 20), else
    # from 1,800 rows staged, residual adds on 128x128 tiles (session 17)
    if "tma128pp" in k.variants:
        # ... the others (attention out, MLP down) swapped up to SWAP_NARROW_TO (2,048) rows (session 33)
        assert [k.pick_f16(m, *p) for m in (1025, 1799, 2048) for p in layer] == \
            ["tma128pp", "s96x64", "tma128pp", "s96x64"] + ["tma128pp", "s112x128"] * 4
        assert [k.pick_f16(2049, *p) for p in layer] == ["tma128pp"] * 4
        assert [k.pick_f16(1024, *p) for p in layer] == ["s160x128", "s96x64", "s208x128", "s96x64"]
        return
    swapped = any(k.tiles[v].family == "swap" for v in k.variants)
    assert [k.pick_f16(2048, *p) for p in layer] == ["tma192s", "s112x128", "tma128", "s112x128"] if swapped else \
        ["tma192s", "tma128s", "tma128", "tma128s"]
    assert k.pick_f16(1799, 2304, True, 768) == "wgmma"
    assert k.pick_f16(1799, 768, False, 3072) == ("s112x128" if swapped else "tma128")
    assert k.pick_f16(546, 50257, False, 768) == "tma128"    # the LM head's logits (session 18)


def test_tile_picks_are_the_ones_measured_fastest():
    # the picks measured fastest on H100 (benchmarks/RESULTS.md kernel tables): staged epilogues by default
    from gpt2job.backends.cuda.kernels import F16_TILES
    k = picker()
    for M, N, half, K in ((131072, 2304, True, 768), (8192, 768, False, 3072), (8192, 3072, True, 768),
                          (2049, 768, False, 768), (1025, 2304, True, 768)):
        assert k.pick_f16(M, N, half, K) == "tma128pp"   # from SWAP_ROWS[1] + 1 rows (N > K), SWAP_NARROW_TO + 1
    # the swapped tiles (sessions 28-29): the fewest waves of blocks, then the fewest rows loaded a block
    assert [k.pick_swap(m, 768) for m in (137, 192, 256, 546, 1023, 1024)] == \
        ["s32x64", "s32x64", "s32x64", "s64x64", "s96x64", "s96x64"]
    assert k.pick_f16(1023, 768, False, 3072) == "s96x64"
    every = picker(tuple(F16_TILES))
    assert [every.pick_swap(546, n) for n in (768, 2304, 3072)] == ["s64x64", "s80x128", "s112x128"]
    assert [every.pick_swap(m, n) for m in (768, 1024) for n in (2304, 3072)] == \
        ["s112x128", "s160x128", "s160x128", "s208x128"]
    k_unswapped = picker([v for v in F16_TILES if F16_TILES[v].family != "swap"])
    assert k_unswapped.pick_swap(546, 768) is None
    assert k_unswapped.pick_f16(1023, 768, False, 3072) == "t32x64k64s4"     # 32 x 12 blocks: more than fit two an SM
    # a variant list without the 128-wide k-slice tiles (the default before session 25): their 64-wide twins
    old = [v for v in F16_TILES if v not in ("t32x32k128s4", "t32x64k128s4") and F16_TILES[v].family != "swap"]
    k_old = picker(old)
    assert k_old.pick_f16(137, 768, False, 3072) == "t32x32k64s8"
    assert k_old.pick_f16(137, 3072, True, 768) == "t32x64k64s4"
    assert k_old.pick_f16(546, 768, False, 768) == "t32x64k64s4"
    assert k.pick_f16(8192, 50257, False, 768) == "tma128"   # the LM head is not staged
    check_decode_and_mid_picks(k)
    k = picker(tma_staged=False)
    assert k.pick_f16(131072, 2304, True, 768) == "tma128"
    assert k.pick_f16(131072, 768, False, 3072) == "tma256"
    assert k.pick_f16(8192, 768, False, 3072) == "tma192"
    assert k.pick_f16(8192, 768, False, 768) == "t128x128k64s3"
    assert k.pick_f16(8192, 2304, True, 768) == "wgmma"
    assert picker(("t64x128k64s4", "tma128")).pick_f16(137, 768, False, 3072) == "tma128"   # not compiled
    assert k.pick_f16(8192, 50257, False, 768) == "tma128"
    assert picker(("t128x128k64s3", "t64x128k64s4")).pick_f16(8192, 50257, False, 768) == "t128x128k64s3"
    assert picker(("t128x128k64s3",)).pick_f16(131072, 2304) == "t128x128k64s3"
    every = tuple(F16_TILES)
    assert picker(every, tma_staged=False).pick_f16(131072, 3072, True, 768) == "tma128"
    k = picker(every, tma_staged=False, tma_persistent=True)
    assert k.pick_f16(131072, 3072, True, 768) == "tma128p"
    assert k.pick_f16(8192, 50257, False, 768) == "tma128p"
    k = picker(tuple(v for v in every if v != "tma128pp"))   # the staged picks without the ping-pong kernel
    assert k.pick_f16(131072, 2304, True, 768) == "tma192s"
    assert k.pick_f16(8192, 3072, True, 768) == "tma128"
    assert k.pick_f16(131072, 768, False, 768) == "tma128s"
    assert k.pick_f16(8192, 768, False, 768) == "tma192s"
    assert k.pick_f16(8192, 768, False, 3072) == "tma128s"
    assert k.pick_f16(4096, 768, False, 3072) == "tma128s"
    assert k.pick_f16(8192, 50257, False, 768) == "tma128"   # the LM head is not staged
    check_decode_and_mid_picks(k)
    # the greedy LM head: a persistent TMA kernel (M tiles fastest), else the plain product's pick
    assert picker().pick_argmax(8192, 50257) == "tma192p" and k.pick_argmax(8192, 50257) == "tma192p"
    assert picker(("tma192s", "tma128")).pick_argmax(8192, 50257) == "tma192s"
    assert picker(("tma128", "t128x128k64s3")).pick_argmax(8192, 50257) == "t128x128k64s3"
    assert picker(argmax_variant="tma128s").pick_argmax(8192, 50257) == "tma128s"


# ---------------------------------------------------------------- the registry against the .cu, pycuda stood in


def _signature(params):
    """PyCUDA signature letters of a C parameter list."""
    out = ""
    for p in params.split(","):
        words = p.replace("*", " * ").split()
        types_ = [w for w in words[:-1] if w not in ("const", "__restrict__", "volatile")]
        if "*" in types_:
            out += "P"
        else:
            out += {"int": "i", "float": "f", "double": "d", "unsigned long long": "Q"}[" ".join(types_)]
    return out


_HEAD = re.compile(r'extern "C" __attribute__\(\(global\)\) void\s*(?:__attribute__\(\(launch_bounds\((.*)\)\)\)\s*)?$')


def kernel_in(text, name):
    """(signature, launch bounds or None) of kernel `name` defined in preprocessed source text."""
    found = None
    for m in re.finditer(rf"(?<!\w){name}\s*\(", text):
        before = text[max(0, m.start() - 400):m.start()]
        head = _HEAD.search(before[before.rfind('extern "C"'):]) if 'extern "C"' in before else None
        if head:
            found = head, m.end()
    assert found, f"{name} is not in this module"
    head, start = found
    depth, i = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    bounds = None
    if head.group(1):
        bounds = tuple(int(eval(x, {"__builtins__": {}})) for x in head.group(1).split(","))
    return _signature(text[start:i - 1]), bounds


class _FakeDrv:
    """Just enough of pycuda.driver for Kernels.__init__ without a GPU."""
    cc = (9, 0)

    class device_attribute:
        MULTIPROCESSOR_COUNT = "sm_count"
        MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = "smem_optin"

    class function_attribute:
        MAX_DYNAMIC_SHARED_SIZE_BYTES = "max_dyn_smem"
        SHARED_SIZE_BYTES = "static_smem"

    class _Device:
        def compute_capability(self):
            return _FakeDrv.cc

        def get_attribute(self, attr):
            return {"sm_count": 132, "smem_optin": 232448}[attr]

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
        def __init__(self, name, text):
            self.name = name
            self.parsed_sig, self.bounds = kernel_in(text, name)
            self.sig = self.smem = None

        def prepare(self, sig):
            assert sig == self.parsed_sig, f"{self.name}: registry signature {sig}, the .cu says {self.parsed_sig}"
            self.sig = sig

        def set_attribute(self, attr, value):
            self.smem = value

        def get_attribute(self, attr):
            assert attr == "static_smem"
            return 4096

    class _Module:
        def __init__(self, text):
            self.text = text

        def get_function(self, name):
            return _FakeDrv._Function(name, self.text)

    @staticmethod
    def module_from_buffer(cubin):   # the "cubin" is _preprocess's text
        return _FakeDrv._Module(cubin.decode())


@functools.lru_cache(maxsize=None)
def _preprocess_text(src, arch, options, include_dirs):
    with tempfile.NamedTemporaryFile("w", suffix=".cu", delete=False) as fh:
        fh.write(src)
    r = subprocess.run(["nvcc", "-E", "-x", "cu", f"-arch={arch}", *options, *[f"-I{d}" for d in include_dirs],
                        fh.name], capture_output=True, text=True)
    os.unlink(fh.name)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _preprocess(src, no_extern_c, arch, options, include_dirs, cache_dir):
    """nvcc -E of the source with the job's defines: what the module would define (as bytes, like a cubin)."""
    return _preprocess_text(src, arch, tuple(options), tuple(include_dirs)).encode()


@pytest.fixture
def ck(monkeypatch, tmp_path):
    fake_pycuda = types.ModuleType("pycuda")
    fake_compiler = types.ModuleType("pycuda.compiler")
    fake_compiler.compile = _preprocess
    fake_pycuda.driver = _FakeDrv
    fake_pycuda.compiler = fake_compiler
    monkeypatch.setitem(sys.modules, "pycuda", fake_pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", _FakeDrv)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", fake_compiler)
    import gpt2job.backends.cuda.kernels as ck
    monkeypatch.setattr(ck, "cache_dir", lambda: str(tmp_path))
    return ck


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_registry_matches_the_cu_sources_and_every_kernel_loads(ck, monkeypatch):
    every = ck.Kernels(KernelOptions(f16_variants=ALL_TILES))   # every kernel in its module, signature checked
    assert every.f16_variants == tuple(ck.F16_TILES)
    assert every.row_cache_floats == (232448 - 4096) // 4   # a GPT-2 row of logits (50,257) fits: sampled from it
    assert len({t.module(True)[0] for t in ck.F16_TILES.values()}) == len(ck.F16_TILES)   # one module each: parallel nvcc
    for k in ck.KERNELS:   # the block size is the kernel's __launch_bounds__ where it declares one
        bounds = every.funcs[k.name].bounds
        assert bounds is None or bounds[0] == k.threads, k.name
    src = cuda_src_dir()
    text = {f: open(os.path.join(src, f)).read() for f in ("gemm_f16.cu", "gemm_tma.cu", "gemm_wgmma.cu",
                                                           "gemm_swap.cu")}
    seen = set()
    for part, name, bm, bn, bk, wm, wn, st, minb in re.findall(
            r"GEMM_F16_PART == (\d+)\nDEF_GEMM_F16\(gemm_f16_(\w+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\)",
            text["gemm_f16.cu"]):
        bm, bn, bk, wm, wn, st = map(int, (bm, bn, bk, wm, wn, st))
        t = ck.F16_TILES[name]
        assert (t.family, t.bm, t.bn, t.wn, t.threads) == ("mma", bm, bn, wn, (bm // wm) * (bn // wn) * 32), name
        assert t.smem_half == t.smem_float == (bm + bn) * bk * 2 * st and t.defines == (f"-DGEMM_F16_PART={part}",)
        seen.add(name)
    for bn_, p_, name, tbn, sth, stf, minb, persist, staged in re.findall(
            r"GEMM_TMA_BN == (\d+) && GEMM_TMA_PERSIST == (\d)\)\nDEF_GEMM_TMA2?\(gemm_f16_(\w+), (\d+), (\d+), "
            r"(?:(\d+), )?(\d+), (true|false)(?:, (true|false))?\)", text["gemm_tma.cu"]):
        t = ck.F16_TILES[name]
        tbn, sth, minb = int(tbn), int(sth), int(minb)
        stf = int(stf) if stf else sth
        assert t.defines == (f"-DGEMM_TMA_BN={bn_}", f"-DGEMM_TMA_PERSIST={p_}") and int(bn_) == tbn == t.bn == t.wn
        assert (t.family, t.threads, t.persistent, t.blocks_per_sm) == ("tma", 288, persist == "true", minb), name
        if staged == "true":
            assert (t.smem_half, t.smem_float) == (ck._staged_smem(tbn, sth, True), ck._staged_smem(tbn, stf, False))
        else:
            assert t.smem_half == t.smem_float == sth * (128 + tbn) * 64 * 2 + 1024 + 64, name
        assert max(t.smem_half, t.smem_float) <= 227 * 1024, name   # fits an H100 block
        seen.add(name)
    for bn_, per, name, tbn, sth, stf in re.findall(       # ping-pong
            r"GEMM_TMA_BN == (\d+) && GEMM_TMA_PERSIST == (\d+)\)\nDEF_GEMM_TMA_PP\(gemm_f16_(\w+), (\d+), (\d+), (\d+)\)",
            text["gemm_tma.cu"]):
        t = ck.F16_TILES[name]
        tbn, sth, stf = int(tbn), int(sth), int(stf)
        assert t.defines == (f"-DGEMM_TMA_BN={bn_}", f"-DGEMM_TMA_PERSIST={per}") and int(bn_) == tbn == t.bn == t.wn
        assert (t.family, t.threads, t.persistent, t.blocks_per_sm) == ("tma", 384, True, 1), name
        for st, half, smem in ((sth, True, t.smem_half), (stf, False, t.smem_float)):
            row, rows = (tbn * 2 + 16, 128) if half else (tbn * 4 + 32, 64)
            assert smem == st * (128 + tbn) * 64 * 2 + 2 * rows * row + 1024 + 16 * st, name
            assert smem <= 227 * 1024, name
        seen.add(name)
    assert "DEF_GEMM_SWAP_EXPANDED(SWAP_NAME, SWAP_WR, SWAP_WN, SWAP_ST)" in text["gemm_swap.cu"]
    for t in (t for t in ck.F16_TILES.values() if t.family == "swap"):   # swapped: token rows bm x weight rows bn
        d = dict(x[2:].split("=") for x in t.defines)
        wr, wn, st = int(d["SWAP_WR"]), int(d["SWAP_WN"]), int(d["SWAP_ST"])
        assert d["SWAP_NAME"] == f"gemm_f16_{t.name}" and t.name == f"s{t.bm}x{t.bn}" and wr == t.bn in (64, 128)
        assert t.bm == (wn if wr == 128 else 2 * wn) and wn % 16 == 0 and (t.threads, t.blocks_per_sm) == (288, 1)
        assert t.smem_half == t.smem_float == st * (wr + t.bm) * 64 * 2 + 1024 + 16 * st + 4 * t.bm <= 227 * 1024, \
            t.name
        assert st * (wr + t.bm) * 64 * 2 >= 2 * wn * 72 * 4, t.name   # the transposed blocks fit in the stages
        seen.add(t.name)
    d = dict(re.findall(r"#define (WG_\w+) (\d+)", text["gemm_wgmma.cu"]))
    t = ck.F16_TILES["wgmma"]
    assert (t.bm, t.bn, t.wn) == (int(d["WG_BM"]), int(d["WG_BN"]), int(d["WG_BN"]))
    assert t.smem_half == (int(d["WG_BM"]) + int(d["WG_BN"])) * int(d["WG_BK"]) * 2 * int(d["WG_ST"]) + 1024
    # the grid kernels.py launches for wide products and the tile order gemm_tma.cu reads from it agree
    assert int(re.search(r"#define TMA_WIDE_N (\d+)", text["gemm_tma.cu"]).group(1)) == ck.TMA_WIDE_N
    assert seen | {"wgmma"} == set(ck.F16_TILES)
    for t in ck.F16_TILES.values():
        for out_half in (True, False):
            f = every.funcs[t.kernel(out_half)]
            assert f.bounds[0] == t.threads and f.smem == (t.smem(out_half) if t.smem(out_half) > 48 * 1024 else None)
            if t.uses_tma:
                assert f.bounds[1] == t.blocks_per_sm


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernels_compile_the_default_tiles_of_the_gpu(ck, monkeypatch):
    k = ck.Kernels()                       # the default variants of a Hopper GPU
    assert k.f16_variants == ck.F16_DEFAULT and k.tmaps is not None
    assert k.funcs["gemm_f16_tma256_outh"].sig == "PP" + ck._F16_SIG
    assert k.pick_f16(131072, 2304, True, 768) == "tma128pp" and k.pick_argmax(8192, 50257) == "tma192p"
    monkeypatch.setattr(_FakeDrv, "cc", (8, 0))
    k = ck.Kernels()                       # elsewhere mma.sync only, no TMA descriptors
    assert k.f16_variants == ck.F16_DEFAULT_NOT_HOPPER and k.tmaps is None
    assert "gemm_f16_tma128_outh" not in k.funcs
    for bad in ("tma128x", "tma256s"):   # misspelt; not compiled by default
        with pytest.raises(UserError, match="GPT2JOB_ARGMAX_VARIANT"):
            ck.Kernels(KernelOptions(f16_variants=ck.F16_DEFAULT, argmax_variant=bad))
    with pytest.raises(UserError, match="unknown fp16 GEMM variant"):
        ck.Kernels(KernelOptions(f16_variants=("v0",)))


class FakeGraph:
    """graphs.Graph without a GPU: 'captures' fn by running it (a test's step records its calls), replays it."""
    made, fail = [], False

    def __init__(self, stream, fn, pdl=False):
        if FakeGraph.fail:
            raise RuntimeError("capture not allowed")
        self.fn, self.closed, self.pdl = fn, False, pdl
        FakeGraph.made.append(self)

    def launch(self):
        assert not self.closed
        self.fn()

    def close(self):
        self.closed = True


def test_step_graphs_run_first_capture_second_replay_after_and_drop_on_a_new_generation(monkeypatch):
    from gpt2job.backends.cuda import graphs
    monkeypatch.setattr(graphs, "Graph", FakeGraph)
    monkeypatch.setattr(FakeGraph, "made", [])
    monkeypatch.setattr(FakeGraph, "fail", False)
    gen = [0]
    g = graphs.StepGraphs(None, lambda: gen[0], pdl=True)
    calls = []
    for _ in range(4):
        g.run("a", lambda: calls.append("a"))
    assert calls == ["a"] * 4 and g.captures == 1 and g.replays == 3 and len(FakeGraph.made) == 1
    assert FakeGraph.made[0].pdl                 # programmatic edges asked for, as the backend says
    gen[0] += 1                                  # a pool buffer moved: the graph is dropped, the key runs eagerly
    g.run("a", lambda: calls.append("a"))
    assert FakeGraph.made[0].closed and g.captures == 1 and not g.graphs
    g.run("a", lambda: calls.append("a"))
    assert g.captures == 2 and len(calls) == 6


def test_step_graphs_stop_capturing_when_graphs_do_not_pay_and_turn_off_when_a_capture_fails(monkeypatch):
    from gpt2job.backends.cuda import graphs
    monkeypatch.setattr(graphs, "Graph", FakeGraph)
    monkeypatch.setattr(FakeGraph, "made", [])
    monkeypatch.setattr(FakeGraph, "fail", False)
    g = graphs.StepGraphs(None, lambda: 0, warm=2, payback=4)
    for key in range(6):                         # each row count twice: a capture each, one replay each
        g.run(key, lambda: None)
        g.run(key, lambda: None)
    assert g.captures == 2 and g.replays == 2     # after 2 captures with too few replays: run as launched
    monkeypatch.setattr(FakeGraph, "fail", True)
    h = graphs.StepGraphs(None, lambda: 0)
    ran = []
    h.run("k", lambda: ran.append(1))
    h.run("k", lambda: ran.append(1))            # the capture fails: the step runs as launched, graphs are off
    h.run("k", lambda: ran.append(1))
    assert not h.on and len(ran) == 3 and h.captures == 0


def test_decode_attention_kernel_by_cache_length():
    """The grouped decode attention loads 8 key steps a round (fp16) while the step's warps fit ATTENTION_SHORT_WARPS
    an SM (a small chunk's step, the last rows of a batch that rows leave), with the next round's in flight while
    they fit ATTENTION_AHEAD_WARPS (that kernel's occupancy), at any cache length; else 4 from ATTENTION_LONG_FROM
    cache positions (W2's long contexts), else 3 in fp16 and 1 in fp32 (W1's ~24 positions in big steps), where 4
    was slower; the lane-per-key kernel has no such choice."""
    from gpt2job.backends.cuda.kernels import Kernels
    k = object.__new__(Kernels)
    k.n_sm = 132
    launched = []
    k.launch = lambda kernel, grid, stream, *args: launched.append((kernel.name, grid, args[-2]))
    for S in (24, Kernels.ATTENTION_LONG_FROM - 1, Kernels.ATTENTION_LONG_FROM, 768):
        k.attention(None, True, 1, 2, 3, 4, 0, 5, 6, 10, 12, 64, S, 0.125)
    k.attention(None, False, 1, 2, 3, 4, 0, 5, 6, 10, 12, 64, 768, 0.125)
    k.attention(None, True, 1, 2, 3, 4, 0, 5, 6, 10, 3, 40, 768, 0.125)       # D 40: lane per key
    for warps in (Kernels.ATTENTION_AHEAD_WARPS, Kernels.ATTENTION_SHORT_WARPS):
        rows = warps * 132 // 12                                                # the most rows of 12 heads on them
        for S in (24, 768):
            k.attention(None, True, 1, 2, 3, 4, 0, 5, 6, rows, 12, 64, S, 0.125)
            k.attention(None, True, 1, 2, 3, 4, 0, 5, 6, rows + 1, 12, 64, S, 0.125)
    k.attention(None, False, 1, 2, 3, 4, 0, 5, 6, 10, 12, 64, 24, 0.125)      # fp32: 1
    ahead, short = "attention_grouped_ahead_f16", "attention_grouped_short_f16"
    assert [name for name, _, _ in launched] == [
        ahead, ahead, ahead, ahead, "attention_grouped_long_f32", "attention_f16",
        ahead, short, ahead, short,                                             # 132 / 133 rows at S 24, 768
        short, "attention_grouped_three_f16", short, "attention_grouped_long_f16",  # 176 / 177 rows
        "attention_grouped_f32"]
    assert launched[0][1] == (30, 1, 1) and launched[0][2] == 24     # 10 rows x 12 heads, 4 warps a block


def test_layer_norm_kernel_by_rows():
    """Up to LN_PREFETCH_ROWS rows (decode steps) the layer norm that loads its weights with the row, above the
    other (fewer registers); fp16 and fp32 alike, 8 rows a block."""
    from gpt2job.backends.cuda.kernels import Kernels
    k = object.__new__(Kernels)
    launched = []
    k.launch = lambda kernel, grid, stream, *args: launched.append((kernel.name, grid))
    for half in (True, False):
        for R in (1, Kernels.LN_PREFETCH_ROWS, Kernels.LN_PREFETCH_ROWS + 1):
            k.layernorm(None, half, 1, None, 0, 2, 3, 4, R, 768, 1e-5)
    k.layernorm(None, True, 1, None, 0, 2, 3, 4, 0, 768, 1e-5)                # no rows: no launch
    assert launched == [("layernorm_prefetch_f16", (1, 1, 1)), ("layernorm_prefetch_f16", (128, 1, 1)),
                        ("layernorm_f16", (129, 1, 1)), ("layernorm_prefetch_f32", (1, 1, 1)),
                        ("layernorm_prefetch_f32", (128, 1, 1)), ("layernorm_f32", (129, 1, 1))]


def test_gpu_sampling_refuses_a_vocabulary_its_bucket_sums_cannot_hold():
    from gpt2job.backends.cuda.kernels_select import SAMPLE_MAX_V, SelectKernels
    k = types.SimpleNamespace(row_cache_floats=60000)
    assert SelectKernels._row_cache(k, 50257, True) == (1, 4 * 50257)
    assert SelectKernels._row_cache(k, SAMPLE_MAX_V, True) == (0, 0)        # too long for the row cache
    with pytest.raises(ValueError, match="at most 262,144 tokens"):
        SelectKernels._row_cache(k, SAMPLE_MAX_V + 1, True)


def test_replayed_steps_of_a_shrinking_group_compute_a_few_row_counts():
    """Rows leaving a group at every step change its row count, and with it a step graph's key: a replayed step
    computes the next of plan.STEP_ROWS rows instead (at most the group's; above the last, the live rows)."""
    from gpt2job.backends.cuda.plan import STEP_ROWS, step_rows
    assert [step_rows(n, 2048) for n in (1, 8, 9, 100, 384, 385, 512, 513, 2000)] == \
        [8, 8, 12, 128, 384, 512, 512, 513, 2000]
    assert step_rows(37, 40) == 40 and step_rows(40, 40) == 40
    counts = {step_rows(n, 2048) for n in range(1, 513)}
    assert counts == set(STEP_ROWS)
    assert all(step_rows(n, 2048) <= max(8, 1.5 * n) for n in range(1, 2049))   # at most half as many again


def test_a_padded_step_gives_its_padding_rows_a_row_that_has_left_at_position_0():
    """plan.step_inputs: the live rows' positions and KV rows, their places in the step before when rows left; a
    padded step (m > n) adds rows of a KV slot no longer read (a row of the group that has left), at position 0,
    reading any token of the step before: what a padding row writes and reads touches no live row."""
    import numpy as np
    from gpt2job.backends.cuda.plan import step_inputs
    lens = np.array([5, 6, 7, 8, 9, 10], np.int64)   # the plan's rows 0..5: a group b0 = 2, ns = 4 (rows 2..5)
    sh = np.full(12, -1, np.int32)
    assert step_inputs(sh, lens, np.array([2, 3, 4, 5]), np.ones(4, bool), 3, 4, 2, 4) == 8   # nobody left
    assert sh[:8].tolist() == [9, 10, 11, 12, 2, 3, 4, 5]
    sh[:] = -1
    keep = np.array([True, False, True, True])        # row 3 left after the step before
    assert step_inputs(sh, lens, np.array([2, 4, 5]), keep, 3, 3, 2, 4) == 9
    assert sh[:9].tolist() == [9, 11, 12, 2, 4, 5, 0, 2, 3]
    sh[:] = -1
    assert step_inputs(sh, lens, np.array([4, 5]), np.array([False, True, True]), 4, 4, 2, 4) == 12   # padded
    assert sh.tolist() == [12, 13, 0, 0, 4, 5, 2, 2, 1, 2, 0, 0]


def test_f32_products_split_k_where_the_tiles_fill_little_of_the_gpu():
    """gemm_f32's automatic K slices (the launches recorded, no GPU): decode-sized products whose tiles fill under
    half the SMs split in 4, or more up to a block an SM (at most 8, and as many as the workspace holds): 546 rows, a
    15-worker share of W1, 30 tiles: 4; 137 rows, 12 tiles: 8; W2's 2,048 rows (96 tiles) keep one, as 477a0a5."""
    from gpt2job.backends.cuda.kernels import Kernels
    k = object.__new__(Kernels)
    k.options, launches = KernelOptions(), []
    k.launch = lambda kernel, grid, stream, *args, **kw: launches.append((kernel.name, grid))
    for M, N, K, slices, split in ((546, 768, 3072, 64, 4), (546, 768, 768, 64, 4), (137, 768, 3072, 64, 8),
                                   (137, 768, 3072, 3, 3), (137, 3072, 768, 64, 4), (300, 768, 768, 64, 7),
                                   (2048, 768, 3072, 64, 1),
                                   (546, 3072, 768, 64, 1), (8192, 768, 3072, 64, 2), (4096, 768, 768, 64, 4),
                                   (546, 768, 256, 64, 1)):
        launches.clear()
        k.gemm_f32(None, 256, K, 256, N, 256, N, 0, M, N, K, 0, ws=256, ws_slices=slices)
        assert launches[0][1][2] == split, (M, N, K)
        assert [name for name, _ in launches[1:]] == (["splitk_reduce_f32"] if split > 1 else [])
    launches.clear()
    k.gemm_f32(None, 256, 3072, 256, 768, 256, 768, 0, 546, 768, 3072, 0)   # no workspace: one slice
    assert launches[0][1][2] == 1 and len(launches) == 1
