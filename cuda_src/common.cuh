// Shared helpers for the gpt2job kernels (included by every .cu file).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// Epilogue modes of the matrix products (runtime argument, uniform per launch).
#define EPI_BIAS 0        // out = acc + bias
#define EPI_GELU_TANH 1   // out = gelu_new(acc + bias)
#define EPI_GELU_ERF 2    // out = gelu(acc + bias)   (exact, erf)
#define EPI_RESID 3       // out += acc + bias         (out is the fp32 residual stream)

// Every kernel's first statement (tests/test_cuda_compile.py checks it). In a decode step replayed as a CUDA graph,
// each kernel is launched as soon as every block of the kernel before it has ended, not once that kernel's end and
// writes have been made known (programmatic dependent launch, Hopper on; gpt2job/backends/cuda/graphs.py): it waits
// here, before any read or write of device memory, until the kernels before it have finished and their writes are
// visible. Elsewhere (plain launches, GPUs before Hopper) it returns at once. (No block triggers its dependants
// earlier: launched at each block's start, the next kernel's blocks sat on the SMs and made steps up to 15% slower;
// benchmarks/RESULTS.md, session 38.)
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float gelu_tanh_f(float x) {
    // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as gpt2job.model.reference.gelu_tanh
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_erf_f(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// the same GELU through the sigmoid identity 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2 u)): one fast exp and one fast
// division instead of tanhf's branches (a few fp32 ulps off; the fp16 products' epilogues use it). Large negative
// x: exp overflows to inf and x / inf = -0; large positive x: x / 1. The exp is __expf's (2^(y log2 e), ex2.approx)
// with subnormal results flushed to zero (.ftz): they vanish in 1 + e all the same, so every result keeps its bits,
// without __expf's three instructions a call that scale such arguments into range.
__device__ __forceinline__ float gelu_tanh_fast(float x) {
    const float k2 = 2.0f * 0.7978845608028654f;
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-k2 * (x + 0.044715f * x * x * x) * 1.4426950408889634f));
    return __fdividef(x, 1.0f + e);
}

__device__ __forceinline__ float apply_act(float v, int mode) {
    if (mode == EPI_GELU_TANH) return gelu_tanh_f(v);
    if (mode == EPI_GELU_ERF) return gelu_erf_f(v);
    return v;
}
__device__ __forceinline__ float apply_act_fast(float v, int mode) {   // fp16 products
    if (mode == EPI_GELU_TANH) return gelu_tanh_fast(v);
    return apply_act(v, mode);
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
