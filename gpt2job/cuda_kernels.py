"""Compile the kernels of cuda_src/*.cu with PyCUDA and launch them cheaply (prepared calls).

Imported only by gpt2job.cuda_backend and the CUDA tests/benchmarks: it imports pycuda at module level.
Each rank compiles into its own cache directory (~/.cache/gpt2job/pycuda/<host>-rank<local_rank>, or
$GPT2JOB_PYCUDA_CACHE/<host>-rank<local_rank>), because PyCUDA's compiler cache is not safe for ranks
sharing a directory.
"""
import os
import socket

import numpy as np
import pycuda.driver as drv
from pycuda.compiler import SourceModule

CUDA_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")

EPI_BIAS, EPI_GELU_TANH, EPI_GELU_ERF, EPI_RESID = 0, 1, 2, 3

# name -> (file, PyCUDA prepare signature)
KERNELS = {
    "gemm_f32": ("gemm_f32.cu", "PiPiPiPiiiiiii"),
    "gemm_f16_outh": ("gemm_f16.cu", "PiPiPiPiiii"),
    "gemm_f16_outf": ("gemm_f16.cu", "PiPiPiPiiii"),
    "embed": ("transformer.cu", "PPPPPii"),
    "layernorm_f32": ("transformer.cu", "PPiPPPiif"),
    "layernorm_f16": ("transformer.cu", "PPiPPPiif"),
    "kv_store_f32": ("transformer.cu", "PPiPPPiii"),
    "kv_store_f16": ("transformer.cu", "PPiPPPiii"),
    "attention_f32": ("transformer.cu", "PPPPiPPiiiif"),
    "attention_f16": ("transformer.cu", "PPPPiPPiiiif"),
    "transpose_to_half": ("transformer.cu", "PPii"),
    "argmax_rows": ("sampling.cu", "PiiPi"),
    "sample_rows": ("sampling.cu", "PiiPPiQdidPi"),
}


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

    def __init__(self, local_rank=0):
        cdir = cache_dir(local_rank)
        mods = {}
        for fname in sorted({f for f, _ in KERNELS.values()}):
            with open(os.path.join(CUDA_SRC, fname)) as fh:
                src = fh.read()
            mods[fname] = SourceModule(src, no_extern_c=True, arch="sm_90", options=["-std=c++17"],
                                       include_dirs=[CUDA_SRC], cache_dir=cdir)
        self.modules = mods
        self.funcs = {}
        for name, (fname, sig) in KERNELS.items():
            f = mods[fname].get_function(name)
            f.prepare(sig)
            self.funcs[name] = f

    def launch(self, name, grid, block, stream, *args):
        args = [ptr(a) if not isinstance(a, (int, float, np.integer, np.floating)) else a for a in args]
        self.funcs[name].prepared_async_call(grid, block, stream, *args)

    # ---------------------------------------------------------------- typed helpers

    def gemm_f32(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode):
        if M == 0:
            return
        vec_a = int(lda % 4 == 0 and ptr(A) % 16 == 0)
        vec_b = int(ldb % 4 == 0 and ptr(B) % 16 == 0)
        vec_c = int(ldc % 4 == 0 and ptr(C) % 16 == 0)
        grid = ((N + 127) // 128, (M + 127) // 128, 1)
        self.launch("gemm_f32", grid, (256, 1, 1), stream, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias),
                    M, N, K, mode, vec_a, vec_b, vec_c)

    def gemm_f16(self, stream, A, lda, B, ldb, C, ldc, bias, M, N, K, mode, out_half):
        """B is [N, K] (K-contiguous). Needs K, lda, ldb multiples of 8 and 16-byte aligned A, B."""
        if M == 0:
            return
        assert K % 8 == 0 and lda % 8 == 0 and ldb % 8 == 0 and ptr(A) % 16 == 0 and ptr(B) % 16 == 0
        grid = ((N + 127) // 128, (M + 127) // 128, 1)
        self.launch("gemm_f16_outh" if out_half else "gemm_f16_outf", grid, (256, 1, 1), stream,
                    ptr(A), lda, ptr(B), ldb, ptr(C), ldc, ptr(bias), M, N, K, mode)

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

    def attention(self, stream, half, qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale):
        if R:
            assert D <= 128
            nw = R * H
            self.launch("attention_f16" if half else "attention_f32", ((nw + 3) // 4, 1, 1), (128, 1, 1), stream,
                        qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, np.float32(scale))

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
