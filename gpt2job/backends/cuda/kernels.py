"""The kernel registry and the launchers: one record per kernel (registry.register: name, source file, PyCUDA
prepared-call signature, block size) beside the method that launches it, and one record per fp16 product tile
variant (tile shape, threads, shared memory, compile flags, arch). Kernels(options) compiles what the records name,
loads it into the current CUDA context and launches it cheaply (prepared calls).

A signature has one letter per kernel parameter (P pointer, i int, f float, d double, Q unsigned long long), checked
against the preprocessed .cu by tests/test_cuda_host.py. pycuda is imported only when Kernels is built or a module
compiles; the node's kernel cache (kcache.py) compiles each module once per node, `build-kernels` fills it ahead.
"""
from dataclasses import dataclass

import numpy as np

from gpt2job.backends.cuda.kcache import cache_dir, compile_modules
from gpt2job.backends.cuda.kernels_select import SelectKernels
from gpt2job.backends.cuda.registry import KERNELS, register
from gpt2job.backends.cuda.options import ALL_TILES, KernelOptions
from gpt2job.backends.cuda.picks import TilePicker
from gpt2job.errors import UserError

# matrix product epilogues (cuda_src/common.cuh, gemm_f16.cu)
EPI_BIAS, EPI_GELU_TANH, EPI_GELU_ERF, EPI_RESID, EPI_QKV, EPI_ARGMAX, EPI_ARGMAX_LSE, EPI_TEMPERED = range(8)
TMA_WIDE_N = 16384   # gemm_tma.cu's: products wider than this (the LM head) walk M tiles fastest

# ---------------------------------------------------------------- fp16 product tile variants
_F16_SIG = "PiPiPiPiiiiPPiiPPi"   # gemm_f16.cu GEMM_F16_ARGS: A, lda, B, ldb, C, ldc, bias, M, N, K, mode, + EPI_QKV's


@dataclass(frozen=True)
class F16Tile:
    """An fp16 product tile variant: kernels gemm_f16_<name>_outh (half output) and _outf (float output)."""
    name: str
    family: str              # "mma" (mma.sync, gemm_f16.cu), "wgmma" (gemm_wgmma.cu), "tma" (gemm_tma.cu),
                             # "swap" (gemm_swap.cu: the operands swapped, decode-sized products)
    bm: int                  # block tile rows
    bn: int                  # block tile columns
    wn: int                  # warp tile width: EPI_ARGMAX writes one (max, column) partial per wn columns
    threads: int
    smem_half: int           # dynamic shared memory, bytes, of the half-output kernel
    smem_float: int          # ... of the float-output kernel
    defines: tuple           # nvcc -D flags of its module
    arch: str                # sm_90 (mma.sync: any GPU, compiled for its own arch, module_jobs) or sm_90a (Hopper)
    persistent: bool = False   # as many blocks as fit at once, each looping over tiles (TMA "p" and "s" variants)
    blocks_per_sm: int = 0     # TMA: blocks per SM (its __launch_bounds__): the wave model and persistent grids
    efficiency: float = 0.0    # plain TMA: relative speed per tile column (H100 kernel table), for the wave model

    @property
    def source(self):
        return {"mma": "gemm_f16.cu"}.get(self.family, f"gemm_{self.family}.cu")

    def module(self, out_half):
        """The compile job of its kernel of this output type, (module, nvcc -D flags): a module of its own (they compile
        in parallel), the one wgmma kernel pair aside; a TMA tile's two kernels in two (gemm_tma.cu GEMM_OUT_HALF: the
        longest compiles, which a cold node waits for)."""
        if self.family != "tma":
            return (self.source if self.family == "wgmma" else f"{self.source}#{self.name}"), self.defines
        key = f"{self.source}#{self.name}#out{'h' if out_half else 'f'}"
        return key, (*self.defines, f"-DGEMM_OUT_HALF={out_half:d}")

    @property
    def signature(self):
        return ("PP" if self.uses_tma else "") + _F16_SIG

    @property
    def uses_tma(self):   # TMA descriptors of A and B: the kernel's first two arguments
        return self.family in ("tma", "swap")

    def kernel(self, out_half):
        return f"gemm_f16_{self.name}_{'outh' if out_half else 'outf'}"

    def smem(self, out_half):
        return self.smem_half if out_half else self.smem_float


def _mma(name, part, bm, bn, bk, wm, wn, stages):
    smem = (bm + bn) * bk * 2 * stages
    return F16Tile(name, "mma", bm, bn, wn, (bm // wm) * (bn // wn) * 32, smem, smem,
                   ("-DGEMM_F16_PART=%d" % part,), "sm_90")


def _tma(name, bn, stages, blocks, persist, efficiency=0.0):
    smem = stages * (128 + bn) * 64 * 2 + 1024 + 64   # stages x (A + B tile) + 1 KB alignment + barriers
    return F16Tile(name, "tma", 128, bn, bn, 288, smem, smem, ("-DGEMM_TMA_BN=%d" % bn, "-DGEMM_TMA_PERSIST=%d" % persist),
                   "sm_90a", persist > 0, blocks, efficiency)


def _swap(bt, wr):
    """Swapped decode tile (gemm_swap.cu): bt token rows x wr weight rows (output columns) a block, one an SM, as
    many stages of 64-wide k slices as fit (up to 12) beside 1 KB alignment, their barriers and bt KV-cache cells."""
    stage = (wr + bt) * 64 * 2
    stages = min(12, (227 * 1024 - 1024 - 16 * 12 - 4 * bt) // stage)
    smem = stages * stage + 1024 + 16 * stages + 4 * bt
    return F16Tile(f"s{bt}x{wr}", "swap", bt, wr, 16, 288, smem, smem,
                   (f"-DSWAP_NAME=gemm_f16_s{bt}x{wr}", f"-DSWAP_WR={wr}",
                    f"-DSWAP_WN={bt if wr == 128 else bt // 2}", f"-DSWAP_ST={stages}"),
                   "sm_90a", False, 1)


def _staged_smem(bn, stages, out_half, rows=128):
    """Shared memory of a staged-epilogue kernel: stages, `rows` staging rows of the output tile (gemm_tma.cu
    StagedRow), 1 KB alignment, barriers."""
    row = bn * 2 + 16 if out_half else bn * 4 + (0 if bn == 256 else 32)
    return stages * (128 + bn) * 64 * 2 + rows * row + 1024 + 16 * stages


def _staged(name, bn, stages_half, stages_float):
    """Persistent TMA kernel with the staged epilogue: the finished tile goes out through shared memory by bulk
    copies (EPI_RESID as a bulk add in L2)."""
    return F16Tile(name, "tma", 128, bn, bn, 288, _staged_smem(bn, stages_half, True), _staged_smem(bn, stages_float,
                   False), ("-DGEMM_TMA_BN=%d" % bn, "-DGEMM_TMA_PERSIST=2"), "sm_90a", True, 1)


F16_TILES = {t.name: t for t in (
    _mma("t128x128k32s4", 1, 128, 128, 32, 64, 32, 4),
    _mma("t128x256k32s4", 2, 128, 256, 32, 64, 64, 4),
    _mma("t128x256k64s3", 3, 128, 256, 64, 64, 64, 3),
    _mma("t256x128k64s3", 4, 256, 128, 64, 64, 64, 3),
    _mma("t128x128k64s3", 5, 128, 128, 64, 64, 32, 3),
    _mma("t64x128k64s4", 6, 64, 128, 64, 32, 32, 4),
    _mma("t64x64k64s4", 7, 64, 64, 64, 32, 32, 4),
    _mma("t32x64k64s4", 8, 32, 64, 64, 32, 16, 4),
    _mma("t32x32k64s8", 9, 32, 32, 64, 16, 16, 8),
    _mma("t32x32k128s4", 10, 32, 32, 128, 16, 16, 4),
    _mma("t32x64k128s4", 11, 32, 64, 128, 32, 16, 4),
    # 128x128x64, 2 warpgroups of wgmma m64n128k16, 3 cp.async stages (+1 KB alignment)
    F16Tile("wgmma", "wgmma", 128, 128, 128, 256, 99328, 99328, (), "sm_90a"),
    # TMA loads, mbarrier pipeline, 2 consumer warpgroups of wgmma m64nBNk16 + 1 producer warp
    _tma("tma128", 128, 3, 2, 0, 0.9),
    _tma("tma192", 192, 4, 1, 0, 0.97),
    _tma("tma256", 256, 4, 1, 0, 1.0),
    # persistent twins: load the next tile during the epilogue (slower for the layer products; tma192p serves
    # the greedy LM head: it walks the M tiles fastest, so the vocabulary matrix is read once)
    _tma("tma128p", 128, 3, 2, 1),
    _tma("tma192p", 192, 4, 1, 1),
    _tma("tma256p", 256, 4, 1, 1),
    _staged("tma128s", 128, 5, 4),
    _staged("tma192s", 192, 4, 3),
    _staged("tma256s", 256, 3, 2),
    # ping-pong: two consumer warpgroups on alternate 128x128 tiles (gemm_tma.cu gemm_tma_pp_impl); 384 threads,
    # staging rows for each consumer (float outputs: 64 rows at a time)
    F16Tile("tma128pp", "tma", 128, 128, 128, 384, _staged_smem(128, 4, True, 2 * 128),
            _staged_smem(128, 4, False, 2 * 64), ("-DGEMM_TMA_BN=128", "-DGEMM_TMA_PERSIST=4"), "sm_90a", True, 1),
    # swapped decode tiles (gemm_swap.cu): token rows x weight rows, sized to the product by picks.TilePicker.pick_swap
    *(_swap(t, w) for t, w in ((32, 64), (64, 64), (96, 64), (48, 128), (80, 128), (112, 128), (160, 128), (208, 128))),
)}
# compiled unless options.f16_variants names others (picks.TilePicker chooses; tma128s/192s only without tma128pp)
F16_DEFAULT = ("tma128", "tma192", "tma256", "tma192p", "tma128pp", "wgmma", "t128x128k64s3", "t64x128k64s4",
               "t32x64k64s4", "t32x64k128s4", "t32x32k128s4", "s32x64", "s64x64", "s96x64", "s48x128", "s80x128",
               "s112x128", "s160x128", "s208x128")
F16_DEFAULT_NOT_HOPPER = ("t128x128k64s3",)


def choose_variants(options, hopper):
    """The fp16 tile variants to compile: the options' (all, or those named), else the GPU's (hopper(): wgmma, TMA)."""
    variants = tuple(F16_TILES) if options.f16_variants == ALL_TILES else tuple(options.f16_variants)
    variants = variants or (F16_DEFAULT if hopper() else F16_DEFAULT_NOT_HOPPER)
    if unknown := [v for v in variants if v not in F16_TILES]:
        raise UserError(f"unknown fp16 GEMM variant {unknown[0]!r}", None, "GPT2JOB_F16_VARIANTS",
                        "unset it, or name variants of F16_TILES in gpt2job/backends/cuda/kernels.py (or all)")
    return variants


def module_jobs(variants, cc=(9, 0)):
    """The modules to compile, each once: (module, source file, nvcc defines, arch): every source of KERNELS, then the
    tiles'. Those of sm_90 records for the GPU's own arch (compute capability cc): a cubin loads only there."""
    arch = "sm_%d%d" % tuple(cc)
    jobs = [(f, f, (), arch) for f in sorted({k.source for k in KERNELS})]
    for t in (F16_TILES[v] for v in variants):
        for out_half in (True, False):
            key, defines = t.module(out_half)
            job = (key, t.source, defines, arch if t.arch == "sm_90" else t.arch)
            if job not in jobs:
                jobs.append(job)
    return jobs


def ptr(a):
    """Device pointer (int) of a DeviceAllocation, a GPUArray, an int, or None (-> 0)."""
    if a is None or isinstance(a, int):
        return a or 0
    return int(a.gpudata) if hasattr(a, "gpudata") else int(a)


class Kernels(SelectKernels):
    """Every kernel the options ask for, compiled and loaded into the current context; typed launchers."""

    def __init__(self, options=KernelOptions()):
        import pycuda.driver as drv
        self.options = options
        cc = drv.Context.get_device().compute_capability()
        variants = choose_variants(options, lambda: cc == (9, 0))
        self.f16_variants = variants
        self.tiles = [F16_TILES[v] for v in variants]
        cubins, _ = compile_modules(module_jobs(variants, cc), cache_dir())
        mods = {key: drv.module_from_buffer(cubin) for key, cubin in cubins.items()}
        self.funcs = {}
        self._f16 = {}   # (tile, out_half) -> (function, block, shared memory): the launch's lookups at once
        for k in KERNELS:
            f = mods[k.source].get_function(k.name)
            f.prepare(k.signature)
            self.funcs[k.name] = f
        self.setup_row_cache(drv)
        for t in self.tiles:
            for out_half in (True, False):
                f = mods[t.module(out_half)[0]].get_function(t.kernel(out_half))
                if t.smem(out_half) > 48 * 1024:
                    f.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, t.smem(out_half))
                f.prepare(t.signature)
                self.funcs[t.kernel(out_half)] = f
                self._f16[t.name, out_half] = (f, (t.threads, 1, 1), t.smem(out_half))
        forced = options.argmax_variant
        if forced and forced not in variants:
            raise UserError(f"{forced!r} is not a compiled fp16 variant (compiled: {', '.join(variants)})", None,
                            "GPT2JOB_ARGMAX_VARIANT", "unset it, or name one of the compiled variants")
        self.n_sm = drv.Context.get_device().get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        picker = TilePicker(F16_TILES, variants, self.n_sm, options)
        self.pick_f16, self.pick_argmax = picker.pick_f16, picker.pick_argmax
        self.tmaps = None
        if any(t.uses_tma for t in self.tiles):
            from gpt2job.backends.cuda.tensor_maps import TensorMapCache
            self.tmaps = TensorMapCache(drv)

    def launch(self, k, grid, stream, *args, shared=0):
        args = [ptr(a) if not isinstance(a, (int, float, np.integer, np.floating)) else a for a in args]
        self.funcs[k.name].prepared_async_call(grid, k.block, stream, *args, shared_size=shared)

    # ---------------------------------------------------------------- matrix products

    GEMM_F32 = {8: register("gemm_f32", "gemm_f32.cu", "PiPiPiPiiiiiiiiPPPiiPPi", 256),
                16: register("gemm_f32_k16", "gemm_f32.cu", "PiPiPiPiiiiiiiiPPPiiPPi", 256)}
    SPLITK_REDUCE = register("splitk_reduce_f32", "gemm_f32.cu", "PiPiPiii", 256)

    def gemm_f32(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode, split=None, ws=None, qkv=None, bk=None,
                 ws_slices=4):
        """C = epilogue(A[M, K] @ B[K, N] + bias), plain fp32 FMA. split: K slices (None: automatic, see below); split
        > 1 needs ws, a float workspace of split * M * N (automatic: ws_slices * M * N). bk: k-slice per stage, 8 or 16
        (None: options.f32_bk, else 8 where K >= 2048 and M <= 16,384, else 16). mode EPI_QKV: qkv = (row_slot,
        row_pos, slot_base, S, kc, vc, C), as gemm_f16."""
        if M == 0:
            return
        if mode == EPI_QKV:   # (one K slice: the epilogue writes keys and values to the cache)
            split, (rs, rp, sb, S, kc, vc, kvC) = 1, qkv
        else:
            rs = rp = kc = vc = sb = S = kvC = 0
        tiles = ((N + 127) // 128) * ((M + 127) // 128)
        if split is None:   # K >= 512: slices where the tiles fill under two waves (132..527), or under half the SMs
            split = 1       # (<= 66: 4-8, at most a block an SM past 4); W2's 2,048 rows (96) keep one: unchanged bits
            if ws is not None and K >= 512 and (132 <= tiles < 2 * 2 * 132 or 2 * tiles <= 132):
                split = (2 if tiles >= 2 * 132 else 4) if tiles >= 132 else min(8, ws_slices, max(4, 132 // tiles))
        kps = K
        if split > 1:
            kps = ((K + split - 1) // split + 7) // 8 * 8
            split = (K + kps - 1) // kps
        vec_a = int(lda % 4 == 0 and ptr(A) % 16 == 0)
        vec_b = int(ldb % 4 == 0 and ptr(B) % 16 == 0)
        vec_c = int(ldc % 4 == 0 and ptr(C) % 16 == 0)
        grid = ((N + 127) // 128, (M + 127) // 128, split)
        bk = bk or self.options.f32_bk or (16 if K < 2048 or M > 16384 else 8)
        self.launch(self.GEMM_F32[bk], grid, stream, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias),
                    M, N, K, mode, vec_a, vec_b, vec_c, kps, ptr(ws) if split > 1 else 0, ptr(rs), ptr(rp), int(sb),
                    int(S), ptr(kc), ptr(vc), int(kvC))
        if split > 1:
            self.launch(self.SPLITK_REDUCE, ((M * N + 255) // 256, 1, 1), stream, ptr(ws), split, ptr(C), ldc,
                        ptr(bias), M, N, mode)

    def gemm_f16(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode, out_half, variant=None, qkv=None):
        """C = epilogue(A[M, K] @ B[N, K]^T + bias) on tensor cores, fp32 accumulation; B is K-contiguous. Needs K,
        lda, ldb multiples of 8 and 16-byte aligned A, B. variant: the tile (None: pick_f16's, picks.py).
        mode EPI_QKV (out_half): qkv = (row_slot, row_pos, slot_base, S, kc, vc, C): columns [C, 3C) go to the
        KV cache instead of the output.
        mode EPI_ARGMAX (float out): C gets float2 [M, ldc] partials (max, column) per F16_TILES[variant].wn
        columns, ldc >= ceil(N / wn); reduce them with argmax_partials. EPI_ARGMAX_LSE: float4 [M, ldc] partials (max,
        column, the chunk's sum of exp(value - max), 0); reduce them with argmax_partials(..., lp=). EPI_TEMPERED
        (rule 6, wn % 64 == 0): float2 (value, column) per 64 columns, qkv = tempered_keys' [M] int2."""
        if M == 0:
            return
        assert K % 8 == 0 and lda % 8 == 0 and ldb % 8 == 0 and ptr(A) % 16 == 0 and ptr(B) % 16 == 0
        t = F16_TILES[variant or self.pick_f16(M, N, out_half, K)]
        grid = ((N + t.bn - 1) // t.bn, (M + t.bm - 1) // t.bm, 1)
        if t.family == "tma" and not t.persistent and N > TMA_WIDE_N:   # the LM head's logits: M tiles fastest (the
            grid = (grid[1], grid[0], 1)                                # vocabulary is read once; gemm_tma.cu)
        if t.persistent:   # as many blocks as fit at once, each looping over tiles
            grid = (min(grid[0] * grid[1], self.n_sm * t.blocks_per_sm), 1, 1)
        if mode in (EPI_ARGMAX, EPI_ARGMAX_LSE, EPI_TEMPERED, EPI_RESID):   # float outputs (EPI_RESID: residual)
            assert not out_half and (mode == EPI_RESID or ldc >= (N + t.wn - 1) // t.wn)
        if mode == EPI_QKV:
            assert out_half and qkv is not None and qkv[6] % 2 == 0
            rs, rp, sb, S, kc, vc, kvC = qkv
        else:
            rs, rp, kc, vc, sb, S, kvC = (qkv if mode == EPI_TEMPERED else 0), 0, 0, 0, 0, 0, 0
        tm = ()
        if t.uses_tma:
            tm = (self.tmaps.get(stream, ptr(A), M, K, lda, t.bm), self.tmaps.get(stream, ptr(B), N, K, ldb, t.bn))
        f, block, smem = self._f16[t.name, out_half]
        f.prepared_async_call(grid, block, stream, *tm, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias), M, N, K, mode,
                              ptr(rs), ptr(rp), int(sb), int(S), ptr(kc), ptr(vc), int(kvC), shared_size=smem)

    # ---------------------------------------------------------------- per-row kernels (transformer.cu)

    EMBED = register("embed", "transformer.cu", "PPPPPii", 256)

    def embed(self, stream, tok, pos, wte, wpe, x, R, C):
        if R:
            self.launch(self.EMBED, (R, 1, 1), stream, tok, pos, wte, wpe, x, R, C)

    HALF_T = register("half_t", "transformer.cu", "PPii", 256)
    HALF_OF = register("half_of", "transformer.cu", "PPQ", 256)

    def half_t(self, stream, w, out, K, N):
        """out [N, K] half = w [K, N] float32 transposed and rounded (reference.f16_weight)."""
        if K and N:
            self.launch(self.HALF_T, ((N + 31) // 32, (K + 31) // 32, 1), stream, w, out, K, N)

    def half_of(self, stream, a, out, n):
        """out [n] half = a [n] float32 rounded (reference.f16_weight, transpose=False)."""
        if n:
            self.launch(self.HALF_OF, (min((n + 255) // 256, 4096), 1, 1), stream, a, out, int(n))

    LN_ROWS = 8   # rows (warps) a layer-norm block
    LAYERNORM = {(False, False): register("layernorm_f32", "transformer.cu", "PPiPPPiif", 32 * LN_ROWS),
                 (True, False): register("layernorm_f16", "transformer.cu", "PPiPPPiif", 32 * LN_ROWS),
                 (False, True): register("layernorm_prefetch_f32", "transformer.cu", "PPiPPPiif", 32 * LN_ROWS),
                 (True, True): register("layernorm_prefetch_f16", "transformer.cu", "PPiPPPiif", 32 * LN_ROWS)}
    LN_PREFETCH_ROWS = 1024   # up to this many rows (decode steps), the kernel that loads the weights with the row:
                              # faster there; larger passes not measured in whole jobs (benchmarks/RESULTS.md)

    def layernorm(self, stream, half, x, rowidx, idx_base, w, b, out, R, C, eps):
        """out [R, C] = layer norm of x's rows (row i: x row rowidx[i] - idx_base when rowidx is given, else row i),
        reference.layer_norm; the same results from either kernel."""
        if R:
            self.launch(self.LAYERNORM[half, R <= self.LN_PREFETCH_ROWS], (-(-R // self.LN_ROWS), 1, 1), stream, x,
                        rowidx, idx_base, w, b, out, R, C, np.float32(eps))

    KV_COPY = {False: register("kv_copy_f32", "transformer.cu", "PiiPPii", 128),
               True: register("kv_copy_f16", "transformer.cu", "PiiPPii", 128)}

    def kv_copy(self, stream, half, ent, n, slot_base, kc, vc, S, C):
        """Shared-prefix key/value rows: ent int32 [n, 3] {dst, src, pos} (see prefix_share.py)."""
        if n:
            self.launch(self.KV_COPY[half], (n, 1, 1), stream, ent, n, slot_base, kc, vc, S, C)

    TAKE_ROWS = register("take_rows", "transformer.cu", "PiPiPiii", 256)

    def take_rows(self, stream, idx, idx_base, src, src_ld, dst, dst_ld, width, n):
        """dst row i = src row idx[i] - idx_base (idx None: row i), width 4-byte words a row, strides in words."""
        if n:
            self.launch(self.TAKE_ROWS, (n, 1, 1), stream, idx, idx_base, src, src_ld, dst, dst_ld, width, n)

    ATTENTION = {(False, False, 0): register("attention_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (False, True, 0): register("attention_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, False, 1): register("attention_grouped_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 1): register("attention_grouped_f16", "transformer.cu", "PPPPiPPiiiif", 128),  # tests
                 (True, False, 4): register("attention_grouped_long_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 4): register("attention_grouped_long_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 3): register("attention_grouped_three_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 8): register("attention_grouped_short_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 9): register("attention_grouped_ahead_f16", "transformer.cu", "PPPPiPPiiiif", 128)}
    ATTENTION_LONG_FROM = 128   # cache positions S from which the grouped kernel loads 4 key steps ahead, not 1 (fp16:
                                # 3; faster jobs at W2's S of 768, slower at W1's ~24: benchmarks/RESULTS.md)
    ATTENTION_SHORT_WARPS = 16  # fp16: 8 key steps a round while the step's warps fit this many an SM, at any S
    ATTENTION_AHEAD_WARPS = 12  # ... and the next round's in flight while they fit this many (3 blocks an SM)

    def attention(self, stream, half, qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale,
                  grouped=None, keys=None):
        """Causal attention of R rows over the cache, one warp per (row, head). grouped (default: when D in 8, 16, 32,
        64, 128): the lane-group kernel, else the lane-per-key one. keys: its key steps loaded ahead, 1, 3, 4, 8 or 9
        (3, 8, 9: fp16; 9: 8 and the next 8 in flight) (default: by the constants above). Same results."""
        if R:
            grouped = D in (8, 16, 32, 64, 128) if grouped is None else grouped
            assert D <= 128 and (not grouped or D in (8, 16, 32, 64, 128))
            keys = keys if grouped else 0
            nw = R * H
            if grouped and keys is None:
                per_sm = nw / self.n_sm
                keys = 9 if half and per_sm <= self.ATTENTION_AHEAD_WARPS else 8 if half and \
                    per_sm <= self.ATTENTION_SHORT_WARPS else 4 if S >= self.ATTENTION_LONG_FROM else 3 if half else 1
            self.launch(self.ATTENTION[grouped, half, keys], ((nw + 3) // 4, 1, 1), stream,
                        qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, np.float32(scale))

    ATTENTION_PREFILL = register("attention_prefill_f16", "attention_prefill.cu", "PPPPiPPPiiiif", 128)

    def attention_prefill(self, stream, qkv, kc, vc, row_slot, slot_base, row_pos, out, tiles, n_tiles, row_base,
                          H, D, S, scale):
        """Tensor-core causal attention (fp16, D == 64) of the rows covered by tiles: int32 [n_tiles, 2] pairs
        {first_row, n_rows} (8-byte aligned), each 1..16 rows of ONE sequence (one slot), e.g. consecutive tokens
        of a prompt. first_row counts from the chunk's first row; qkv, row_slot, row_pos and out point at the
        pass's first row, which is chunk row row_base. Same results as attention(half=True) on those rows."""
        if n_tiles:
            assert D == 64 and ptr(tiles) % 8 == 0
            nw = n_tiles * H   # one warp per (tile, head), 4 warps per block
            self.launch(self.ATTENTION_PREFILL, ((nw + 3) // 4, 1, 1), stream, qkv, kc, vc, row_slot, slot_base,
                        row_pos, out, tiles, n_tiles, row_base, H, S, np.float32(scale))
