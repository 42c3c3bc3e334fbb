"""The fp16 products' GELU (cuda_src/common.cuh gelu_tanh_fast) keeps the bits of its __expf form for every float32
input: its exp flushes subnormal results to zero (ex2.approx.ftz), which 1 + e rounds away all the same.

Skipped cleanly without pycuda or a GPU (the module is compiled with nvcc, as the kernels are)."""
import os

import numpy as np
import pytest

drv = pytest.importorskip("pycuda.driver")

try:
    drv.init()
    _NGPU = drv.Device.count()
except Exception:  # pragma: no cover
    _NGPU = 0
if _NGPU == 0:
    pytest.skip("no CUDA GPU", allow_module_level=True)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")

KERNEL = r"""
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


def test_gelu_tanh_fast_keeps_the_bits_of_its_expf_form_for_every_float():
    from gpt2job.backends.cuda.kcache import nvcc_cubin
    ctx = drv.Device(0).make_context()
    try:
        arch = "sm_%d%d" % drv.Context.get_device().compute_capability()
        f = drv.module_from_buffer(nvcc_cubin(KERNEL, arch, ("-std=c++17",), [SRC])).get_function("gelu_bits")
        count, first = drv.mem_alloc(8), drv.mem_alloc(4)
        drv.memcpy_htod(count, np.zeros(1, np.uint64))
        drv.memcpy_htod(first, np.full(1, 0xFFFFFFFF, np.uint32))
        for half in (0, 1 << 31):   # all 2^32 patterns, in two launches (n fits an unsigned)
            f(np.uint32(half), np.uint32(1 << 31), count, first, block=(256, 1, 1), grid=(4096, 1))
        drv.Context.synchronize()
        got_count, got_first = np.zeros(1, np.uint64), np.zeros(1, np.uint32)
        drv.memcpy_dtoh(got_count, count)
        drv.memcpy_dtoh(got_first, first)
    finally:
        ctx.pop()
        ctx.detach()
    assert int(got_count[0]) == 0, f"{int(got_count[0])} inputs differ, the first 0x{int(got_first[0]):08x}"
