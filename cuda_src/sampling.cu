// Token selection on the GPU, the rules of gpt2job/model/sampling.py (one block per logits row):
//   argmax_rows: greedy, lowest index on ties.
//   sample_rows_params: the same per row with each row's own settings and repetition penalty.
//   sample_rows: p = softmax(l / T) in float64; top-k keeps p >= k-th largest p (ties kept);
//     top-p keeps p >= t where t is the p at which the descending cumulative kept mass first reaches
//     top_p * kept mass; u = uniform(seed, row, step) (splitmix64, 24 bits); walk the kept tokens in index
//     order and take the first whose running sum exceeds u * kept sum (V - 1 if none).
// The k-th largest p and the top-p threshold are found by radix selection on the float32 logit bits
// (p is a non-decreasing function of the logit).
#include "common.cuh"

#define SEL_THREADS 1024

__device__ __forceinline__ unsigned fkey(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float kfloat(unsigned k) {
    unsigned u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
__device__ __forceinline__ double uniform01(unsigned long long seed, unsigned long long row, unsigned long long step) {
    unsigned long long x = splitmix64(splitmix64(splitmix64(seed) ^ row) ^ step);
    return (double)(x >> 40) / (double)(1u << 24);
}

// Block-wide reductions for SEL_THREADS threads (red: shared scratch of 32 entries).
__device__ double block_sum_d(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < (int)(blockDim.x >> 5)) ? red[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

__device__ float block_max_f(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < (int)(blockDim.x >> 5)) ? red[lane] : -INFINITY;
        v = warp_max(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// Block-wide argmax of l[0, V) (first index of the maximum), in out_r by thread 0 (sv, si: shared scratch).
__device__ __forceinline__ void block_argmax(const float* l, int V, int* out_r, float* sv, int* si)
{
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = l[i];
        if (v > best || (bi == 0x7fffffff)) { if (v > best || bi == 0x7fffffff) { best = v; bi = i; } }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) *out_r = bi;
    }
}

// Greedy: out[r] = argmax(logits[r, :V]) (first index of the maximum).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
argmax_rows(const float* __restrict__ logits, int ld, int V, int* __restrict__ out, int R)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    block_argmax(logits + (size_t)r * ld, V, out + r, sv, si);
}

// One row's sampled token (rules 2-5) into *out_r, by the whole block: l [V] its logits, rid its prompt row id.
__device__ __forceinline__ void sample_block(const float* l, int V, long long rid, int step, unsigned long long seed,
                                             double temperature, int top_k, double top_p, int* out_r)
{
    __shared__ double red[32];
    __shared__ float redf[32];
    __shared__ unsigned int hcnt[256];
    __shared__ double hsum[256];
    __shared__ unsigned s_prefix;
    __shared__ double s_above;
    __shared__ int s_best;
    const int tid = threadIdx.x;

    // softmax statistics, float64 as NumPy
    float mx = -INFINITY;
    for (int i = tid; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
    const double zmax = (double)block_max_f(mx, redf) / temperature;
    double s = 0.0;
    for (int i = tid; i < V; i += blockDim.x) s += exp((double)l[i] / temperature - zmax);
    const double denom = block_sum_d(s, red);
#define PROB(v) (exp((double)(v) / temperature - zmax) / denom)

    // top-k: k-th largest logit key by 4 radix passes of 8 bits (counts)
    double pk = -1.0;  // keep p >= pk
    if (top_k > 0 && top_k < V) {
        if (tid == 0) { s_prefix = 0u; s_above = 0.0; }
        for (int pass = 0; pass < 4; pass++) {
            const int shift = 24 - 8 * pass;
            const unsigned mask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
            for (int i = tid; i < 256; i += blockDim.x) hcnt[i] = 0u;
            __syncthreads();
            const unsigned prefix = s_prefix;
            for (int i = tid; i < V; i += blockDim.x) {
                const unsigned k = fkey(l[i]);
                if ((k & mask) == prefix) atomicAdd(&hcnt[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                double above = s_above;   // count of keys greater than the prefix range
                unsigned d = 0;
                for (int dd = 255; dd >= 0; dd--) {
                    if (above + hcnt[dd] >= (double)top_k) { d = (unsigned)dd; break; }
                    above += hcnt[dd];
                }
                s_above = above;
                s_prefix = prefix | (d << shift);
            }
            __syncthreads();
        }
        pk = PROB(kfloat(s_prefix));
        __syncthreads();
    }

    // top-p: the largest kept key K with (kept mass of keys >= K) >= top_p * kept mass
    double pt = pk;
    if (top_p > 0.0 && top_p < 1.0) {
        double ks = 0.0;
        for (int i = tid; i < V; i += blockDim.x) { const double p = PROB(l[i]); if (p >= pk) ks += p; }
        const double target = top_p * block_sum_d(ks, red);
        if (tid == 0) { s_prefix = 0u; s_above = 0.0; }
        for (int pass = 0; pass < 4; pass++) {
            const int shift = 24 - 8 * pass;
            const unsigned mask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
            for (int i = tid; i < 256; i += blockDim.x) { hsum[i] = 0.0; hcnt[i] = 0u; }
            __syncthreads();
            const unsigned prefix = s_prefix;
            for (int i = tid; i < V; i += blockDim.x) {
                const unsigned k = fkey(l[i]);
                if ((k & mask) == prefix) {
                    const double p = PROB(l[i]);
                    if (p >= pk && p > 0.0) {
                        atomicAdd(&hsum[(k >> shift) & 255u], p);
                        atomicAdd(&hcnt[(k >> shift) & 255u], 1u);
                    }
                }
            }
            __syncthreads();
            if (tid == 0) {
                double above = s_above, cum = 0.0;
                int d = -1;
                for (int dd = 255; dd >= 0; dd--) {
                    if (hcnt[dd] == 0u) continue;
                    if (above + cum + hsum[dd] >= target) { d = dd; break; }
                    cum += hsum[dd];
                }
                if (d < 0) {  // rounding: the mass never reaches the target; fall to the smallest kept
                    for (int dd = 0; dd < 256; dd++) if (hcnt[dd]) { d = dd; break; }
                    cum = 0.0;
                    for (int dd = 255; dd > d; dd--) cum += hsum[dd];
                    if (d < 0) d = 0;
                }
                s_above = above + cum;
                s_prefix = prefix | ((unsigned)d << shift);
            }
            __syncthreads();
        }
        pt = PROB(kfloat(s_prefix));
        __syncthreads();
    }

    // walk the kept tokens in index order: thread tid owns a contiguous segment
    const int seg = (V + blockDim.x - 1) / blockDim.x;
    const int i0 = tid * seg, i1 = min(V, i0 + seg);
    double local = 0.0;
    for (int i = i0; i < i1; i++) { const double p = PROB(l[i]); if (p >= pt) local += p; }
    // exclusive block scan of local sums (double): warp scan then warp totals
    const int lane = tid & 31, warp = tid >> 5;
    double incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) red[warp] = incl;
    if (tid == 0) s_best = 0x7fffffff;
    __syncthreads();
    double wprefix = 0.0, total = 0.0;
    const int nw = blockDim.x >> 5;
    for (int w = 0; w < nw; w++) { if (w < warp) wprefix += red[w]; total += red[w]; }
    const double x = uniform01(seed, (unsigned long long)rid, (unsigned long long)step) * total;
    double run = wprefix + incl - local;
    if (run + local > x) {
        for (int i = i0; i < i1; i++) {
            const double p = PROB(l[i]);
            if (p >= pt) { run += p; if (run > x) { atomicMin(&s_best, i); break; } }
        }
    }
    __syncthreads();
    if (tid == 0) *out_r = s_best == 0x7fffffff ? V - 1 : s_best;
#undef PROB
}

// rows: int64 prompt row ids; the row id of logits row r is rows[seqidx[r]].
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
sample_rows(const float* __restrict__ logits, int ld, int V, const long long* __restrict__ rows,
            const int* __restrict__ seqidx, int step, unsigned long long seed, double temperature,
            int top_k, double top_p, int* __restrict__ out, int R)
{
    const int r = blockIdx.x;
    if (r >= R) return;
    sample_block(logits + (size_t)r * ld, V, rows[seqidx ? seqidx[r] : r], step, seed, temperature, top_k, top_p,
                 out + r);
}

// Per-row settings (twin: model/sampling.py sample_rows_params): logits row r is sequence q = seqidx[r], with
// prompt row rows[q] and its own seed / temperature / top_k / top_p / penalty [q]. First the repetition penalty
// (transformers' rule, float32) on the tokens the sequence has seen (seen: bitmap [slots, words], its row
// q - seq_base; null or penalty 1: none), written into the logits in place; then the argmax (temperature <= 0)
// or the sampling rules. The logits are read back after the block's writes: not through __restrict__ / const
// (the read-only cache could serve stale values).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
sample_rows_params(float* logits, int ld, int V, const long long* __restrict__ rows, const int* __restrict__ seqidx,
                   int step, const unsigned long long* __restrict__ seeds, const double* __restrict__ temps,
                   const int* __restrict__ top_ks, const double* __restrict__ top_ps,
                   const float* __restrict__ penalties, const unsigned* __restrict__ seen, int words, int seq_base,
                   int* __restrict__ out, int R)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    const int q = seqidx[r];
    float* l = logits + (size_t)r * ld;
    const float pen = penalties[q];
    if (seen != nullptr && pen != 1.0f) {
        const unsigned* bits = seen + (size_t)(q - seq_base) * words;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            if ((bits[i >> 5] >> (i & 31)) & 1u) {
                const float v = l[i];
                l[i] = v < 0.0f ? v * pen : v / pen;
            }
        }
        __syncthreads();
    }
    const double temperature = temps[q];
    if (temperature <= 0.0) block_argmax(l, V, out + r, sv, si);
    else sample_block(l, V, rows[q], step, seeds[q], temperature, top_ks[q], top_ps[q], out + r);
}

// The repetition penalty's seen tokens: sequence seq[i] (its bitmap row seq[i] - seq_base, words uint32 each)
// has seen token tok[i]; called with a group's prompt tokens before its prefill's selection, and with each decode
// step's input tokens (the previous step's output) before its selection (twin: model/sampling.py mark_seen).
extern "C" __global__ void mark_seen(const int* __restrict__ tok, const int* __restrict__ seq, int n, int seq_base,
                                     unsigned* __restrict__ bits, int words)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const int t = tok[i];
        atomicOr(&bits[(size_t)(seq[i] - seq_base) * words + (t >> 5)], 1u << (t & 31));
    }
}

// Greedy selection from the fp16 LM-head GEMM's EPI_ARGMAX partials: part [R, ld] float2 {value, column bits},
// n chunks per row in increasing column order; largest value, lowest column on ties. One warp per row.
extern "C" __global__ void argmax_partials(const float2* __restrict__ part, int ld, int n, int* __restrict__ out, int R)
{
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const float2* p = part + (size_t)r * ld;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = lane; i < n; i += 32) {
        const float2 v = p[i];
        const int c = __float_as_int(v.y);
        if (bi == 0x7fffffff || v.x > best) { best = v.x; bi = c; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != 0x7fffffff && (bi == 0x7fffffff || ov > best || (ov == best && oi < bi))) { best = ov; bi = oi; }
    }
    if (lane == 0) out[r] = bi;
}

// The next decode step's input tokens from this step's: dst[i] = src[idx[i]] (the rows still generating, when
// some finished; twin: src[idx] in NumPy, tests/test_cuda_kernels.py test_gather_tokens).
extern "C" __global__ void gather_tokens(const int* __restrict__ src, const int* __restrict__ idx, int* __restrict__ dst,
                                         int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[idx[i]];
}
