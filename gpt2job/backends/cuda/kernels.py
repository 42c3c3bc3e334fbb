"""Compile the kernels of cuda_src/*.cu with PyCUDA and launch them cheaply (prepared calls).

Imported only by gpt2job.backends.cuda.backend and the CUDA tests/benchmarks: it imports pycuda at module level.
Each rank compiles into its own cache directory (~/.cache/gpt2job/pycuda/<host>-rank<local_rank>, or
$GPT2JOB_PYCUDA_CACHE/<host>-rank<local_rank>), because PyCUDA's compiler cache is not safe for ranks
sharing a directory.
"""
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pycuda.driver as drv
from pycuda.compiler import compile as nvcc_compile

CUDA_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")

EPI_BIAS, EPI_GELU_TANH, EPI_GELU_ERF, EPI_RESID, EPI_QKV, EPI_ARGMAX = 0, 1, 2, 3, 4, 5

_F16_SIG = "PiPiPiPiiiiPPiiPPi"
# fp16 GEMM tile variants of cuda_src/gemm_f16.cu: name -> (GEMM_F16_PART, BM, BN, threads, dynamic smem bytes).
# "v0" is the original 128x128x32 3-stage kernel (static shared memory, no EPI_QKV).
F16_VARIANTS = {
    "v0": (0, 128, 128, 256, 0),
    "t128x128k32s4": (1, 128, 128, 256, (128 + 128) * 32 * 2 * 4),
    "t128x256k32s4": (2, 128, 256, 256, (128 + 256) * 32 * 2 * 4),
    "t128x256k64s3": (3, 128, 256, 256, (128 + 256) * 64 * 2 * 3),
    "t256x128k64s3": (4, 256, 128, 256, (256 + 128) * 64 * 2 * 3),
    "t128x128k64s3": (5, 128, 128, 256, (128 + 128) * 64 * 2 * 3),
    "t64x128k64s4": (6, 64, 128, 256, (64 + 128) * 64 * 2 * 4),
    # cuda_src/gemm_wgmma.cu (sm_90a only): 128x128x64, 2 warpgroups of wgmma m64n128k16, 3 stages (+1 KB align)
    "wgmma": (-1, 128, 128, 256, (128 + 128) * 64 * 2 * 3 + 1024),
    # cuda_src/gemm_tma.cu (sm_90a only): 128xBNx64 tiles loaded by TMA, mbarrier pipeline, 2 consumer warpgroups
    # of wgmma m64nBNk16 + 1 producer warp; smem: stages x (A + B tile) + 1 KB alignment + barriers
    "tma128": (-2, 128, 128, 288, 3 * (128 + 128) * 64 * 2 + 1024 + 64),
    "tma192": (-2, 128, 192, 288, 4 * (128 + 192) * 64 * 2 + 1024 + 64),
    "tma256": (-2, 128, 256, 288, 4 * (128 + 256) * 64 * 2 + 1024 + 64),
    # the same three as persistent grids (as many blocks as fit; each block loops over tiles, loading the next
    # tile during the epilogue). Not picked for the layer products unless GPT2JOB_TMA_PERSISTENT=1 (measured on H100,
    # 2026-11-27: W1 fp16 386k vs 395k tok/s with every TMA pick persistent; tma192p for the narrow products alone:
    # no gain in decode, prefill attention-out 12.4 vs 9.2 ms per chunk). tma192p runs the greedy LM head
    # (pick_argmax: M tiles fastest there; 631 TFLOP/s vs 292 on the mma.sync tiles, stop 10).
    "tma128p": (-2, 128, 128, 288, 3 * (128 + 128) * 64 * 2 + 1024 + 64),
    "tma192p": (-2, 128, 192, 288, 4 * (128 + 192) * 64 * 2 + 1024 + 64),
    "tma256p": (-2, 128, 256, 288, 4 * (128 + 256) * 64 * 2 + 1024 + 64),
}
# persistent with the staged epilogue (shared memory + bulk copies; EPI_RESID as a bulk add in L2): name ->
# (BN, stages with half output, stages with float output); shared memory per output type: f16_smem()
TMA_STAGED = {"tma128s": (128, 5, 4), "tma192s": (192, 4, 3), "tma256s": (256, 3, 2)}


def f16_smem(v, out_half):
    """Dynamic shared memory of fp16 variant v's kernel for this output type: F16_VARIANTS' figure, except for the
    staged variants (stages, staged output rows as in gemm_tma.cu StagedRow, 1 KB alignment, barriers)."""
    if v not in TMA_STAGED:
        return F16_VARIANTS[v][4]
    bn, st_h, st_f = TMA_STAGED[v]
    st = st_h if out_half else st_f
    row = bn * 2 + 16 if out_half else bn * 4 + (0 if bn == 256 else 32)
    return st * (128 + bn) * 64 * 2 + 128 * row + 1024 + 16 * st


for _v, (_bn, _sh, _sf) in TMA_STAGED.items():
    F16_VARIANTS[_v] = (-2, 128, _bn, 288, max(f16_smem(_v, True), f16_smem(_v, False)))
# persistent -> plain twin
TMA_PERSISTENT = {"tma128p": "tma128", "tma192p": "tma192", "tma256p": "tma256",
                  "tma128s": "tma128", "tma192s": "tma192", "tma256s": "tma256"}
# blocks per SM of the TMA variants (their __launch_bounds__) and rough relative speed per block-tile column (from
# the H100 kernel table, K = 3072), for the wave-quantisation model of Kernels.pick_f16
TMA_BLOCKS_PER_SM = {"tma128": 2, "tma192": 1, "tma256": 1, "tma128p": 2, "tma192p": 1, "tma256p": 1,
                     "tma128s": 1, "tma192s": 1, "tma256s": 1}
TMA_EFFICIENCY = {"tma128": 0.9, "tma192": 0.97, "tma256": 1.0}
# warp-tile width WN of each templated variant: EPI_ARGMAX writes one partial per WN columns
F16_WN = {"t128x128k32s4": 32, "t128x256k32s4": 64, "t128x256k64s3": 64, "t256x128k64s3": 64, "t128x128k64s3": 32,
          "t64x128k64s4": 32, "wgmma": 128, "tma128": 128, "tma192": 192, "tma256": 256,
          "tma128p": 128, "tma192p": 192, "tma256p": 256, "tma128s": 128, "tma192s": 192, "tma256s": 256}
# variants compiled by default (GPT2JOB_F16_VARIANTS=all|name,name,... overrides); pick_f16 chooses per product.
# wgmma and TMA need sm_90 (Hopper).
F16_DEFAULT = ("tma128", "tma192", "tma256", "tma128s", "tma192s", "tma192p", "wgmma", "t128x128k64s3")
F16_DEFAULT_NOT_HOPPER = ("t128x128k64s3",)

# name -> (file, PyCUDA prepare signature)
KERNELS = {
    "gemm_f32": ("gemm_f32.cu", "PiPiPiPiiiiiiiiPPPiiPPi"),
    "gemm_f32_k16": ("gemm_f32.cu", "PiPiPiPiiiiiiiiPPPiiPPi"),
    "splitk_reduce_f32": ("gemm_f32.cu", "PiPiPiii"),
    "embed": ("transformer.cu", "PPPPPii"),
    "layernorm_f32": ("transformer.cu", "PPiPPPiif"),
    "layernorm_f16": ("transformer.cu", "PPiPPPiif"),
    "kv_store_f32": ("transformer.cu", "PPiPPPiii"),
    "kv_store_f16": ("transformer.cu", "PPiPPPiii"),
    "kv_copy_f32": ("transformer.cu", "PiiPPii"),
    "kv_copy_f16": ("transformer.cu", "PiiPPii"),
    "attention_f32": ("transformer.cu", "PPPPiPPiiiif"),
    "attention_f16": ("transformer.cu", "PPPPiPPiiiif"),
    "attention_grouped_f32": ("transformer.cu", "PPPPiPPiiiif"),
    "attention_grouped_f16": ("transformer.cu", "PPPPiPPiiiif"),
    "attention_prefill_f16": ("attention_prefill.cu", "PPPPiPPPiiiif"),
    "argmax_partials": ("sampling.cu", "PiiPi"),
    "gather_tokens": ("sampling.cu", "PPPi"),
    "transpose_to_half": ("transformer.cu", "PPii"),
    "argmax_rows": ("sampling.cu", "PiiPi"),
    "sample_rows": ("sampling.cu", "PiiPPiQdidPi"),
}


def variant_module(v):
    """The compile job holding fp16 variant v: (module key, file, nvcc defines, arch). Each TMA variant is a
    module of its own so that they compile in parallel (all in one module took ~25 s of nvcc)."""
    part, _bm, bn, _thr, _smem = F16_VARIANTS[v]
    if part == -1:
        return ("gemm_wgmma.cu", "gemm_wgmma.cu", (), "sm_90a")
    if part == -2:
        return ("gemm_tma.cu#" + v, "gemm_tma.cu",
                ("-DGEMM_TMA_BN=%d" % bn, "-DGEMM_TMA_PERSIST=%d" % (2 if v in TMA_STAGED else v in TMA_PERSISTENT)),
                "sm_90a")
    return ("gemm_f16.cu#" + v, "gemm_f16.cu", ("-DGEMM_F16_PART=%d" % part,), "sm_90")


def cache_dir(local_rank=0):
    root = os.environ.get("GPT2JOB_PYCUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2job",
                                                                   "pycuda")
    d = os.path.join(root, f"{socket.gethostname()}-rank{local_rank}")
    os.makedirs(d, exist_ok=True)
    return d


def ptr(a):
    """Device pointer (int) of a DeviceAllocation, a GPUArray, an int, or None (-> 0)."""
    if a is None:
        return 0
    if isinstance(a, int):
        return a
    if hasattr(a, "gpudata"):
        return int(a.gpudata)
    return int(a)


class Kernels:
    """All kernels compiled for the current context; k.<name>(grid, block, stream, *args)."""

    def __init__(self, local_rank=0, f16_variants=None):
        cdir = cache_dir(local_rank)
        if f16_variants is None:
            env = os.environ.get("GPT2JOB_F16_VARIANTS", "")
            hopper = drv.Context.get_device().compute_capability() == (9, 0)
            f16_variants = (tuple(F16_VARIANTS) if env == "all" else
                            tuple(v for v in env.split(",") if v) or
                            (F16_DEFAULT if hopper else F16_DEFAULT_NOT_HOPPER))
        for v in f16_variants:
            if v not in F16_VARIANTS:
                raise ValueError(f"unknown fp16 GEMM variant {v!r}")
        self.f16_variants = tuple(f16_variants)
        jobs = [(fname, fname, (), "sm_90") for fname in sorted({f for f, _ in KERNELS.values()})]
        for v in self.f16_variants:
            job = variant_module(v)
            if job not in jobs:
                jobs.append(job)

        def build(job):   # nvcc in parallel threads (no context needed); modules load in this thread
            key, fname, defs, arch = job
            with open(os.path.join(CUDA_SRC, fname)) as fh:
                src = fh.read()
            return key, nvcc_compile(src, no_extern_c=True, arch=arch, options=["-std=c++17", *defs],
                                     include_dirs=[CUDA_SRC], cache_dir=cdir)

        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as ex:
            cubins = list(ex.map(build, jobs))
        mods = {key: drv.module_from_buffer(cubin) for key, cubin in cubins}
        self.modules = mods
        self.funcs = {}
        for name, (fname, sig) in KERNELS.items():
            f = mods[fname].get_function(name)
            f.prepare(sig)
            self.funcs[name] = f
        for v in self.f16_variants:
            part = F16_VARIANTS[v][0]
            base = "gemm_f16" if v == "v0" else "gemm_f16_" + v
            for suf in ("outh", "outf"):
                f = mods[variant_module(v)[0]].get_function(f"{base}_{suf}")
                smem = f16_smem(v, suf == "outh")
                if smem > 48 * 1024:
                    f.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                # TMA kernels take pointers to the A and B descriptors in front
                f.prepare("PiPiPiPiiii" if v == "v0" else ("PP" if part == -2 else "") + _F16_SIG)
                self.funcs[f"{base}_{suf}"] = f
        self.argmax_variant = next((v for v in self.f16_variants if v in F16_WN), None)
        # the greedy LM head's variant (GPT2JOB_ARGMAX_VARIANT=name forces one; see pick_argmax)
        self.argmax_forced = os.environ.get("GPT2JOB_ARGMAX_VARIANT", "")
        if self.argmax_forced and (self.argmax_forced not in self.f16_variants or self.argmax_forced not in F16_WN):
            raise ValueError(f"GPT2JOB_ARGMAX_VARIANT={self.argmax_forced}: not a compiled fp16 variant with the "
                             f"argmax epilogue (compiled: {', '.join(v for v in self.f16_variants if v in F16_WN)})")
        # fp32 product: k-slices of 16 per stage except for decode-sized products with a long K (measured on H100:
        # 16 is 2-7% faster elsewhere, 20% slower there); identical results. GPT2JOB_F32_BK=8|16 forces one.
        self.f32_bk = os.environ.get("GPT2JOB_F32_BK", "")
        self.f32_gemm = None   # benchmarks may set a kernel name
        self.n_sm = drv.Context.get_device().get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        # pick_f16 takes the persistent twin of a TMA variant where it is compiled (experimental)
        self.tma_persistent = os.environ.get("GPT2JOB_TMA_PERSISTENT", "0") == "1"
        # pick_f16 takes the staged-epilogue variants where they are compiled (GPT2JOB_TMA_STAGED=0: never)
        self.tma_staged = os.environ.get("GPT2JOB_TMA_STAGED", "1") != "0"
        self.tmaps = None
        if any(F16_VARIANTS[v][0] == -2 for v in self.f16_variants):
            from gpt2job.backends.cuda.tensor_maps import TensorMapCache
            self.tmaps = TensorMapCache(drv)

    def pick_f16(self, M, N, out_half=True, K=768):
        """Tile variant for an M x N x K product, by what measured fastest on H100 (benchmarks/RESULTS.md, kernel
        tables of 2026-11-27). From 8,192 rows, the staged-epilogue kernels (stop 9, see below; GPT2JOB_TMA_STAGED=0
        turns them off). Otherwise (stop 8): wide float outputs (the LM head) on the mma.sync 128x128 tiles (234
        TFLOP/s vs 165-197 for wgmma/TMA); K >= 2048 on the TMA tiles chosen by the wave model (tma192 403 at
        M=8192, tma256 522 at M=131072); otherwise tma128 from 16 waves of 128x128 tiles up (large prefill: 367-376
        vs wgmma 331-356), wgmma from 4 waves, else the mma.sync tiles. Variants not compiled are skipped."""
        vs = self.f16_variants
        if len(vs) == 1:
            return vs[0]
        if self.tma_staged and M >= 8192 and (out_half or N <= 16384):
            # staged epilogue, the picks measured fastest on H100 (benchmarks/RESULTS.md, stop 9): half outputs on
            # 128x192 tiles (qkv 502 / 331 TFLOP/s at M = 131072 / 8192, mlp-up + GELU 348 at 131072) except mlp-up
            # at decode sizes (plain tma128, 251); float outputs (the residual adds) on 128x128 tiles (mlp-down 536
            # / 367) except attention-out at decode sizes (128x192, 196)
            if out_half:
                v = "tma192s" if N < 3072 or M > 16384 else "tma128"
            else:
                v = "tma128s" if K >= 2048 or M > 16384 else "tma192s"
            if v in vs:
                return v
        v = self._pick_f16(M, N, out_half, K, vs)
        if self.tma_persistent and v + "p" in vs:
            return v + "p"
        return v

    def pick_argmax(self, M, N, K=768):
        """Tile variant for the greedy LM head (the product with the (max, argmax) epilogue). A persistent TMA
        kernel where compiled: it walks the M tiles fastest, so the vocabulary matrix (larger than the L2) is read
        from memory once, not once per 128 rows. Else the plain product's pick, when that has the epilogue."""
        vs = self.f16_variants
        if self.argmax_forced:
            return self.argmax_forced
        for v in ("tma192p", "tma192s", "tma128s", "tma128p"):   # measured: 631, 591, 567 TFLOP/s (M = 8,192)
            if v in vs:
                return v
        v = self.pick_f16(M, N, False, K)
        return v if v in F16_WN else self.argmax_variant

    def _pick_f16(self, M, N, out_half, K, vs):
        # an mma.sync variant (runs anywhere): the measured best one, else the first compiled
        mma = "t128x128k64s3" if "t128x128k64s3" in vs else next((v for v in vs if F16_VARIANTS[v][0] >= 0), None)
        tma = [v for v in vs if v in TMA_BLOCKS_PER_SM and v not in TMA_PERSISTENT]
        if not out_half and N > 16384 and mma is not None:
            return mma
        waves128 = ((M + 127) // 128) * ((N + 127) // 128) / (4 * self.n_sm)   # in units of 4 waves

        def cost(v):   # whole waves of blocks x per-block work / speed
            bn, per_sm = F16_VARIANTS[v][2], TMA_BLOCKS_PER_SM[v]
            tiles = ((M + 127) // 128) * ((N + bn - 1) // bn)
            waves = (tiles + self.n_sm * per_sm - 1) // (self.n_sm * per_sm)
            return waves * bn * per_sm / TMA_EFFICIENCY[v]

        deep = [v for v in tma if v != "tma128"]
        if K >= 2048 and deep:
            return min(deep, key=cost)
        if waves128 >= 4 and "tma128" in vs:
            return "tma128"
        if waves128 >= 1 and "wgmma" in vs:
            return "wgmma"
        if mma is not None:
            return mma
        return min(tma, key=cost) if tma else vs[0]

    def launch(self, name, grid, block, stream, *args):
        args = [ptr(a) if not isinstance(a, (int, float, np.integer, np.floating)) else a for a in args]
        self.funcs[name].prepared_async_call(grid, block, stream, *args)

    # ---------------------------------------------------------------- typed helpers

    def gemm_f32(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode, split=None, ws=None, qkv=None):
        """split: K slices (None: automatic, > 1 when the 128x128 tiles fill under two waves of the GPU and K is
        large); split > 1 needs ws, a float workspace of split * M * N.
        mode EPI_QKV: qkv = (row_slot, row_pos, slot_base, S, kc, vc, C), as gemm_f16 (never split)."""
        if M == 0:
            return
        if mode == EPI_QKV:
            assert qkv is not None
            split = 1
            rs, rp, sb, S, kc, vc, kvC = qkv
        else:
            rs = rp = kc = vc = 0
            sb = S = kvC = 0
        tiles = ((N + 127) // 128) * ((M + 127) // 128)
        if split is None:
            split = 1
            if ws is not None and K >= 512 and 132 <= tiles < 2 * 2 * 132:
                split = 2 if tiles >= 2 * 132 else 4
        kps = K
        if split > 1:
            kps = ((K + split - 1) // split + 7) // 8 * 8
            split = (K + kps - 1) // kps
        vec_a = int(lda % 4 == 0 and ptr(A) % 16 == 0)
        vec_b = int(ldb % 4 == 0 and ptr(B) % 16 == 0)
        vec_c = int(ldc % 4 == 0 and ptr(C) % 16 == 0)
        grid = ((N + 127) // 128, (M + 127) // 128, split)
        name = self.f32_gemm
        if name is None:
            k16 = (K < 2048 or M > 16384) if not self.f32_bk else self.f32_bk == "16"
            name = "gemm_f32_k16" if k16 else "gemm_f32"
        self.launch(name, grid, (256, 1, 1), stream, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias),
                    M, N, K, mode, vec_a, vec_b, vec_c, kps, ptr(ws) if split > 1 else 0, ptr(rs), ptr(rp), int(sb),
                    int(S), ptr(kc), ptr(vc), int(kvC))
        if split > 1:
            n = M * N
            self.launch("splitk_reduce_f32", ((n + 255) // 256, 1, 1), (256, 1, 1), stream, ptr(ws), split, ptr(C),
                        ldc, ptr(bias), M, N, mode)

    def gemm_f16(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode, out_half, variant=None, qkv=None):
        """B is [N, K] (K-contiguous). Needs K, lda, ldb multiples of 8 and 16-byte aligned A, B.
        mode EPI_QKV (out_half, not variant v0): qkv = (row_slot, row_pos, slot_base, S, kc, vc, C): columns
        [C, 3C) go to the KV cache instead of the output.
        mode EPI_ARGMAX (float out, variant in F16_WN): C gets float2 [M, ldc] partials (max, column) per
        F16_WN[variant] columns, ldc >= ceil(N / F16_WN[variant]); reduce them with argmax_partials."""
        if M == 0:
            return
        assert K % 8 == 0 and lda % 8 == 0 and ldb % 8 == 0 and ptr(A) % 16 == 0 and ptr(B) % 16 == 0
        v = variant or self.pick_f16(M, N, out_half, K)
        part, bm, bn, thr, _ = F16_VARIANTS[v]
        smem = f16_smem(v, out_half)
        grid = ((N + bn - 1) // bn, (M + bm - 1) // bm, 1)
        if v in TMA_PERSISTENT:   # as many blocks as fit at once, each looping over tiles
            grid = (min(grid[0] * grid[1], self.n_sm * TMA_BLOCKS_PER_SM[v]), 1, 1)
        suf = "outh" if out_half else "outf"
        if mode == EPI_ARGMAX:
            assert not out_half and v in F16_WN and ldc >= (N + F16_WN[v] - 1) // F16_WN[v]
        if v == "v0":
            assert mode not in (EPI_QKV, EPI_ARGMAX)
            self.funcs["gemm_f16_" + suf].prepared_async_call(grid, (256, 1, 1), stream, ptr(A), lda, ptr(B), ldb,
                                                             ptr(C), ldc, ptr(bias), M, N, K, mode)
            return
        if mode == EPI_QKV:
            assert out_half and qkv is not None and qkv[6] % 2 == 0
            rs, rp, sb, S, kc, vc, kvC = qkv
        else:
            rs = rp = kc = vc = 0
            sb = S = kvC = 0
        tm = ()
        if part == -2:
            tm = (self.tmaps.get(stream, ptr(A), M, K, lda, bm), self.tmaps.get(stream, ptr(B), N, K, ldb, bn))
        self.funcs[f"gemm_f16_{v}_{suf}"].prepared_async_call(
            grid, (thr, 1, 1), stream, *tm, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias), M, N, K, mode,
            ptr(rs), ptr(rp), int(sb), int(S), ptr(kc), ptr(vc), int(kvC), shared_size=smem)

    def embed(self, stream, tok, pos, wte, wpe, x, R, C):
        if R:
            self.launch("embed", (R, 1, 1), (256, 1, 1), stream, tok, pos, wte, wpe, x, R, C)

    def layernorm(self, stream, half, x, rowidx, idx_base, w, b, out, R, C, eps):
        if R:
            self.launch("layernorm_f16" if half else "layernorm_f32", ((R + 7) // 8, 1, 1), (256, 1, 1), stream,
                        x, rowidx, idx_base, w, b, out, R, C, np.float32(eps))

    def kv_store(self, stream, half, qkv, row_slot, slot_base, row_pos, kc, vc, R, C, S):
        if R:
            self.launch("kv_store_f16" if half else "kv_store_f32", (R, 1, 1), (256, 1, 1), stream,
                        qkv, row_slot, slot_base, row_pos, kc, vc, R, C, S)

    def kv_copy(self, stream, half, ent, n, slot_base, kc, vc, S, C):
        """Shared-prefix key/value rows: ent int32 [n, 3] {dst, src, pos} (see gpt2job.backends.cuda.prefix_share)."""
        if n:
            self.launch("kv_copy_f16" if half else "kv_copy_f32", (n, 1, 1), (128, 1, 1), stream, ent, n, slot_base,
                        kc, vc, S, C)

    def attention(self, stream, half, qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale,
                  grouped=None):
        """grouped (default: when D in 8, 16, 32, 64, 128): the lane-group kernel, else the lane-per-key one."""
        if R:
            assert D <= 128
            if grouped is None:
                grouped = D in (8, 16, 32, 64, 128)
            assert not grouped or D in (8, 16, 32, 64, 128)
            nw = R * H
            name = ("attention_grouped_" if grouped else "attention_") + ("f16" if half else "f32")
            self.launch(name, ((nw + 3) // 4, 1, 1), (128, 1, 1), stream,
                        qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, np.float32(scale))

    def attention_prefill(self, stream, qkv, kc, vc, row_slot, slot_base, row_pos, out, tiles, n_tiles, row_base,
                          H, D, S, scale):
        """Tensor-core causal attention (fp16, D == 64) of the rows covered by tiles: int32 [n_tiles, 2] pairs
        {first_row, n_rows} (8-byte aligned), each 1..16 rows of ONE sequence (one slot), e.g. consecutive tokens
        of a prompt. first_row counts from the chunk's first row; qkv, row_slot, row_pos and out point at the
        pass's first row, which is chunk row row_base. Same results as attention(half=True) on those rows."""
        if n_tiles:
            assert D == 64 and ptr(tiles) % 8 == 0
            nw = n_tiles * H   # one warp per (tile, head), 4 warps per block
            self.launch("attention_prefill_f16", ((nw + 3) // 4, 1, 1), (128, 1, 1), stream, qkv, kc, vc, row_slot,
                        slot_base, row_pos, out, tiles, n_tiles, row_base, H, S, np.float32(scale))

    def gather_tokens(self, stream, src, idx, dst, n):
        """dst[i] = src[idx[i]], int32, i < n."""
        if n:
            self.launch("gather_tokens", ((n + 255) // 256, 1, 1), (256, 1, 1), stream, src, idx, dst, n)

    def argmax_partials(self, stream, part, ld, n, out, R):
        if R:
            self.launch("argmax_partials", ((R + 7) // 8, 1, 1), (256, 1, 1), stream, part, ld, n, out, R)

    def transpose_to_half(self, stream, src, dst, K, N):
        self.launch("transpose_to_half", ((N + 31) // 32, (K + 31) // 32, 1), (32, 8, 1), stream, src, dst, K, N)

    def argmax(self, stream, logits, ld, V, out, R):
        if R:
            self.launch("argmax_rows", (R, 1, 1), (1024, 1, 1), stream, logits, ld, V, out, R)

    def sample(self, stream, logits, ld, V, rows, seqidx, step, seed, temperature, top_k, top_p, out, R):
        if R:
            self.launch("sample_rows", (R, 1, 1), (1024, 1, 1), stream, logits, ld, V, rows, seqidx, np.int32(step),
                        np.uint64(seed & ((1 << 64) - 1)), np.float64(temperature), np.int32(top_k),
                        np.float64(top_p), out, R)
