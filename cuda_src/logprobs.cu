// Log-probabilities of the chosen tokens (--logprobs, --top-logprobs K), the rules of gpt2job/model/logprobs.py, one
// block per logits row r (the raw fp32 logits the LM head wrote, before temperature, top-k/top-p and penalty):
//   lse = max + log(sum exp(l - max)) (each thread an online (max, sum) over its columns, combined in double);
//   lp_out[r] = l[tok[r]] - lse;
//   K > 0: top_ids[r, :K] / top_vals[r, :K] = the K largest logits, descending, the lower id first on ties, and
//   their l - lse. Each thread keeps its own best K while it reads its columns (one pass over the row for all of it),
//   then K rounds of a block argmax over the threads' heads merge them.
//   greedy != 0: the token is chosen here too, the argmax of the row (lowest id on ties, as argmax_rows), and
//   written to tok[r]: greedy --logprobs reads the logits once instead of twice (argmax_rows, then this).
#include <math.h>

#include "common.cuh"

#define LP_THREADS 256
#define LP_MAX_K 20
#define LP_NONE 0x7fffffff

__device__ __forceinline__ bool lp_better(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

extern "C" __global__ void __launch_bounds__(LP_THREADS)
token_logprobs(const float* __restrict__ logits, int ld, int V, int* __restrict__ tok, int greedy, int K,
               float* __restrict__ lp_out, int* __restrict__ top_ids, float* __restrict__ top_vals, int R)
{
    pdl_wait();
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* l = logits + (size_t)r * ld;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __shared__ float s_m[32];
    __shared__ double s_d[32];
    __shared__ float s_v[32];
    __shared__ int s_i[32];
    __shared__ double s_lse;
    float tv[LP_MAX_K];
    int ti[LP_MAX_K];
    int n = 0;
    float m = -INFINITY, s = 0.0f;   // this thread's running max and sum of exp(l - m)
    int mi = LP_NONE;                // the first column of this thread's max
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = l[i];
        if (v > m) { s = s * __expf(m - v) + 1.0f; m = v; mi = i; } else { s += __expf(v - m); }
        if (K > 0 && (n < K || v > tv[K - 1])) {   // ids rise along the loop: an equal value is never better
            int j = n < K ? n++ : K - 1;
            while (j > 0 && v > tv[j - 1]) { tv[j] = tv[j - 1]; ti[j] = ti[j - 1]; --j; }
            tv[j] = v; ti[j] = i;
        }
    }
    // block max, then the sum of every thread's part rescaled to it, in double
    float bm = m;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
    if (lane == 0) s_m[warp] = bm;
    __syncthreads();
    bm = -INFINITY;
    for (int w = 0; w < nw; ++w) bm = fmaxf(bm, s_m[w]);
    double part = (m == -INFINITY) ? 0.0 : (double)s * exp((double)m - (double)bm);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) s_d[warp] = part;
    __syncthreads();
    if (greedy) {   // the row's argmax: the lowest column holding the block max
        int bi = (m == bm) ? mi : LP_NONE;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) bi = min(bi, __shfl_xor_sync(0xffffffffu, bi, o));
        if (lane == 0) s_i[warp] = bi;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < nw; ++w) bi = min(bi, s_i[w]);
            tok[r] = bi == LP_NONE ? V - 1 : bi;   // (a row of NaN: V - 1, as no column is > -inf)
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < nw; ++w) total += s_d[w];
        s_lse = (double)bm + log(total);
        lp_out[r] = (float)((double)l[tok[r]] - s_lse);
    }
    __syncthreads();
    const double lse = s_lse;
    // merge the threads' lists: K rounds of a block argmax over their heads
    int h = 0;
    for (int q = 0; q < K; ++q) {
        float bv = h < n ? tv[h] : -INFINITY;
        int bi = h < n ? ti[h] : LP_NONE;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != LP_NONE && (bi == LP_NONE || lp_better(ov, oi, bv, bi))) { bv = ov; bi = oi; }
        }
        if (lane == 0) { s_v[warp] = bv; s_i[warp] = bi; }
        __syncthreads();
        bv = -INFINITY; bi = LP_NONE;
        for (int w = 0; w < nw; ++w)
            if (s_i[w] != LP_NONE && (bi == LP_NONE || lp_better(s_v[w], s_i[w], bv, bi))) { bv = s_v[w]; bi = s_i[w]; }
        if (h < n && ti[h] == bi) ++h;            // ids are unique: the winner's thread moves on
        if (threadIdx.x == 0) {
            top_ids[(size_t)r * K + q] = bi == LP_NONE ? -1 : bi;
            top_vals[(size_t)r * K + q] = bi == LP_NONE ? -INFINITY : (float)((double)bv - lse);
        }
        __syncthreads();                          // s_v / s_i are read before the next round writes them
    }
}

// Greedy --logprobs (K = 0) from the fp16 LM head's EPI_ARGMAX_LSE partials, the logits never in memory: part [R, ld]
// float4 {chunk max, column bits, sum over the chunk of exp(l - chunk max), 0}, n chunks a row in increasing column
// order. tok[r] = the row's argmax (argmax_partials' rule: the largest, the lowest column on ties); lp_out[r] = its
// log-probability, max - lse = -log(sum over chunks of s_c exp(m_c - max)), summed in double. One warp per row.
// Twin: model/logprobs.py token_logprobs at each row's argmax (tests/test_cuda_kernels.py
// test_gemm_f16_argmax_epilogue, every tile variant's epilogue with this reduction).
extern "C" __global__ void argmax_logprob_partials(const float4* __restrict__ part, int ld, int n,
                                                   int* __restrict__ tok, float* __restrict__ lp_out, int R)
{
    pdl_wait();
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const float4* p = part + (size_t)r * ld;
    float best = -INFINITY;
    int bi = LP_NONE;
    for (int i = lane; i < n; i += 32) {
        const float4 v = p[i];
        if (bi == LP_NONE || v.x > best) { best = v.x; bi = __float_as_int(v.y); }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {   // every lane ends with the row's (max, column)
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != LP_NONE && (bi == LP_NONE || lp_better(ov, oi, best, bi))) { best = ov; bi = oi; }
    }
    double s = 0.0;
    for (int i = lane; i < n; i += 32) {
        const float4 v = p[i];
        s += (double)v.z * exp((double)v.x - (double)best);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
        tok[r] = bi;
        lp_out[r] = (float)(-log(s));
    }
}
