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
// earlier: launched at each block's start, the next kernel's blocks sat on the SMs and made short steps slower;
// benchmarks/RESULTS.md.)
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

// Sampling rule 6 (gpt2job/model/sampling.py tempered_pick: a row sampled with a temperature alone, by chunks of
// TCHUNK columns): the steps that the selection kernels (sampling.cu tempered_row) and the fp16 LM head's epilogue
// (gemm_f16.cu EPI_TEMPERED) share, so that both give a row the same bits and token. __f*_rn keep nvcc from fusing.
#define TCHUNK 64
__device__ __forceinline__ unsigned lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}
// a column's e = exp(z - m), m its chunk's largest z: the special function unit's exponential (__expf: a few
// instructions, where the epilogue runs it on every logit; NumPy's exp differs by ulps, tests/twin_ties.py)
__device__ __forceinline__ float tempered_e(float z, float m) { return __expf(__fsub_rn(z, m)); }
// a group's sum of its 8 columns' e (column order): ((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7)), from the pair
// sums p_q = e_2q + e_2q+1
__device__ __forceinline__ float tempered_group(float p0, float p1, float p2, float p3) {
    return __fadd_rn(__fadd_rn(p0, p1), __fadd_rn(p2, p3));
}
// chunk j of the row with this key, its largest z m and its sum S: returns its value (log-mass + Gumbel noise), t
// the threshold of its draw
__device__ __forceinline__ float tempered_chunk(unsigned key, int j, float m, float S, float& t) {
    const unsigned h1 = lowbias32(key + (unsigned)(2 * j) * 0x9E3779B9u);
    const unsigned h2 = lowbias32(key + (unsigned)(2 * j + 1) * 0x9E3779B9u);
    const float u = __fmul_rn(__fadd_rn((float)(h1 >> 9), 0.5f), 0x1p-23f);   // (0, 1)
    t = __fmul_rn(__fmul_rn((float)(h2 >> 8), 0x1p-24f), S);                   // [0, 1) * S
    return __fsub_rn(__fadd_rn(m, logf(S)), logf(-logf(u)));
}
