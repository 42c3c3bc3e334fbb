"""Each CUDA kernel against its NumPy twin on fresh random inputs, and CudaBackend against NumpyBackend.

Skipped cleanly without pycuda or a GPU. Every test draws from RNG, seeded per test from a base seed (random per
run) and the test's name; each test prints its seed, shown when it fails: TEST_SEED=BASE reruns the same inputs.
"""
import dataclasses
import math
import os
import zlib

import numpy as np
import pytest

from conftest import cuda_or_skip
from twin_ties import assert_same_but_ties, margin

drv, _NGPU = cuda_or_skip()

from gpt2job.backends.base import compute
from gpt2job.backends.cuda.options import ALL_TILES, KernelOptions
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.chunks import Chunk, RowParams
from gpt2job.model import reference, sampling
from gpt2job.model.config import GPT2Config
from gpt2job.settings import GenerationSettings, SamplingSettings


@pytest.fixture(scope="module")
def K():
    from gpt2job.backends.cuda.kernels import Kernels
    ctx = drv.Device(0).make_context()
    try:
        yield Kernels(KernelOptions(f16_variants=ALL_TILES))
    finally:
        ctx.pop()
        ctx.detach()


BASE_SEED = int(os.environ.get("TEST_SEED") or np.random.SeedSequence().entropy % 2 ** 32)
RNG = np.random.default_rng(BASE_SEED)


@pytest.fixture(autouse=True)
def seeded_rng(request):
    """RNG seeded for this test from BASE_SEED and its name (printed: pytest shows it with a failure)."""
    global RNG
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2 ** 32
    RNG = np.random.default_rng(seed)
    print(f"RNG seed {seed} (reproduce: TEST_SEED={BASE_SEED} pytest '{request.node.nodeid}')")
    yield


def gpu(a):
    a = np.ascontiguousarray(a)
    g = drv.mem_alloc(max(a.nbytes, 16))
    drv.memcpy_htod(g, a)
    return g


def poisoned(shape, dtype):
    a = np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype)
    return gpu(a)


def back(g, shape, dtype):
    out = np.empty(shape, dtype)
    drv.Context.synchronize()
    drv.memcpy_dtoh(out, g)
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def epilogue_ref(acc, bias, mode, resid):
    v = acc + (bias if bias is not None else 0.0)
    if mode == 1:
        v = reference.gelu_tanh(v.astype(np.float32)).astype(np.float64)
    elif mode == 2:
        v = reference.gelu_erf(v.astype(np.float32)).astype(np.float64)
    elif mode == 3:
        v = resid + v
    return v


GEMM_SHAPES = [(1, 1, 1), (7, 33, 19), (130, 257, 64), (300, 2304, 768), (64, 1000, 64), (257, 768, 3072)]


# ---------------------------------------------------------------- matrix products


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_gemm_f32(K, shape, mode):
    M, N, Kd = shape
    A = RNG.standard_normal((M, Kd), dtype=np.float32)
    B = RNG.standard_normal((Kd, N), dtype=np.float32) / np.float32(math.sqrt(Kd))
    bias = RNG.standard_normal(N, dtype=np.float32)
    resid = RNG.standard_normal((M, N), dtype=np.float32)
    Cg = gpu(resid) if mode == 3 else poisoned((M, N), np.float32)
    K.gemm_f32(None, gpu(A), Kd, gpu(B), N, Cg, N, gpu(bias), M, N, Kd, mode)
    got = back(Cg, (M, N), np.float32)
    ref = epilogue_ref(A.astype(np.float64) @ B.astype(np.float64), bias, mode, resid)
    assert np.isfinite(got).all()
    # (or within 1e-6: a lone GELU-erf output at x < -4 is under 1e-4, and 1 + erf(x / sqrt 2) there cancels to a few
    # ulps of 1 in float32, so its relative error can pass 2e-5: 6e-5 at x = -4.5; a seed drew one on the 1 x 1 x 1
    # shape in session 48)
    assert rel(got, ref) < 2e-5 or np.abs(got - ref).max() < 1e-6
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [2, 3, 4, None])   # (None: the launcher's choice, 4 for the first two shapes)
@pytest.mark.parametrize("mode", [0, 1, 3])
@pytest.mark.parametrize("shape", [(300, 768, 3072), (129, 770, 1000), (8, 40, 37)])
def test_gemm_f32_split_k(K, shape, mode, split):
    M, N, Kd = shape
    A = RNG.standard_normal((M, Kd), dtype=np.float32)
    B = RNG.standard_normal((Kd, N), dtype=np.float32) / np.float32(math.sqrt(Kd))
    bias = RNG.standard_normal(N, dtype=np.float32)
    resid = RNG.standard_normal((M, N), dtype=np.float32)
    Cg = gpu(resid) if mode == 3 else poisoned((M, N), np.float32)
    ws = poisoned((split or 4, M, N), np.float32)
    K.gemm_f32(None, gpu(A), Kd, gpu(B), N, Cg, N, gpu(bias), M, N, Kd, mode, split=split, ws=ws)
    got = back(Cg, (M, N), np.float32)
    ref = epilogue_ref(A.astype(np.float64) @ B.astype(np.float64), bias, mode, resid)
    assert np.isfinite(got).all()
    assert rel(got, ref) < 2e-5


@pytest.mark.parametrize("C,R", [(64, 77), (768, 300), (37, 5)])
def test_gemm_f32_qkv_into_cache(K, C, R):
    nsl, S, base = 7, 50, 3
    A = RNG.standard_normal((R, C), dtype=np.float32)
    W = RNG.standard_normal((C, 3 * C), dtype=np.float32) / np.float32(math.sqrt(C))
    bias = RNG.standard_normal(3 * C, dtype=np.float32)
    cells = RNG.permutation(nsl * S)[:R]
    slot, pos = (cells // S).astype(np.int32), (cells % S).astype(np.int32)
    out = poisoned((R, 3 * C), np.float32)
    kc, vc = poisoned((nsl, S, C), np.float32), poisoned((nsl, S, C), np.float32)
    K.gemm_f32(None, gpu(A), C, gpu(W), 3 * C, out, 3 * C, gpu(bias), R, 3 * C, C, EPI_QKV,
               qkv=(gpu(slot + base), gpu(pos), base, S, kc, vc, C))
    ref = A.astype(np.float64) @ W.astype(np.float64) + bias
    got = back(out, (R, 3 * C), np.float32)
    assert rel(got[:, :C], ref[:, :C]) < 2e-6
    assert np.isnan(got[:, C:]).all()
    gk, gv = back(kc, (nsl, S, C), np.float32), back(vc, (nsl, S, C), np.float32)
    assert rel(gk[slot, pos], ref[:, C:2 * C]) < 2e-6 and rel(gv[slot, pos], ref[:, 2 * C:]) < 2e-6
    mask = np.ones((nsl, S), bool)
    mask[slot, pos] = False
    assert np.isnan(gk[mask]).all() and np.isnan(gv[mask]).all()


def test_gemm_f32_padded_ld_no_bias(K):
    M, N, Kd, ldb, ldc = 33, 1000, 64, 1024, 1152
    A = RNG.standard_normal((M, Kd), dtype=np.float32)
    B = RNG.standard_normal((Kd, ldb), dtype=np.float32)
    Cg = poisoned((M, ldc), np.float32)
    K.gemm_f32(None, gpu(A), Kd, gpu(B), ldb, Cg, ldc, None, M, N, Kd, 0)
    got = back(Cg, (M, ldc), np.float32)
    assert rel(got[:, :N], A.astype(np.float64) @ B[:, :N]) < 2e-6
    assert np.isnan(got[:, N:]).all()


F16_SHAPES = [(1, 8, 8), (77, 1000, 64), (300, 2304, 768), (129, 3072, 768), (200, 768, 3072), (5, 50257, 64),
              (260, 20000, 64)]   # (wider than TMA_WIDE_N: the TMA tiles walk M tiles fastest)


from gpt2job.backends.cuda.kernels import EPI_ARGMAX, EPI_ARGMAX_LSE, EPI_QKV, EPI_TEMPERED, F16_TILES  # noqa: E402
from gpt2job.model.logprobs import token_logprobs  # noqa: E402

_VARIANTS = list(F16_TILES)


def assert_f16_product_close(got, ref, out_half):
    """Element by element: |got - ref| <= atol + rtol |ref|, ref the float64 product of the same fp16 operands. The
    products are exact and summed in fp32 (error ~1e-6 at these magnitudes: values ~1, K <= 3072); a half output then
    rounds to the nearest fp16, at most 2^-11 |ref| (rtol 2e-3 leaves 4x that; atol covers values near 0 and the
    fp32 sum); a float output keeps the fp32 sum (rtol, atol 2e-5)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    atol, rtol = (2e-4, 2e-3) if out_half else (2e-5, 2e-5)
    bad = np.abs(got - ref) > atol + rtol * np.abs(ref)
    if bad.any():
        i = np.unravel_index(np.argmax(np.abs(got - ref) - rtol * np.abs(ref)), got.shape)
        raise AssertionError(f"{int(bad.sum())} of {bad.size} elements outside atol {atol} + rtol {rtol} x |ref|; "
                             f"worst at {tuple(int(x) for x in i)}: got {got[i]!r}, want {ref[i]!r}")


def check_gemm_f16(K, M, N, Kd, mode, out_half, variant):
    """One fp16 product with an epilogue (output poisoned, or the residual for mode 3) against float64 NumPy."""
    A = RNG.standard_normal((M, Kd), dtype=np.float32).astype(np.float16)
    W = (RNG.standard_normal((Kd, N), dtype=np.float32) / np.float32(math.sqrt(Kd))).astype(np.float16)
    bias = RNG.standard_normal(N, dtype=np.float32)
    resid = RNG.standard_normal((M, N), dtype=np.float32)
    odt = np.float16 if out_half else np.float32
    Cg = gpu(resid) if mode == 3 else poisoned((M, N), odt)
    K.gemm_f16(None, gpu(A), Kd, gpu(np.ascontiguousarray(W.T)), Kd, Cg, N, gpu(bias), M, N, Kd, mode, out_half,
               variant=variant)
    got = back(Cg, (M, N), odt)
    ref = epilogue_ref(A.astype(np.float64) @ W.astype(np.float64), bias, mode, resid)
    assert np.isfinite(got).all()
    assert rel(got, ref) < (2e-3 if out_half else 1e-5)
    assert_f16_product_close(got, ref, out_half)


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("shape", F16_SHAPES)
@pytest.mark.parametrize("mode,out_half", [(0, True), (1, True), (2, True), (3, False), (0, False)])
def test_gemm_f16(K, shape, mode, out_half, variant):
    check_gemm_f16(K, *shape, mode, out_half, variant)


@pytest.mark.parametrize("variant", [v for v in _VARIANTS if v.startswith("tma")])
@pytest.mark.parametrize("mode,out_half", [(0, True), (1, True), (3, False)])
def test_gemm_f16_tma_many_tiles_per_block(K, variant, mode, out_half):
    """Enough tiles that each block of a persistent grid loops over several (the stage ring runs on across tiles),
    with partial tiles at the M and N edges."""
    check_gemm_f16(K, 4100, 2312, 768, mode, out_half, variant)


GELU_BITS = r"""
#include "common.cuh"
// the form gelu_tanh_fast had before its exp flushed subnormal results (__expf keeps them)
__device__ __forceinline__ float gelu_tanh_expf(float x) {
    const float k2 = 2.0f * 0.7978845608028654f;
    return __fdividef(x, 1.0f + __expf(-k2 * (x + 0.044715f * x * x * x)));
}
// every float32 bit pattern from base on, n of them: count those whose results differ in their bits; the first in
// first (0xffffffff: none)
extern "C" __global__ void gelu_bits(unsigned base, unsigned n, unsigned long long* count, unsigned* first)
{
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float x = __uint_as_float(base + i);
        if (__float_as_uint(gelu_tanh_fast(x)) != __float_as_uint(gelu_tanh_expf(x))) {
            atomicAdd(count, 1ull);
            atomicMin(first, base + i);
        }
    }
}
"""


def test_gelu_tanh_fast_keeps_the_bits_of_its_expf_form_for_every_float(K):
    """The fp16 products' GELU (common.cuh gelu_tanh_fast) flushes its exp's subnormal results to zero
    (ex2.approx.ftz), which 1 + e rounds away all the same: every float32 input gives __expf's bits."""
    from gpt2job.backends.cuda.nvcc import nvcc_cubin
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")
    arch = "sm_%d%d" % drv.Context.get_device().compute_capability()
    f = drv.module_from_buffer(nvcc_cubin(GELU_BITS, arch, ("-std=c++17",), [src])).get_function("gelu_bits")
    count, first = gpu(np.zeros(1, np.uint64)), gpu(np.full(1, 0xFFFFFFFF, np.uint32))
    for half in (0, 1 << 31):   # all 2^32 patterns, in two launches (n fits an unsigned)
        f(np.uint32(half), np.uint32(1 << 31), count, first, block=(256, 1, 1), grid=(4096, 1))
    got_count, got_first = np.zeros(1, np.uint64), np.zeros(1, np.uint32)
    drv.memcpy_dtoh(got_count, count)
    drv.memcpy_dtoh(got_first, first)
    assert int(got_count[0]) == 0, f"{int(got_count[0])} inputs differ, the first 0x{int(got_first[0]):08x}"


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("C,R", [(64, 77), (768, 300), (40, 1)])
def test_gemm_f16_qkv_into_cache(K, variant, C, R):
    """EPI_QKV: q columns to the output, k/v columns scattered into the cache at (slot - base, pos)."""
    nsl, S, base = 7, 50, 3
    A = RNG.standard_normal((R, C), dtype=np.float32).astype(np.float16)
    W = (RNG.standard_normal((C, 3 * C), dtype=np.float32) / np.float32(math.sqrt(C))).astype(np.float16)
    bias = RNG.standard_normal(3 * C, dtype=np.float32)
    # distinct (slot, pos) per row
    cells = RNG.permutation(nsl * S)[:R]
    slot, pos = (cells // S).astype(np.int32), (cells % S).astype(np.int32)
    out = poisoned((R, 3 * C), np.float16)
    kc, vc = poisoned((nsl, S, C), np.float16), poisoned((nsl, S, C), np.float16)
    K.gemm_f16(None, gpu(A), C, gpu(np.ascontiguousarray(W.T)), C, out, 3 * C, gpu(bias), R, 3 * C, C, EPI_QKV, True,
               variant=variant, qkv=(gpu(slot + base), gpu(pos), base, S, kc, vc, C))
    ref = A.astype(np.float64) @ W.astype(np.float64) + bias
    got = back(out, (R, 3 * C), np.float16)
    assert rel(got[:, :C], ref[:, :C]) < 2e-3
    assert_f16_product_close(got[:, :C], ref[:, :C], True)
    assert np.isnan(got[:, C:].astype(np.float32)).all()          # k, v columns of the output untouched
    gk, gv = back(kc, (nsl, S, C), np.float16), back(vc, (nsl, S, C), np.float16)
    assert rel(gk[slot, pos], ref[:, C:2 * C]) < 2e-3
    assert rel(gv[slot, pos], ref[:, 2 * C:]) < 2e-3
    assert_f16_product_close(gk[slot, pos], ref[:, C:2 * C], True)
    assert_f16_product_close(gv[slot, pos], ref[:, 2 * C:], True)
    mask = np.ones((nsl, S), bool)
    mask[slot, pos] = False
    assert np.isnan(gk[mask].astype(np.float32)).all() and np.isnan(gv[mask].astype(np.float32)).all()


@pytest.mark.parametrize("variant", ["t128x128k64s3", "t64x128k64s4", "t128x256k64s3", "wgmma", "tma192", "tma192s",
                                     "tma128s", "tma192p", "tma256p", "tma128pp"])
@pytest.mark.parametrize("M,N,Kd", [(77, 1000, 64), (300, 50257, 768), (5, 33, 8), (1100, 5000, 64)])
def test_gemm_f16_argmax_epilogue(K, variant, M, N, Kd):
    """EPI_ARGMAX partials + argmax_partials == argmax of the same kernel's fp32 output (lowest index on ties); the
    EPI_ARGMAX_LSE partials + argmax_partials(lp=) give the same tokens and their log-probabilities as the NumPy
    twin (model/logprobs.py) gives from that output."""
    A = RNG.standard_normal((M, Kd), dtype=np.float32).astype(np.float16)
    W = (RNG.standard_normal((Kd, N), dtype=np.float32) / np.float32(math.sqrt(Kd))).astype(np.float16)
    W[:, N - 1] = W[:, N // 2]            # exact duplicate columns: ties must go to the lower index
    W[:, N // 3] = W[:, N // 2]
    A[0] = A[0] * 0 + 1                  # row 0: ties everywhere the columns sum alike
    gA, gW = gpu(A), gpu(np.ascontiguousarray(W.T))
    logits = poisoned((M, N), np.float32)
    K.gemm_f16(None, gA, Kd, gW, Kd, logits, N, None, M, N, Kd, 0, False, variant=variant)
    ref = np.argmax(back(logits, (M, N), np.float32), axis=-1)
    nch = (N + F16_TILES[variant].wn - 1) // F16_TILES[variant].wn
    part = poisoned((M, nch + 3, 2), np.float32)
    K.gemm_f16(None, gA, Kd, gW, Kd, part, nch + 3, None, M, N, Kd, EPI_ARGMAX, False, variant=variant)
    out = poisoned(M, np.int32)
    K.argmax_partials(None, part, nch + 3, nch, out, M)
    np.testing.assert_array_equal(back(out, M, np.int32), ref)
    part4 = poisoned((M, nch + 3, 4), np.float32)
    K.gemm_f16(None, gA, Kd, gW, Kd, part4, nch + 3, None, M, N, Kd, EPI_ARGMAX_LSE, False, variant=variant)
    out, lp = poisoned(M, np.int32), poisoned(M, np.float32)
    K.argmax_partials(None, part4, nch + 3, nch, out, M, lp=lp)
    np.testing.assert_array_equal(back(out, M, np.int32), ref)
    want, _, _ = token_logprobs(back(logits, (M, N), np.float32), ref)
    np.testing.assert_allclose(back(lp, M, np.float32), want, atol=2e-5, rtol=1e-6)



@pytest.mark.parametrize("variant", ["tma192p", "tma192s", "tma128s", "tma128p", "tma128", "wgmma", "tma128pp"])
@pytest.mark.parametrize("M,N,Kd", [(300, 50257, 768), (77, 1000, 64), (5, 100, 8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_gemm_f16_tempered_epilogue(K, variant, M, N, Kd, per_row):
    """tempered_keys against model/sampling.py tempered_key; the EPI_TEMPERED partials + argmax_partials give the
    same tokens as the selection kernel on the same kernel's fp32 output (sampling rule 6; greedy rows, temperature
    0, its argmax), bit for bit, and as the NumPy twin but for near ties; the job's settings or each row's."""
    from gpt2job.backends.cuda.rows import RowSel
    A = RNG.standard_normal((M, Kd), dtype=np.float32).astype(np.float16)
    W = (RNG.standard_normal((Kd, N), dtype=np.float32) * np.float32(3 / math.sqrt(Kd))).astype(np.float16)
    gA, gW = gpu(A), gpu(np.ascontiguousarray(W.T))
    logits = poisoned((M, N), np.float32)
    K.gemm_f16(None, gA, Kd, gW, Kd, logits, N, None, M, N, Kd, 0, False, variant=variant)
    lg = back(logits, (M, N), np.float32)
    Q, step = M + 4, int(RNG.integers(0, 300))
    rows = RNG.integers(0, 10 ** 6, Q).astype(np.int64)
    seqidx = RNG.permutation(Q)[:M].astype(np.int32)
    seeds = RNG.integers(0, 2 ** 63, Q).astype(np.uint64)
    temps = np.where(np.arange(Q) % 3 == 0, 0.0, RNG.uniform(0.05, 2.0, Q)) if per_row else np.full(Q, 0.8)
    if not per_row:
        seeds[:] = seeds[0]
    ones, zeros = np.ones(Q), np.zeros(Q, np.int32)
    arrs = [gpu(a) for a in (seeds, temps, ones, zeros, ones.astype(np.float32))]
    sel = RowSel(*map(int, arrs), 0, 0, 0, True)
    keys = poisoned((M, 2), np.int32)
    if per_row:
        K.tempered_keys(None, gpu(rows), gpu(seqidx), step, keys, M, sel=sel)
    else:
        K.tempered_keys(None, gpu(rows), gpu(seqidx), step, keys, M, seed=int(seeds[0]), temperature=0.8)
    q = seqidx
    want_keys = [sampling.tempered_key(int(seeds[i]), int(rows[i]), step) if temps[i] > 0 else 0 for i in q]
    kv = back(keys, (M, 2), np.int32)
    np.testing.assert_array_equal(kv[:, 0].view(np.uint32), np.array(want_keys, np.uint32))
    inv = np.where(temps[q] > 0, (1.0 / np.where(temps[q] > 0, temps[q], 1.0)).astype(np.float32), np.float32(0))
    np.testing.assert_array_equal(kv[:, 1].view(np.float32), inv)
    nch = -(-N // 64)
    part = poisoned((M, nch + 3, 2), np.float32)
    K.gemm_f16(None, gA, Kd, gW, Kd, part, nch + 3, None, M, N, Kd, EPI_TEMPERED, False, variant=variant, qkv=keys)
    out = poisoned(M, np.int32)
    K.argmax_partials(None, part, nch + 3, nch, out, M)
    got = back(out, M, np.int32)
    ref = poisoned(M, np.int32)                      # the selection kernel on the same logits
    K.sample_params(None, logits, N, N, gpu(rows), gpu(seqidx), step, sel, ref, M)
    np.testing.assert_array_equal(got, back(ref, M, np.int32))
    ss = [SamplingSettings(float(temps[i]), 0, 1.0, int(seeds[i])) for i in q]
    want = sampling.select_rows(lg, rows[q], step, sampling.RowSettings(
        np.ones(M, np.int64), temps[q], np.zeros(M, np.int32), np.ones(M), seeds[q], np.ones(M, np.float32), ()))
    assert_same_but_ties(got, want, lambda b: margin(lg[b], ss[b], rows[q][b], step))
    if M > 100:
        assert (got != lg.argmax(1))[temps[q] > 0].mean() > 0.3   # the sampled rows do sample


# ---------------------------------------------------------------- per-row kernels

@pytest.mark.parametrize("C", [64, 768, 1600, 37])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_layernorm(K, C, half, prefetch, monkeypatch):
    """Rows of variance ~9 and, every third row, of variance ~1e-6 (mean 0: no cancellation), where the epsilon (1e-5)
    sets the scale: a missing or misplaced epsilon gives those rows 3x the output. Each row against float64; the
    kernel that loads the weights with the row (decode steps) and the other one bitwise the same (C 64 and 768: the
    fast path, where they differ; C 1600 and 37 take the same path in both)."""
    monkeypatch.setattr(type(K), "LN_PREFETCH_ROWS", 1 << 30 if prefetch else -1)
    R, Rin = 45, 60
    x = (RNG.standard_normal((Rin, C), dtype=np.float32) * 3 + 1).astype(np.float32)
    x[::3] = RNG.standard_normal((len(x[::3]), C), dtype=np.float32) * np.float32(1e-3)
    w = RNG.standard_normal(C, dtype=np.float32)
    b = RNG.standard_normal(C, dtype=np.float32)
    idx = RNG.integers(100, 100 + Rin, R).astype(np.int32)
    idx[:8] = np.arange(100, 124, 3)        # low-variance rows gathered too
    odt = np.float16 if half else np.float32
    for rowidx, base, src in ((None, 0, x[:R]), (idx, 100, x[idx - 100])):
        out = poisoned((R, C), odt)
        K.layernorm(None, half, gpu(x), gpu(rowidx) if rowidx is not None else None, base, gpu(w), gpu(b), out, R, C,
                    1e-5)
        got = back(out, (R, C), odt)
        monkeypatch.setattr(type(K), "LN_PREFETCH_ROWS", -1 if prefetch else 1 << 30)
        other = poisoned((R, C), odt)
        K.layernorm(None, half, gpu(x), gpu(rowidx) if rowidx is not None else None, base, gpu(w), gpu(b), other, R,
                    C, 1e-5)
        monkeypatch.setattr(type(K), "LN_PREFETCH_ROWS", 1 << 30 if prefetch else -1)
        np.testing.assert_array_equal(back(other, (R, C), odt), got)
        ref = reference.layer_norm(src.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
        low = src.var(axis=1) < 1e-4
        assert low.sum() >= 8
        for r in range(R):
            assert rel(got[r], ref[r]) < (1e-3 if half else 1e-6), (r, "low variance" if low[r] else "variance ~9")


def test_embed(K):
    V, P, C, R = 1000, 64, 96, 77
    wte = RNG.standard_normal((V, C), dtype=np.float32)
    wpe = RNG.standard_normal((P, C), dtype=np.float32)
    tok = RNG.integers(0, V, R).astype(np.int32)
    pos = RNG.integers(0, P, R).astype(np.int32)
    out = poisoned((R, C), np.float32)
    K.embed(None, gpu(tok), gpu(pos), gpu(wte), gpu(wpe), out, R, C)
    np.testing.assert_array_equal(back(out, (R, C), np.float32), reference.embed(wte, wpe, tok, pos))


@pytest.mark.parametrize("K_,N", [(1, 1), (31, 33), (100, 77), (768, 2304), (1600, 6400)])
def test_half_weights(K, K_, N):
    """half_t / half_of against reference.f16_weight, bitwise, on values that round every way: ties to even, the
    largest half, past it (inf), half subnormals and below them (to +-0), infinities (NaN weights are refused when
    the model loads)."""
    w = (RNG.standard_normal((K_, N)) * 0.05).astype(np.float32)
    edge = np.array([65504, 65519.99, 65520, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8, -6.1e-5, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                     np.inf, -np.inf, 0.0, -0.0], np.float32)
    flat = w.reshape(-1)
    flat[:min(flat.size, edge.size)] = edge[:flat.size]
    out = poisoned((N, K_), np.float16)
    K.half_t(None, gpu(w), out, K_, N)
    np.testing.assert_array_equal(back(out, (N, K_), np.float16).view(np.uint16),
                                  reference.f16_weight(w).view(np.uint16))
    out = poisoned((K_, N), np.float16)
    K.half_of(None, gpu(w), out, w.size)
    np.testing.assert_array_equal(back(out, (K_, N), np.float16).view(np.uint16),
                                  reference.f16_weight(w, transpose=False).view(np.uint16))


@pytest.mark.parametrize("H,D,grouped", [(4, 16, True), (12, 64, True), (25, 64, True), (2, 128, True), (3, 40, False),
                                          (3, 5, False), (12, 64, False), (3, 8, True), (2, 32, True)])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("keys", [1, 3, 4, 8, 9])
def test_attention(K, H, D, grouped, half, keys):
    """Ragged prefill of several prompts, then one decode step, against reference.attention (each row's key and
    value put into the cache first, as the QKV product's EPI_QKV epilogue does); the grouped kernel with 1, 4 and
    (fp16) 3 and 8 key steps (9: 8 and the next 8 in flight) loaded ahead (Kernels.attention picks by the cache's length
    and the step's warps), each bitwise the same as with 1."""
    if not grouped and keys != 1:
        pytest.skip("the lane-per-key kernel has one form")
    if keys in (3, 8, 9) and not half:
        pytest.skip("3 or 8 key steps a round (9: the next round's in flight): fp16 only")
    C = H * D
    lens = RNG.integers(1, 70, 5)
    nsl, S = len(lens), int(lens.max()) + 2
    dt = np.float16 if half else np.float32
    scale = 1.0 / math.sqrt(D) / 3.0
    kc_h, vc_h = np.full((nsl, S, C), np.nan, dt), np.full((nsl, S, C), np.nan, dt)
    ref_k = np.zeros((nsl, H, S, D), np.float32)
    ref_v = np.zeros((nsl, H, S, D), np.float32)
    slot_base = 10
    for phase in ("prefill", "decode"):
        if phase == "prefill":
            seq = np.repeat(np.arange(nsl), lens)
            pos = np.concatenate([np.arange(n) for n in lens])
        else:
            seq = np.array([3, 0, 4])
            pos = lens[seq]
        R = len(seq)
        qkv = RNG.standard_normal((R, 3 * C), dtype=np.float32).astype(dt)
        kc_h[seq, pos], vc_h[seq, pos] = qkv[:, C:2 * C], qkv[:, 2 * C:]
        g_qkv, g_seq, g_pos = gpu(qkv), gpu((seq + slot_base).astype(np.int32)), gpu(pos.astype(np.int32))
        out = poisoned((R, C), dt)
        K.attention(None, half, g_qkv, gpu(kc_h), gpu(vc_h), g_seq, slot_base, g_pos, out, R, H, D, S, scale,
                    grouped=grouped, keys=keys if grouped else None)
        got = back(out, (R, C), dt).astype(np.float32)
        if grouped and keys != 1:
            one = poisoned((R, C), dt)
            K.attention(None, half, g_qkv, gpu(kc_h), gpu(vc_h), g_seq, slot_base, g_pos, one, R, H, D, S, scale,
                        grouped=True, keys=1)
            np.testing.assert_array_equal(back(one, (R, C), dt).astype(np.float32), got)
        q32 = qkv.astype(np.float32)
        for r in range(R):
            ref_k[seq[r], :, pos[r]] = q32[r, C:2 * C].reshape(H, D)
            ref_v[seq[r], :, pos[r]] = q32[r, 2 * C:].reshape(H, D)
        for r in range(R):
            s = seq[r]
            q = q32[r, :C].reshape(1, H, 1, D)
            ref = reference.attention(q, ref_k[s:s + 1], ref_v[s:s + 1], np.array([[pos[r]]]), np.array([pos[r] + 1]),
                                      scale)
            assert rel(got[r], ref.reshape(C)) < (2e-3 if half else 1e-5), (phase, r)


@pytest.mark.parametrize("H", [12, 2])
@pytest.mark.parametrize("pb0,pb1", [(1, 8), (4, 7)])
def test_attention_prefill(K, H, pb0, pb1):
    """Tensor-core prefill attention (fp16, D = 64): one KV group of ragged prompts 1..7 (slot_base 1), one pass of
    whole prompts pb0..pb1-1 (rows from chunk row offsets[pb0]), against reference.attention. The cache past the
    written positions and the output (rows past the pass too) are poisoned with NaN."""
    from gpt2job.backends.cuda.plan import prefill_tiles
    D = 64
    C = H * D
    lens = np.array([3, 1, 15, 16, 17, 33, 200, 2])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    b0, b1 = 1, len(lens)                      # the group: prompt b in cache slot b - b0
    nsl, S = b1 - b0, int(lens.max()) + 3
    scale = 1.0 / math.sqrt(D)
    tiles, tile_off = prefill_tiles(offsets)
    t0, t1 = int(tile_off[pb0]), int(tile_off[pb1])
    r0, r1 = int(offsets[pb0]), int(offsets[pb1])
    R = r1 - r0
    seq = np.repeat(np.arange(len(lens)), lens)[r0:r1].astype(np.int32)           # row_slot: the chunk's prompt
    pos = np.concatenate([np.arange(n) for n in lens])[r0:r1].astype(np.int32)
    kc = np.full((nsl, S, C), np.nan, np.float16)
    vc = np.full((nsl, S, C), np.nan, np.float16)
    for b in range(b0, b1):                    # every prompt of the group is in the cache (earlier passes too)
        kc[b - b0, :lens[b]] = RNG.standard_normal((lens[b], C), dtype=np.float32)
        vc[b - b0, :lens[b]] = RNG.standard_normal((lens[b], C), dtype=np.float32)
    qkv = RNG.standard_normal((R, 3 * C), dtype=np.float32).astype(np.float16)
    out = poisoned((R + 16, C), np.float16)
    K.attention_prefill(None, gpu(qkv), gpu(kc), gpu(vc), gpu(seq), b0, gpu(pos), out, gpu(tiles[t0:t1]), t1 - t0,
                        r0, H, D, S, scale)
    got = back(out, (R + 16, C), np.float16).astype(np.float32)
    assert np.isnan(got[R:]).all()
    assert np.isfinite(got[:R]).all()
    for b in range(pb0, pb1):
        n, s = int(lens[b]), b - b0
        rows = got[offsets[b] - r0:offsets[b + 1] - r0]
        heads = lambda a: a.astype(np.float32).reshape(1, n, H, D).transpose(0, 2, 1, 3)  # noqa: E731
        ref = reference.attention(heads(qkv[offsets[b] - r0:offsets[b + 1] - r0, :C]), heads(kc[s, :n]),
                                  heads(vc[s, :n]), np.arange(n)[None], np.array([n]), scale)
        ref = ref.transpose(0, 2, 1, 3).reshape(n, C)
        for i in range(n):
            assert rel(rows[i], ref[i]) < 2e-3, (b, i)


# ---------------------------------------------------------------- token selection

@pytest.mark.parametrize("V", [1000, 50257, 5])
def test_argmax(K, V):
    R = 37
    lg = RNG.standard_normal((R, V), dtype=np.float32)
    lg[3, :] = 1.0                       # all ties -> 0
    lg[4, [7 % V, 2 % V, V - 1]] = 99.0  # ties -> lowest
    ld = V + 3
    buf = np.zeros((R, ld), np.float32)
    buf[:, :V] = lg
    buf[:, V:] = 1e9                     # outside V must be ignored
    out = poisoned(R, np.int32)
    K.argmax(None, gpu(buf), ld, V, out, R)
    np.testing.assert_array_equal(back(out, R, np.int32), np.argmax(lg, axis=-1))


@pytest.mark.parametrize("n", [1, 300, 5000])
def test_gather_tokens(K, n):
    src = RNG.integers(0, 50257, n + 7).astype(np.int32)
    idx = np.sort(RNG.choice(n + 7, n, replace=False)).astype(np.int32)
    out = poisoned(n, np.int32)
    K.gather_tokens(None, gpu(src), gpu(idx), out, n)
    np.testing.assert_array_equal(back(out, n, np.int32), src[idx])


SAMPLERS = [SamplingSettings(1.0, 0, 1.0, 1), SamplingSettings(0.05, 0, 1.0, 11), SamplingSettings(2.5, 0, 0.0, 12),
            SamplingSettings(0.9, 2000, 1.0, 13), SamplingSettings(0.7, 40, 1.0, 2), SamplingSettings(1.3, 0, 0.9, 3),
            SamplingSettings(0.8, 50, 0.8, 4), SamplingSettings(1.0, 1, 1.0, 5), SamplingSettings(2.0, 0, 0.05, 6),
            SamplingSettings(1.0, 3, 0.5, 2 ** 63 + 5), SamplingSettings(1e-3, 0, 0.9, 7),
            SamplingSettings(1.0, 0, 0.999999, 8), SamplingSettings(0.05, 40, 0.9, 9),
            SamplingSettings(1.0, 999, 0.95, 10)]


def selection_logits(R, V, dist):
    """Logits [R, V] for the selection tests: seeded normals, flat (std 0.55, a random GPT-2's) or peaky (std 3),
    with a row of equal logits, a row whose 40 largest tie, a row with one far outlier at the bottom (the value
    buckets of sample_block span the row's range) and a row with many zeros of both signs."""
    lg = (RNG.standard_normal((R, V), dtype=np.float32) * (0.55 if dist == "flat" else 3.0)).astype(np.float32)
    lg[0] = 1.5
    lg[1, RNG.choice(V, 40, replace=False)] = lg[1].max() + 1.0
    lg[2, int(RNG.integers(0, V))] = -1e4
    lg[3, RNG.choice(V, V // 4, replace=False)] = RNG.choice(np.array([0.0, -0.0], np.float32), V // 4)   # +-0 tie
    return lg


@pytest.mark.parametrize("s", SAMPLERS)
@pytest.mark.parametrize("V,dist,cache", [(1000, "peaky", True), (1000, "flat", True), (50257, "peaky", True),
                                          (50257, "flat", True), (50257, "peaky", False), (50257, "flat", False),
                                          (70001, "flat", True)])
def test_sample_rows(K, s, V, dist, cache):
    """sample_rows against model/sampling.py, the row in shared memory (cache, where V fits) or read from global
    memory; rows with a temperature alone (top-k off or >= V, top-p off) by rule 6."""
    R = 48
    lg = selection_logits(R, V, dist)
    rows = RNG.integers(0, 10 ** 6, R).astype(np.int64)
    seqidx = RNG.permutation(R).astype(np.int32)
    step = int(RNG.integers(0, 20))
    out = poisoned(R, np.int32)
    K.sample(None, gpu(lg), V, V, gpu(rows), gpu(seqidx), step, s.seed, s.temperature, s.top_k, s.top_p, out, R,
             cache=cache)
    got = back(out, R, np.int32)
    ref = sampling.select_tokens(lg, rows[seqidx], step, s)
    assert_same_but_ties(got, ref, lambda b: margin(lg[b], s, rows[seqidx][b], step))


@pytest.mark.parametrize("crowd", [4000, 4096, 4097, 12000])
@pytest.mark.parametrize("s", [SamplingSettings(1.0, 2000, 1.0, 1), SamplingSettings(1.0, 0, 0.5, 2),
                               SamplingSettings(0.5, 3000, 0.7, 3)])
def test_sample_rows_crowded_bucket(K, s, crowd):
    """The threshold's value bucket holds `crowd` elements (distinct logits within a 0.001 band, the rest 6 below):
    up to sampling.cu's SAMPLE_LIST (4,096) bucket_key walks them as a list, above it reads the row in each radix
    pass; both against model/sampling.py."""
    R, V = 8, 50257
    lg = np.full((R, V), -5.0, np.float32) + RNG.standard_normal((R, V), dtype=np.float32) * 0.1
    for r in range(R):
        idx = RNG.choice(V, crowd, replace=False)
        lg[r, idx] = 1.0 + RNG.random(crowd, dtype=np.float32) * 1e-3
    rows = np.arange(R, dtype=np.int64) * 3
    out = poisoned(R, np.int32)
    K.sample(None, gpu(lg), V, V, gpu(rows), 0, 5, s.seed, s.temperature, s.top_k, s.top_p, out, R)
    assert_same_but_ties(back(out, R, np.int32), sampling.select_tokens(lg, rows, 5, s),
                         lambda b: margin(lg[b], s, rows[b], 5))


# ---------------------------------------------------------------- end to end

def tiny_params(seed=0, **over):
    from gpt2job.model.weights import random_params
    cfg = GPT2Config(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": 1000, **over})
    p = random_params(cfg, seed)
    p.wte *= 10   # spread the logits so greedy ties are far apart
    return p


def make_chunk(lens, V, seed=0, chunk_id=0):
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lens) + 1, np.int64)
    offsets[1:] = np.cumsum(lens)
    toks = rng.integers(0, V, int(offsets[-1])).astype(np.int32)
    rows = np.arange(100, 100 + len(lens), dtype=np.int64) * 7
    return Chunk(chunk_id, rows, offsets, toks)


def assert_same(a, b):
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.finish, b.finish)
    np.testing.assert_array_equal(a.rows, b.rows)


LENS = [1, 5, 12, 3, 9, 16, 2, 7, 11, 4]


def run_like_a_worker(be, chunks):
    """Completions of chunks computed as a worker does: one chunk submitted while the GPU is idle, more at the
    pauses where it computes (two submitted at most), so each next upload overlaps the compute."""
    waiting, out, in_flight = list(chunks), [], 0
    while waiting or in_flight:
        if not in_flight:
            be.submit(waiting.pop(0))
            in_flight = 1
        steps = be.run()
        while True:
            try:
                pause = next(steps)
            except StopIteration as done:
                out.append(done.value)
                in_flight -= 1
                break
            while pause.submit and waiting and in_flight < 2:
                be.submit(waiting.pop(0))
                in_flight += 1
    return out


@pytest.mark.parametrize("sampling_", [SamplingSettings(), SamplingSettings(0.9, 20, 0.9, 11),
                                       SamplingSettings(1.0, 0, 1.0, 3)])
@pytest.mark.parametrize("variant", ["plain", "inv_layer_scale", "gelu_exact", "lm_head", "small_budgets"])
def test_backend_matches_numpy_float32(sampling_, variant):
    from gpt2job.backends.cuda.backend import CudaBackend
    over = {}
    if variant == "inv_layer_scale":
        over["scale_attn_by_inverse_layer_idx"] = True
    if variant == "gelu_exact":
        over["activation_function"] = "gelu"
    params = tiny_params(1, **over)
    if variant == "lm_head":
        params.lm_head = np.random.default_rng(5).standard_normal(params.wte.shape).astype(np.float32) * 0.3
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=False, eos_token_id=999, sampling=sampling_)
    chunk = make_chunk(LENS, params.config.vocab_size, seed=2)
    ref = compute(NumpyBackend(params, gs), chunk)
    # make one sequence stop early: its 2nd generated token becomes EOS
    eos = int(ref.row_tokens(0)[1])
    gs = dataclasses.replace(gs, eos_token_id=eos)
    ref = compute(NumpyBackend(params, gs), chunk)
    kw = dict(max_prefill_rows=20, head_rows=3) if variant == "small_budgets" else {}
    be = CudaBackend(params, gs, dtype="float32", **kw)
    try:
        if variant == "small_budgets":
            be.runner.kv_budget = 1     # one sequence per group
        got = compute(be, chunk)
    finally:
        be.close()
    assert (ref.finish == 1).any()
    assert_same(got, ref)


def test_backend_float16_close_and_overlapped_chunks():
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(3)
    gs = GenerationSettings(max_new_tokens=5, ignore_eos=True)
    chunks = [make_chunk(LENS, 1000, seed=s, chunk_id=s) for s in range(3)]
    refs = [compute(NumpyBackend(params, gs), c) for c in chunks]
    be = CudaBackend(params, gs, dtype="float16")
    try:
        outs = run_like_a_worker(be, chunks)
        assert len(be.timeline) == 3
        for e in be.timeline:
            assert e["upload"][0] <= e["upload"][1] and e["compute"][0] <= e["compute"][1]
        assert be.timeline[1]["upload"][1] <= be.timeline[0]["compute"][1]   # uploaded while chunk 0 computed
        # each next chunk's prefill queued behind the chunk before (Runner._start_next), after its last GPU work
        assert be.runner.early_starts == 2
        tl = list(be.timeline)
        for a, b in zip(tl, tl[1:]):
            assert a["compute"][1] <= b["compute"][0] <= b["first_launch"]
        info = be.describe()
        assert info["device"] and info["kernel_options"]["fuse_argmax"] is True
        for o, c in zip(outs, chunks):   # the same tokens as each chunk computed alone (nothing started early)
            assert_same(o, compute(be, c))
        assert be.runner.early_starts == 2
    finally:
        be.close()
    first = np.array([o.row_tokens(i)[0] for o in outs for i in range(len(LENS))])
    rfirst = np.array([o.row_tokens(i)[0] for o in refs for i in range(len(LENS))])
    assert (first == rfirst).mean() >= 0.9
    for o, c in zip(outs, chunks):
        assert o.chunk_id == c.chunk_id and o.n_generated == 5 * len(LENS)


def round_fp16(params):
    """The same model with every weight rounded to fp16 (kept as float32)."""
    def r(a):
        return None if a is None else np.asarray(a, np.float32).astype(np.float16).astype(np.float32)
    return dataclasses.replace(params, wte=r(params.wte), wpe=r(params.wpe), ln_f_w=r(params.ln_f_w),
                               ln_f_b=r(params.ln_f_b), lm_head=r(params.lm_head),
                               layers=[{k: r(v) for k, v in L.items()} for L in params.layers])


def test_backend_float16_full_sequences_match_numpy_on_fp16_rounded_weights():
    """fp16 end to end, every generated token (greedy): the CUDA fp16 backend against the NumPy twin run on the same
    weights rounded to fp16, so that the two differ only in the rounding of activations (fp16 between kernels, fp32
    sums; NumPy keeps fp32). The model has its own random LM head: sequences then change token at every step
    (with the tied head a random model repeats its last token). A sequence may leave the twin's only where that
    rounding can reorder the twin's top two logits: a near tie. The rounding is measured, not assumed: err = the
    largest |logit difference| between the fp16 prefill (last_logits) and NumPy over every prefix of the twin's
    sequences (prompt + its first s tokens), at most 1% of the logits' spread. Asserted: a sequence that differs
    first differs at a step where the twin's top-2 gap is below 4 err (two logits each off by up to err, with 2x to
    spare; decode steps round as the prefill does: the same fp16 activations and KV cache), and at most 1 in 5
    sequences differ at all (about 1 in 50 steps has a gap that small)."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(8)
    params.lm_head = np.random.default_rng(5).standard_normal(params.wte.shape).astype(np.float32) * 0.3
    params = round_fp16(params)
    new = 12
    gs = GenerationSettings(max_new_tokens=new, ignore_eos=True)
    lens = RNG.integers(1, 40, 48)
    chunk = make_chunk(lens, 1000, seed=int(RNG.integers(2 ** 31)))
    ref = compute(NumpyBackend(params, gs), chunk)
    B = len(lens)
    prefixes = [np.concatenate([p, ref.row_tokens(b)[:s]]).astype(np.int32)
                for b, p in enumerate(chunk.prompts()) for s in range(new)]
    be = CudaBackend(params, gs, dtype="float16")
    try:
        got = compute(be, chunk)
        lg16 = be.last_logits(prefixes)                                          # [B * new, V]
    finally:
        be.close()
    longest = max(len(p) for p in prefixes)
    lg32 = np.concatenate([reference.prefill(params, prefixes[i:i + 96], longest)[2]
                           for i in range(0, len(prefixes), 96)])                # [B * new, V]
    err = float(np.abs(lg16 - lg32).max())
    top2 = np.sort(lg32, axis=1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0]).reshape(B, new)                              # the twin's top-2 gap per step
    tau = 4 * err
    diverged = []
    for b in range(B):
        g, r = got.row_tokens(b), ref.row_tokens(b)
        assert len(g) == len(r) == new
        m = next((s for s in range(new) if g[s] != r[s]), None)
        if m is not None:
            diverged.append((b, m, float(gap[b, m])))
    print(f"fp16 vs NumPy on fp16-rounded weights: {B} sequences x {new} tokens; logit spread {lg32.std():.3g}, "
          f"largest error {err:.3g}, near-tie threshold {tau:.3g} ({int((gap < tau).sum())} steps under it), "
          f"smallest gap {gap.min():.3g}; {len(diverged)} sequences differ (prompt, first step, gap): {diverged}")
    assert err < 0.01 * lg32.std()
    assert all(g < tau for _, _, g in diverged), f"a sequence differs where no near tie explains it: {diverged}"
    assert len(diverged) <= B // 5


F16_ROW_COUNTS = (8192, 4096, 1024, 300, 57, 1)


@pytest.mark.parametrize("N,Kd,mode,out_half", [(2304, 768, 0, True), (768, 768, 3, False), (3072, 768, 1, True),
                                                (768, 3072, 3, False), (50257, 768, 0, False)])
def test_gemm_f16_rows_are_the_same_whatever_the_variant_and_row_count(K, N, Kd, mode, out_half):
    """A chunk computed in parts (out of memory: Runner._in_halves), in smaller KV groups or in smaller prefill
    passes runs its products on fewer rows, and the row count picks the fp16 tile variant (picks.py). Its tokens are
    bitwise those of one whole run only if a row of a product does not depend on the variant or on the other rows:
    checked for the products of GPT-2 124M (QKV, attention out, MLP up with GELU, MLP down, LM head) with every
    variant of the registry (F16_TILES; a Hopper worker compiles F16_DEFAULT), and with the default picks at several row counts (first rows of
    the same input). When this fails, such runs agree up to rounding only: a near tie can pick another token."""
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, F16_TILES as TILES
    from gpt2job.backends.cuda.picks import TilePicker
    M = F16_ROW_COUNTS[0]
    A = RNG.standard_normal((M, Kd), dtype=np.float32).astype(np.float16)
    W = (RNG.standard_normal((Kd, N), dtype=np.float32) / np.float32(math.sqrt(Kd))).astype(np.float16)
    bias = None if N > 16384 else gpu(RNG.standard_normal(N, dtype=np.float32))
    resid = RNG.standard_normal((M, N), dtype=np.float32) if mode == 3 else None
    odt = np.float16 if out_half else np.float32
    gA, gW = gpu(A), gpu(np.ascontiguousarray(W.T))

    def product(m, variant):
        if mode == 3:
            Cg = gpu(resid[:m])
        else:   # poisoned with NaN on the device (an LM head output is 1.6 GB)
            Cg = drv.mem_alloc(m * N * np.dtype(odt).itemsize)
            if out_half:
                drv.memset_d16(Cg, 0x7E00, m * N)
            else:
                drv.memset_d32(Cg, 0x7FC00000, m * N)
        K.gemm_f16(None, gA, Kd, gW, Kd, Cg, N, bias, m, N, Kd, mode, out_half, variant=variant)
        out = back(Cg, (m, N), odt)
        Cg.free()
        return out

    variants = list(K.f16_variants)   # every variant of the registry (K compiles them all), the defaults first
    variants.sort(key=lambda v: v not in F16_DEFAULT)
    base = product(M, variants[0])
    assert np.isfinite(base.astype(np.float32)).all()
    differ = {}
    for v in variants[1:]:
        o = product(M, v)
        if not np.array_equal(o, base):
            differ[v] = int((o != base).sum())
    picker = TilePicker(TILES, F16_DEFAULT, K.n_sm, KernelOptions())
    for m in F16_ROW_COUNTS[1:]:
        v = picker.pick_f16(m, N, out_half, Kd)
        o = product(m, v)
        if not np.array_equal(o, base[:m]):
            differ[f"{m} rows ({v})"] = int((o != base[:m]).sum())
    print(f"{N}x{Kd} mode {mode} {'half' if out_half else 'float'}: picks "
          + ", ".join(f"{m}:{picker.pick_f16(m, N, out_half, Kd)}" for m in F16_ROW_COUNTS))
    assert not differ, f"elements differing from {variants[0]} at {M} rows: {differ}"


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("C", [768, 18])
def test_kv_copy(K, half, C):
    """Shared-prefix key/value rows: the kv_copy kernel against reference.kv_copy (16-byte and element paths)."""
    dt = np.float16 if half else np.float32
    nsl, S, slot_base = 6, 9, 4
    kc = RNG.standard_normal((nsl, S, C), dtype=np.float32).astype(dt)
    vc = RNG.standard_normal((nsl, S, C), dtype=np.float32).astype(dt)
    pairs = [(d, p) for d in range(2, nsl) for p in range(S) if RNG.random() < 0.5]     # destinations: slots 2..5
    ent = np.array([[d + slot_base, int(RNG.integers(0, 2)) + slot_base, p] for d, p in pairs], np.int32)
    gk, gv = gpu(kc), gpu(vc)
    K.kv_copy(None, half, gpu(ent), len(ent), slot_base, gk, gv, S, C)
    rk, rv = reference.kv_copy(kc, vc, ent, slot_base)
    np.testing.assert_array_equal(back(gk, (nsl, S, C), dt), rk)
    np.testing.assert_array_equal(back(gv, (nsl, S, C), dt), rv)


@pytest.mark.parametrize("width,src_ld,dst_ld", [(384, 1152, 1152), (768, 768, 768), (1, 1, 1), (5, 7, 6)])
def test_take_rows(K, width, src_ld, dst_ld):
    """The last layer's rows: take_rows against reference.take_rows, picked by index (with a base) and in order;
    the words between rows (strides wider than the row) stay as they were."""
    R, n, base = 50, 17, 30
    src = RNG.integers(0, 2 ** 32, (R, src_ld), dtype=np.uint32)
    idx = np.sort(RNG.choice(R, n, replace=False)).astype(np.int32) + base
    for ix in (idx, None):
        out = gpu(np.full((n, dst_ld), 7, np.uint32))
        K.take_rows(None, None if ix is None else gpu(ix), base, gpu(src), src_ld, out, dst_ld, width, n)
        got = back(out, (n, dst_ld), np.uint32)
        want = reference.take_rows(src[:, :width] if ix is not None else src[:n, :width], ix, base)
        np.testing.assert_array_equal(got[:, :width], want)
        assert (got[:, width:] == 7).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("share", [False, True])
def test_last_layer_on_the_head_rows_alone(dtype, share):
    """Model.forward with heads (the last layer past its keys and values on each prompt's last row only) gives
    those rows' residual stream as the full pass does (fp32: bit for bit; fp16: within rounding, 2e-5 at most on
    the GPU machine, 7% of the values equal) and the same keys and values: several prefill passes, shared prefixes,
    one-token prompts; head size 64 (fp16: the prefill attention kernel on the full pass, the per-row one on the
    head rows). The caches are NaN before each run. Every pass compacts here but one of only head rows (share off),
    which runs in full (as one with (fp16) more than 0.8 of its rows head rows would: the count checked allows it)."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(8, n_layer=3, n_head=1)
    prompts = stem_prompts(40, 1000, seed=3) + [np.array([5]), np.array([9]), np.array([11])]
    lens = np.array([len(p) for p in prompts])
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum(lens)
    chunk = Chunk(0, np.arange(len(prompts)), offsets, np.concatenate(prompts).astype(np.int32))
    be = CudaBackend(params, GenerationSettings(max_new_tokens=1), dtype=dtype, max_prefill_rows=90,
                     options=KernelOptions(prefix_share=share))
    try:
        runner, C = be.runner, params.config.n_embd
        plan = runner.prepare(chunk, be.settings, share)
        lay = plan.layout
        be.device.compute.wait_for_event(plan.ev_up[1])
        S = int(lay.lens.max())
        got, expect, compacted = {}, 0, 0
        assert (plan.shared_tokens > 0) == share
        for heads in (False, True):
            kv = runner.kv_cache(lay.B, S)
            be.device.compute.synchronize()
            drv.memset_d8(kv[0][0], 0xFF, 2 * len(kv) * lay.B * S * C * be.model.elt)   # NaN in fp16 and fp32
            rows, caches = [], []
            for pb0, pb1, r0, x, (ridx, base) in runner.prefill(plan, 0, lay.B, S, kv, heads=heads):
                n, R = pb1 - pb0, int(lay.offsets[pb1]) - r0
                xs = back(x, (R, C), np.float32)
                rows.append(xs[:n] if ridx is None else xs[np.asarray(lay.offsets[pb0 + 1:pb1 + 1]) - 1 - r0])
                expect += heads and n < R and (dtype == "float32" or 5 * n <= 4 * R)
                compacted += heads and ridx is None
            caches = [back(k, (lay.B, S, C), np.float16 if dtype == "float16" else np.float32) for k in kv[-1]]
            got[heads] = np.concatenate(rows), caches
        runner.done_with(plan)
        assert compacted == expect >= 3
        if dtype == "float32":
            np.testing.assert_array_equal(got[True][0], got[False][0])
        else:
            a, b = got[True][0], got[False][0]
            print(f"fp16: {(a == b).mean():.4f} of the values equal, largest difference {np.abs(a - b).max():.3g}")
            assert rel(a, b) < 1e-3
        for a, b in zip(got[True][1], got[False][1]):
            np.testing.assert_array_equal(a, b)
    finally:
        be.close()


def stem_prompts(n, vocab, seed=0):
    """Prompts built from a few shared stems plus random tails: repeats, and prompts that prefix others."""
    rng = np.random.default_rng(seed)
    stems = [rng.integers(0, vocab, rng.integers(3, 20)) for _ in range(4)]
    out = []
    for i in range(n):
        if i % 9 == 4:
            out.append(out[-1].copy())
        elif i % 9 == 7:
            out.append(out[-1][:max(1, len(out[-1]) // 2)].copy())
        else:
            out.append(np.concatenate([stems[i % 4], rng.integers(0, vocab, rng.integers(0, 12))]))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("small", [False, True])
def test_backend_shared_prefixes_match_full_prefill(dtype, small):
    """Prompts with shared prefixes: computing each prefix once (the default) gives the tokens of computing every
    prompt in full (fp32: identical, and = NumPy; fp16: nearly all), with several KV groups and prefill passes."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(6)
    gs = GenerationSettings(max_new_tokens=5, ignore_eos=True)
    prompts = stem_prompts(45, 1000, seed=1)
    lens = np.array([len(p) for p in prompts])
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum(lens)
    chunk = Chunk(3, np.arange(100, 100 + len(prompts)), offsets, np.concatenate(prompts).astype(np.int32))
    got, shared = {}, {}
    for share in (False, True):
        be = CudaBackend(params, gs, dtype=dtype, options=KernelOptions(prefix_share=share),
                         **(dict(max_prefill_rows=60) if small else {}))
        try:
            if small:   # groups of about 8 prompts
                be.runner.kv_budget = 8 * (int(lens.max()) + 5) * be.model.kv_bytes_per_position()
            got[share] = compute(be, chunk)
            shared[share] = be.timeline[-1]["shared_prefix_tokens"]
        finally:
            be.close()
    assert shared[False] == 0 and shared[True] > 0.2 * lens.sum()
    assert np.array_equal(got[True].rows, chunk.rows)
    if dtype == "float32":
        assert_same(got[True], got[False])
        assert_same(got[True], compute(NumpyBackend(params, gs), chunk))
    else:
        assert (got[True].tokens == got[False].tokens).mean() >= 0.97


def test_backend_shared_prefixes_keep_each_rows_sampling_seed():
    """Sampling with shared prefixes: the prompts run in the plan's order, yet each row draws with its own row's
    seed: same tokens as the NumPy backend."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(7)
    gs = GenerationSettings(max_new_tokens=5, ignore_eos=True, sampling=SamplingSettings(0.9, 20, 0.9, 11))
    prompts = stem_prompts(30, 1000, seed=2)
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    chunk = Chunk(0, np.arange(7, 7 + len(prompts)), offsets, np.concatenate(prompts).astype(np.int32))
    be = CudaBackend(params, gs, dtype="float32")
    try:
        got = compute(be, chunk)
        assert be.timeline[-1]["shared_prefix_tokens"] > 0
    finally:
        be.close()
    assert_same(got, compute(NumpyBackend(params, gs), chunk))


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_backend_float16_fused_argmax_head_equals_logits_argmax(vocab):
    """Greedy fp16: the LM head with the (max, argmax) epilogue (the default) gives exactly the tokens of the LM head
    writing logits + the argmax kernel (GPT2JOB_FUSE_ARGMAX=0), over several head groups (head_rows=3)."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(5, vocab_size=vocab)
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=True)
    chunk = make_chunk(LENS, vocab, seed=7)
    toks = {}
    for fuse in (False, True):
        be = CudaBackend(params, gs, dtype="float16", head_rows=3, options=KernelOptions(fuse_argmax=fuse))
        try:
            assert (be.model.p.argmax_tile(3, vocab, params.config.n_embd) is not None) == fuse
            toks[fuse] = compute(be, chunk).tokens
        finally:
            be.close()
    np.testing.assert_array_equal(toks[True], toks[False])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_last_logits_match_reference_prefill(dtype):
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(4)
    prompts = [np.random.default_rng(i).integers(0, 1000, n).astype(np.int32) for i, n in enumerate(LENS)]
    _, _, ref = reference.prefill(params, prompts, max(LENS))
    be = CudaBackend(params, GenerationSettings(max_new_tokens=1), dtype=dtype, head_rows=4)
    try:
        got = be.last_logits(prompts)
        again = be.last_logits(prompts[3:5])
    finally:
        be.close()
    assert got.shape == (len(LENS), 1000) and got.dtype == np.float32
    assert np.isfinite(got).all()
    assert rel(got, ref) < (1e-5 if dtype == "float32" else 3e-3)
    assert rel(again, got[3:5]) < 1e-6


def test_backend_float16_prefill_attention_kernel():
    """fp16 with head size 64: the tensor-core prefill attention against GPT2JOB_PREFILL_ATTN=0 (the per-row kernel)
    and the reference, in last_logits and generate; small prefill passes start mid-chunk."""
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.model.weights import random_params
    params = random_params(GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=1000), 6)
    params.wte *= 10
    lens = [1, 15, 16, 17, 33, 40, 5, 2]
    prompts = [np.random.default_rng(i).integers(0, 1000, n).astype(np.int32) for i, n in enumerate(lens)]
    _, _, ref = reference.prefill(params, prompts, max(lens))
    gs = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    chunk = make_chunk(lens, 1000, seed=7)
    res = {}
    for flag in (True, False):
        be = CudaBackend(params, gs, dtype="float16", max_prefill_rows=40, head_rows=3,
                         options=KernelOptions(prefill_attn=flag))
        try:
            assert be.model.prefill_attn == flag
            res[flag] = (be.last_logits(prompts), compute(be, chunk))
        finally:
            be.close()
    (lg_on, out_on), (lg_off, out_off) = res[True], res[False]
    assert np.isfinite(lg_on).all()
    assert rel(lg_on, ref) < 3e-3 and rel(lg_on, lg_off) < 3e-3
    first_on = np.array([out_on.row_tokens(i)[0] for i in range(len(lens))])
    first_off = np.array([out_off.row_tokens(i)[0] for i in range(len(lens))])
    assert (first_on == first_off).mean() >= 0.85


def test_too_many_ranks_is_user_error():
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.errors import UserError
    with pytest.raises(UserError, match="only"):
        CudaBackend(tiny_params(), GenerationSettings(), gpu_slot=_NGPU)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_steps_replayed_as_cuda_graphs_give_the_same_tokens(dtype):
    """options.cuda_graphs: decode steps are captured once per (rows, buffers) and replayed. Chunks of equal
    prompts (one row count: captured, then replayed, and replayed again by the next chunk of that shape) and of
    ragged prompts (another row count and cache shape) give the tokens of the steps launched one by one: greedy,
    sampled (the step's number read from the GPU) and with per-row settings and a repetition penalty; and rows that
    leave at every step (per-row max_new_tokens), whose replayed steps compute runner.STEP_ROWS rows (padding rows
    after the live ones: a row that has left, at position 0). The same with the graphs' kernel -> kernel edges
    programmatic (options.graph_pdl; on Hopper each graph has such edges)."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(3)
    params.lm_head = np.random.default_rng(4).standard_normal(params.wte.shape).astype(np.float32) * 0.3
    gs = GenerationSettings(max_new_tokens=12, ignore_eos=True)
    chunks = [make_chunk(np.full(40, 9), 1000, seed=1, chunk_id=0), make_chunk(np.full(40, 9), 1000, seed=2, chunk_id=1),
              make_chunk(RNG.integers(1, 30, 33), 1000, seed=3, chunk_id=2)]
    sampled = dataclasses.replace(gs, sampling=SamplingSettings(temperature=0.8, top_k=20, seed=7))
    rng = np.random.default_rng(5)

    def per_row(c, ragged=False):
        B = len(c.rows)
        return dataclasses.replace(c, params=RowParams.of(
            max_new_tokens=1 + np.arange(B) % 12 if ragged else np.full(B, 12), temperature=np.where(np.arange(B) % 3 == 0, 0.0, 0.9),
            top_k=np.where(np.arange(B) % 2 == 0, 0, 30), top_p=np.where(np.arange(B) % 4 == 1, 0.8, 1.0),
            seed=rng.integers(0, 2 ** 62, B), repetition_penalty=np.where(np.arange(B) % 5 == 0, 1.3, 1.0)))
    cases = {"greedy": (gs, chunks), "sampled": (sampled, chunks), "per-row": (gs, [per_row(c) for c in chunks]),
             "rows leaving": (gs, [per_row(c, ragged=True) for c in chunks])}
    out = {}
    # launched; replayed; replayed with programmatic edges between the kernels (options.graph_pdl, Hopper on)
    for graphs, pdl in ((False, False), (True, False), (True, True)):
        for name, (settings, cs) in cases.items():
            be = CudaBackend(params, settings, dtype=dtype, options=KernelOptions(cuda_graphs=graphs, graph_pdl=pdl))
            try:
                got = [compute(be, c) for c in cs]
                if graphs:   # replays outnumber captures (one capture per key)
                    sg = be.runner.graphs
                    assert 0 < sg.captures < sg.replays, name
                    hopper = be.device.dev.compute_capability()[0] >= 9
                    assert sg.pdl == (pdl and hopper) and all(
                        (g.pdl_edges > 0) == sg.pdl for g in sg.graphs.values()), name
            finally:
                be.close()
            out[graphs, pdl, name] = got
    for name in cases:
        for key in ((True, False), (True, True)):
            for a, b in zip(out[False, False, name], out[(*key, name)]):
                assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets), (name, key)
