// Token selection on the GPU, the rules of gpt2job/model/sampling.py (one block per logits row):
//   argmax_rows: greedy, lowest index on ties.
//   sample_rows_params: the same per row with each row's own settings and repetition penalty.
//   sample_rows: p = softmax(l / T) (each exponential in float32, the sums in float64); top-k keeps the logits >=
//     the k-th largest (ties kept); top-p keeps the logits >= t, the logit at which the kept p summed in descending
//     logit order first reach top_p * the kept sum; u = uniform(seed, row, step) (splitmix64, 24 bits); walk the
//     kept tokens in index order and take the first whose running sum exceeds u * kept sum (V - 1 if none).
//     A row with neither top-k nor top-p takes rule 6 instead (tempered_row): one pass over the row, by chunks.
// The k-th largest logit and the top-p threshold are found on the float32 logit keys (fkey: unsigned, ordered as
// the floats): a histogram of the row over value buckets picks the bucket that holds the threshold, then radix
// passes over the keys of that bucket only pick the exact key (see sample_block for why not the keys' radix alone).
#include "common.cuh"

#define SEL_THREADS 1024
#define NB 256            // value buckets of a row (sample_block)
#define SAMPLE_LIST 4096  // elements of a threshold bucket that bucket_key walks as a list rather than the row
#define FULL 0xffffffffu
#define FX_DIGITS 3       // fx_add: a fixed-point mass as FX_DIGITS digits of FX_BITS bits
#define FX_BITS 14
__device__ __forceinline__ unsigned fkey(float f) {   // -0 and +0 one key: they compare equal as floats
    unsigned u = __float_as_uint(f);
    return f == 0.0f ? 0x80000000u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
__device__ __forceinline__ unsigned long long row_hash(unsigned long long seed, unsigned long long row,
                                                       unsigned long long step) {
    return splitmix64(splitmix64(splitmix64(seed) ^ row) ^ step);
}
__device__ __forceinline__ double uniform01(unsigned long long seed, unsigned long long row, unsigned long long step) {
    return (double)(row_hash(seed, row, step) >> 40) / (double)(1u << 24);
}
// rule 6's key (model/sampling.py tempered_key): the high half of the same hash
__device__ __forceinline__ unsigned tempered_key(unsigned long long seed, unsigned long long row,
                                                 unsigned long long step) {
    return (unsigned)(row_hash(seed, row, step) >> 32);
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

// f(i, src[i]) for this thread's share of a row src[0, V) in global memory, read once: float4 loads, four in flight
// per thread, where src is 16-byte aligned (one dependent load at a time left a block waiting on the memory's
// latency ~50 times a row). A thread's indices are not visited in increasing order.
template <typename F>
__device__ __forceinline__ void row_visit(const float* src, int V, F f)
{
    const int tid = threadIdx.x, nt = blockDim.x;
    const int head = min(V, (int)(((16u - ((unsigned)(size_t)src & 15u)) & 15u) >> 2));
    for (int i = tid; i < head; i += nt) f(i, src[i]);
    const float4* s4 = (const float4*)(src + head);
    const int n4 = (V - head) >> 2;
    for (int i = tid; i < n4; i += 4 * nt) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) if (i + u * nt < n4) v[u] = s4[i + u * nt];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int j = i + u * nt, c = head + 4 * j;
            if (j < n4) { f(c, v[u].x); f(c + 1, v[u].y); f(c + 2, v[u].z); f(c + 3, v[u].w); }
        }
    }
    for (int i = head + 4 * n4 + tid; i < V; i += nt) f(i, src[i]);
}

// A thread's running argmax: ties compare indices (row_visit does not visit a thread's indices in order).
__device__ __forceinline__ void argmax_take(float v, int i, float& best, int& bi) {
    if (bi == 0x7fffffff || v > best || (v == best && i < bi)) { best = v; bi = i; }
}
// Every thread's (best, bi) -> the block's largest best, the lowest bi on ties, in out_r by thread 0 (sv, si: shared
// scratch of 32).
__device__ __forceinline__ void block_argmax_merge(float best, int bi, int* out_r, float* sv, int* si)
{
    const int nt = blockDim.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != 0x7fffffff && (bi == 0x7fffffff || ov > best || (ov == best && oi < bi))) { best = ov; bi = oi; }
    }
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nw = nt >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != 0x7fffffff && (bi == 0x7fffffff || ov > best || (ov == best && oi < bi))) { best = ov; bi = oi; }
        }
        if (lane == 0) *out_r = bi;
    }
}
// Block-wide argmax of l[0, V) (first index of the maximum), in out_r by thread 0, the row read with row_visit.
__device__ __forceinline__ void block_argmax(const float* l, int V, int* out_r, float* sv, int* si)
{
    float best = -INFINITY;
    int bi = 0x7fffffff;
    row_visit(l, V, [&](int i, float v) { argmax_take(v, i, best, bi); });
    block_argmax_merge(best, bi, out_r, sv, si);
}

// Greedy: out[r] = argmax(logits[r, :V]) (first index of the maximum).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
argmax_rows(const float* __restrict__ logits, int ld, int V, int* __restrict__ out, int R)
{
    pdl_wait();
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    block_argmax(logits + (size_t)r * ld, V, out + r, sv, si);
}

// Block-wide maximum of unsigned values (red: shared scratch of 32 entries).
__device__ unsigned block_max_u(unsigned v, unsigned* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = __reduce_max_sync(FULL, v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = __reduce_max_sync(FULL, (lane < (int)(blockDim.x >> 5)) ? red[lane] : 0u);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// sample_block's shared scratch: reductions, one histogram (value buckets or key digits) and what a pick found.
struct SampleShared {
    double red[32];
    float redf[32];
    unsigned redu[32];
    unsigned cnt[NB];
    double sum[NB];
    unsigned fx[FX_DIGITS][NB];   // the value buckets' masses in fixed point while a pass adds them (fx_add)
    unsigned long long lastq[32];  // each warp's mass of bucket NB - 1 in fixed point (flush_last)
    int list[SAMPLE_LIST];   // bucket_key: the threshold bucket's elements, collected once
    unsigned nlist;
    int pick;             // pick_first: the entry picked
    double above;         //   the count / mass of the entries before it
    double target;        //   the target it used
    int best;             // the walk's token
};

// Value bucket of logit v: 0 for the row's largest logits, non-decreasing as v decreases (a monotone function of
// v, so a bucket is an interval of keys); NB - 1 holds everything at least (NB - 1) / scale below the maximum.
__device__ __forceinline__ int vbucket(float v, float mx, float scale) {
    const float d = (mx - v) * scale;
    return d < (float)(NB - 1) ? (int)d : NB - 1;   // NaN (scale inf, d 0 * inf): NB - 1
}

// Warp 0 picks, over positions j = 0..n-1 in the order of decreasing logits (entry e = rev ? n-1-j : j of cnt /
// sum), the first nonempty entry at which above + the running total (counts, or with mass the sums) reaches target
// (frac > 0: target = frac * the total of all entries); when none does (rounding), the last nonempty entry.
// sh.pick, sh.above (above + the total before the entry), sh.target. Every thread calls it (it ends in a barrier).
__device__ void pick_first(SampleShared& sh, int n, bool rev, bool mass, double above, double target, double frac)
{
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, per = (n + 31) >> 5;
        double tot = 0.0;
        bool any = false;
        for (int q = 0; q < per; q++) {
            const int j = lane * per + q;
            if (j < n) {
                const int e = rev ? n - 1 - j : j;
                if (sh.cnt[e]) { tot += mass ? sh.sum[e] : (double)sh.cnt[e]; any = true; }
            }
        }
        double incl = tot;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double t = __shfl_up_sync(FULL, incl, o);
            if (lane >= o) incl += t;
        }
        if (frac > 0.0) target = frac * __shfl_sync(FULL, incl, 31);
        const unsigned hit = __ballot_sync(FULL, any && above + incl >= target);
        const unsigned has = __ballot_sync(FULL, any);
        const int who = hit ? __ffs(hit) - 1 : (has ? 31 - __clz(has) : 0);
        if (lane == who) {
            double run = above + incl - tot, before = run;
            int pick = rev ? n - 1 : 0;
            for (int q = 0; q < per; q++) {
                const int j = lane * per + q;
                if (j >= n) break;
                const int e = rev ? n - 1 - j : j;
                if (!sh.cnt[e]) continue;
                const double v = mass ? sh.sum[e] : (double)sh.cnt[e];
                pick = e;
                before = run;
                if (hit && run + v >= target) break;
                run += v;
            }
            sh.pick = pick;
            sh.above = before;
            sh.target = target;
        }
    }
    __syncthreads();
}

// exp(v / T - zmax): a token's probability times the softmax denominator. Sums of these stand for sums of
// probabilities everywhere below (the thresholds and the walk compare them with each other), so no division.
// The exponent is taken in float64 as v * (1 / T) - zmax (one fma; NumPy divides: at most an ulp apart) and rounded
// to float32, the exponential taken in float32 (expf, as model/sampling.py's np.exp on float32): far fewer
// instructions than float64 exp in a kernel bound by them (benchmarks/RESULTS.md). The sums stay float64.
__device__ __forceinline__ double escore(float v, double invt, double zmax) {
    return (double)expf((float)fma((double)v, invt, -zmax));
}

// The value buckets' masses are summed in fixed point: a float64 (or float32) atomicAdd to shared memory is a
// compare-and-swap loop on this GPU (SASS ATOMS.CAST.SPIN.64, also for 64-bit integers), and a row's ~50,000 adds
// into a few hundred buckets made those loops wait on each other; 32-bit integer adds are native (ATOMS.ADD). A
// logit's mass m in [0, 1] becomes q = m * 2^40 rounded down (low by less than 2^-40; fxq), added as three 14-bit
// digits (bits 0-41), each digit summed in its own uint32: no overflow while a bucket gets at most 2^18 adds, V <=
// SAMPLE_MAX_V (checked by Kernels.sample). The sum of the q's is exact, in any order. A warp's sum of many logits
// (flush_last) is one q in the warp's own slot instead.
__device__ __forceinline__ unsigned long long fxq(double m) { return __double2ull_rz(m * 0x1p40); }
__device__ __forceinline__ void fx_add(SampleShared& sh, int b, double m) {
    const unsigned long long q = fxq(m);
#pragma unroll
    for (int d = 0; d < FX_DIGITS; d++) {
        const unsigned v = (unsigned)(q >> (FX_BITS * d)) & ((1u << FX_BITS) - 1u);
        if (v) atomicAdd(&sh.fx[d][b], v);
    }
}

// An empty histogram (counts, masses, fixed-point digits); then a barrier before it is added to.
__device__ __forceinline__ void hist_clear(SampleShared& sh) {
    for (int i = threadIdx.x; i < NB; i += blockDim.x) {
        sh.cnt[i] = 0u;
        sh.sum[i] = 0.0;
#pragma unroll
        for (int d = 0; d < FX_DIGITS; d++) sh.fx[d][i] = 0u;
    }
}

// sh.sum from the fixed-point digits fx_add summed (after a barrier), and with last the warps' flush_last slots in
// bucket NB - 1; then a barrier before sh.sum is read.
__device__ __forceinline__ void hist_masses(SampleShared& sh, bool last) {
    for (int i = threadIdx.x; i < NB; i += blockDim.x) {
        unsigned long long q = 0;
#pragma unroll
        for (int d = 0; d < FX_DIGITS; d++) q += (unsigned long long)sh.fx[d][i] << (FX_BITS * d);
        if (last && i == NB - 1)
            for (int w = 0; w < (int)(blockDim.x >> 5); w++) q += sh.lastq[w];
        sh.sum[i] = (double)q * 0x1p-40;
    }
}

// Adds this thread's count / mass of bucket NB - 1 (summed per thread: most of a peaked row lands there) to the
// histogram: one count atomic per warp, the warp's mass in its slot (hist_masses(sh, true) adds the slots). Every
// warp calls it once per histogram.
__device__ __forceinline__ void flush_last(SampleShared& sh, unsigned n, double mass) {
    n = __reduce_add_sync(FULL, n);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mass += __shfl_xor_sync(FULL, mass, o);
    if ((threadIdx.x & 31) == 0) {
        if (n) atomicAdd(&sh.cnt[NB - 1], n);
        sh.lastq[threadIdx.x >> 5] = n ? fxq(mass) : 0ull;
    }
}

// The key of the threshold inside value bucket b (sh.above: the count / mass of the buckets before it; sh.cnt[b]: the
// bucket's elements that count: top-k every element; mass, top-p: keys >= kmin and e > 0): radix passes of 8 bits
// over those elements' keys, from the highest bit where they differ; each pass picks, from the largest digit down,
// the first where the running count / mass reaches target, as a selection over the whole row would. A bucket of at
// most SAMPLE_LIST such elements is collected in one pass over the row and the radix passes walk that list (the
// row's passes were most of a sampled row's time); a larger one is read from the row each pass. The digits' masses
// are summed in fixed point (fx_add), so the pick does not depend on the order of the adds.
__device__ unsigned bucket_key(const float* l, int V, float mx, float scale, int b, bool mass, unsigned kmin,
                               double invt, double zmax, double target, SampleShared& sh)
{
    const int tid = threadIdx.x;
    double above = sh.above;
    const bool listed = sh.cnt[b] <= SAMPLE_LIST;
    if (tid == 0) sh.nlist = 0u;
    __syncthreads();
    // an element counts: in bucket b, and with mass a key >= kmin and e > 0 (as the histogram that picked b)
    auto counts = [&](float v, unsigned k) {
        return vbucket(v, mx, scale) == b && (!mass || (k >= kmin && escore(v, invt, zmax) > 0.0));
    };
    unsigned hi = 0u, lo_inv = 0u;
    for (int i = tid; i < V; i += blockDim.x) {
        const float v = l[i];
        const unsigned k = fkey(v);
        if (!counts(v, k)) continue;
        hi = max(hi, k);
        lo_inv = max(lo_inv, ~k);
        if (listed) sh.list[atomicAdd(&sh.nlist, 1u)] = i;
    }
    hi = block_max_u(hi, sh.redu);
    const unsigned lo = ~block_max_u(lo_inv, sh.redu);
    if (hi == lo) return hi;
    const int n = (int)sh.nlist;                        // (final: block_max_u ended in barriers)
    int top = 31 - __clz(hi ^ lo);                       // the highest bit not decided
    unsigned prefix = hi & ~((2u << top) - 1u);          // top 31: 2u << 31 is 0, the mask 0
    while (top >= 0) {
        const int width = min(8, top + 1), shift = top + 1 - width;
        const unsigned fixed = ~((2u << top) - 1u);
        hist_clear(sh);
        __syncthreads();
        auto add = [&](float v, unsigned k) {
            const unsigned d = (k >> shift) & ((1u << width) - 1u);
            if (mass) fx_add(sh, d, escore(v, invt, zmax));
            atomicAdd(&sh.cnt[d], 1u);
        };
        if (listed) {
            for (int j = tid; j < n; j += blockDim.x) {
                const float v = l[sh.list[j]];
                const unsigned k = fkey(v);
                if ((k & fixed) == prefix) add(v, k);
            }
        } else {
            for (int i = tid; i < V; i += blockDim.x) {
                const float v = l[i];
                const unsigned k = fkey(v);
                if ((k & fixed) == prefix && counts(v, k)) add(v, k);
            }
        }
        __syncthreads();
        if (mass) {
            hist_masses(sh, false);
            __syncthreads();
        }
        pick_first(sh, 1 << width, true, mass, above, target, 0.0);
        above = sh.above;
        prefix |= (unsigned)sh.pick << shift;
        top = shift - 1;
        __syncthreads();
    }
    return prefix;
}

// One row's sampled token (rules 2-5) into *out_r, by the whole block: l [V] its logits (shared or global memory),
// rid its prompt row id. Thread tid owns the contiguous segment [i0, i1) of the row (the walk is in index order).
// Kept tokens are those whose key is >= the threshold's key: p is a non-decreasing function of the key, so this is
// rule 3-4's p >= threshold p but for distinct logits whose p round to the same value.
// Why value buckets: the keys' top byte (sign and high exponent bits) is the same for nearly all logits of a row,
// so a radix pass over the whole row sent ~V atomic adds to one or two shared counters (float64 adds at that,
// which made top-p rows slow: benchmarks/RESULTS.md). Buckets of equal width in logit (the NB - 1 buckets span
// min(max - min, 32 T), 32 nats of probability ratio) spread them; everything further below lands in bucket NB - 1.
// mm: this thread's part of the row's maximum and minimum when have_mm (load_row found them), else a pass over the
// row finds them (by value: a pointer put mm in local memory).
__device__ void sample_block(const float* l, int V, long long rid, int step, unsigned long long seed,
                             double temperature, int top_k, double top_p, int* out_r, float2 mm, bool have_mm)
{
    __shared__ SampleShared sh;
    const int tid = threadIdx.x;
    const int seg = (V + blockDim.x - 1) / blockDim.x;
    const int i0 = min(V, tid * seg), i1 = min(V, i0 + seg);

    float mx = -INFINITY, mn = INFINITY;
    if (have_mm) { mx = mm.x; mn = mm.y; }
    else for (int i = tid; i < V; i += blockDim.x) { const float v = l[i]; mx = fmaxf(mx, v); mn = fminf(mn, v); }
    mx = block_max_f(mx, sh.redf);
    mn = -block_max_f(-mn, sh.redf);
    const float scale = (float)(NB - 1) / fminf(mx - mn, (float)(32.0 * temperature));
    const bool topk = top_k > 0 && top_k < V, topp = top_p > 0.0 && top_p < 1.0;
    const bool mass = topp && !topk;   // the top-p histogram in this pass (with top-k it needs the top-k key first)
    const bool cut = topk || topp;
    const bool need_e = mass || !cut;  // top-k alone needs no e until the walk over the kept few
    const double zmax = (double)mx / temperature, invt = 1.0 / temperature;

    // the segment's sum of e (float64, as NumPy); the histogram of the buckets: counts (top-k) or mass (top-p)
    hist_clear(sh);
    __syncthreads();
    double esum = 0.0, last_mass = 0.0;
    unsigned last_n = 0u;
    for (int i = i0; i < i1; i++) {
        const float v = l[i];
        const double e = need_e ? escore(v, invt, zmax) : 0.0;
        esum += e;
        if (topk || (mass && e > 0.0)) {
            const int b = vbucket(v, mx, scale);
            if (b == NB - 1) { last_n++; last_mass += e; continue; }
            atomicAdd(&sh.cnt[b], 1u);
            if (mass) fx_add(sh, b, e);
        }
    }
    flush_last(sh, last_n, last_mass);
    __syncthreads();
    if (mass) {        // (the same for the whole block: the row's settings)
        hist_masses(sh, true);
        __syncthreads();
    }

    unsigned K = 0u;   // kept: key >= K
    if (topk) {        // the k-th largest key
        pick_first(sh, NB, false, false, 0.0, (double)top_k, 0.0);
        K = bucket_key(l, V, mx, scale, sh.pick, false, 0u, invt, zmax, (double)top_k, sh);
        __syncthreads();
    }
    if (topp) {        // the largest key whose kept mass at or above it reaches top_p * the kept mass
        if (topk) {
            hist_clear(sh);
            __syncthreads();
            last_mass = 0.0;
            last_n = 0u;
            for (int i = tid; i < V; i += blockDim.x) {
                const float v = l[i];
                if (fkey(v) < K) continue;
                const double e = escore(v, invt, zmax);
                if (!(e > 0.0)) continue;
                const int b = vbucket(v, mx, scale);
                if (b == NB - 1) { last_n++; last_mass += e; continue; }
                atomicAdd(&sh.cnt[b], 1u);
                fx_add(sh, b, e);
            }
            flush_last(sh, last_n, last_mass);
            __syncthreads();
            hist_masses(sh, true);
            __syncthreads();
        }
        pick_first(sh, NB, false, true, 0.0, 0.0, top_p);
        K = bucket_key(l, V, mx, scale, sh.pick, true, K, invt, zmax, sh.target, sh);
        __syncthreads();
    }

    // walk the kept tokens in index order: the segments' kept mass, an exclusive block scan, then the segment that
    // holds u * the total walks its tokens
    double local = esum;
    bool any = i1 > i0;   // a kept token in the segment (only such a segment can hold the pick)
    if (cut) {
        local = 0.0;
        any = false;
        for (int i = i0; i < i1; i++) {
            const float v = l[i];
            if (fkey(v) >= K) { local += escore(v, invt, zmax); any = true; }
        }
    }
    const int lane = tid & 31, warp = tid >> 5;
    double incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) sh.red[warp] = incl;
    if (tid == 0) sh.best = 0x7fffffff;
    __syncthreads();
    double wprefix = 0.0, total = 0.0;
    const int nw = blockDim.x >> 5;
#pragma unroll
    for (int w = 0; w < SEL_THREADS / 32; w++) {   // (unrolled: the loads are not each waited for in turn)
        if (w < nw) { const double t = sh.red[w]; if (w < warp) wprefix += t; total += t; }
    }
    const double x = uniform01(seed, (unsigned long long)rid, (unsigned long long)step) * total;
    const double run = wprefix + incl - local;
    // A thread whose segment keeps a token and ends above x walks it: its first kept token at which run + the e's so
    // far exceed x (the least such index of all walks is the token). A warp walks its walking lanes' segments
    // together, lowest lane first: 32 of a segment's e at once, then added to run in index order by every lane
    // (shuffled), so the sums are the one thread's serial sums, bit for bit, without its 50 exp in turn.
    unsigned walkers = __ballot_sync(FULL, any && run + local > x);
    while (walkers) {
        const int src = __ffs(walkers) - 1;
        double r = __shfl_sync(FULL, run, src);
        const int s0 = __shfl_sync(FULL, i0, src), s1 = __shfl_sync(FULL, i1, src);
        int found = -1;
        for (int base = s0; base < s1 && found < 0; base += 32) {
            const int i = base + lane;
            double e = 0.0;
            bool kept = false;
            if (i < s1) {
                const float v = l[i];
                kept = !cut || fkey(v) >= K;
                if (kept) e = escore(v, invt, zmax);
            }
            for (unsigned k = __ballot_sync(FULL, kept); k; k &= k - 1) {
                const int j = __ffs(k) - 1;
                r += __shfl_sync(FULL, e, j);
                if (r > x) { found = base + j; break; }
            }
        }
        if (found >= 0) {
            if (lane == 0) atomicMin(&sh.best, found);
            break;
        }
        walkers &= walkers - 1;
    }
    __syncthreads();
    if (tid == 0) *out_r = sh.best == 0x7fffffff ? V - 1 : sh.best;
}

// ---------------------------------------------------------------------------------------------------------
// Rule 6 (model/sampling.py tempered_pick): a row sampled with a temperature alone. Each warp takes four chunks of
// TCHUNK columns at a time, eight lanes a chunk, lane a of the eight holding its group a (columns 64 j + 8 a .. + 7:
// two 16-byte loads where the row is aligned; a warp reads 1 KB in a row). The twin's operations in the twin's order
// (common.cuh's tempered_*, shared with the LM head's EPI_TEMPERED epilogue; the sums C_a one group after another,
// read through shuffles) give each chunk its Gumbel-perturbed log-mass and the column it would pick; the block's
// largest perturbed chunk wins. The row is read once, and a lane's steps are few and independent of the other
// chunks' (benchmarks/RESULTS.md: the walk of rules 2-5 was issue-bound; a warp a chunk latency-bound; a thread a
// chunk thrashed the L1).
__device__ __forceinline__ bool plain_row(double temperature, int top_k, double top_p, int V) {
    return temperature > 0.0 && !(top_k > 0 && top_k < V) && !(top_p > 0.0 && top_p < 1.0);
}
// columns c..c+7 of the row (-inf past V): two 16-byte loads where the row allows (vec: 16-byte aligned)
__device__ __forceinline__ void load_group(const float* l, int V, int c, bool vec, float (&v)[8]) {
    if (vec && c + 8 <= V) {
        const float4 x = *reinterpret_cast<const float4*>(l + c), y = *reinterpret_cast<const float4*>(l + c + 4);
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w; v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = c + k < V ? l[c + k] : -INFINITY;
    }
}
__device__ void tempered_row(const float* l, int V, double temperature, unsigned long long seed, long long rid,
                             int step, int* out_r, float* sv, int* si)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int a = lane & 7, lead = lane & ~7;    // this lane's group; the chunk's first lane
    const int n = (V + TCHUNK - 1) / TCHUNK, per = 4 * nw;   // chunks; chunks the block takes at a time
    const float invt = (float)(1.0 / temperature);
    const unsigned key = tempered_key(seed, (unsigned long long)rid, (unsigned long long)step);
    const bool vec = ((size_t)l & 15) == 0;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    float v[8];
    int j = 4 * warp + (lane >> 3);
    load_group(l, V, j * TCHUNK + 8 * a, vec, v);
    for (int j0 = 4 * warp; j0 < n; j0 += per, j += per) {   // (the same trip count in every lane of the warp)
        float z[8], m = -INFINITY;
#pragma unroll
        for (int k = 0; k < 8; k++) { z[k] = __fmul_rn(v[k], invt); m = fmaxf(m, z[k]); }
        load_group(l, V, (j + per) * TCHUNK + 8 * a, vec, v);   // the next chunk, in flight meanwhile
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
        const bool live = j < n;
        if (!live) m = 0.f;   // (a chunk past the row: all -inf; nothing below is kept)
        float e[8];
#pragma unroll
        for (int k = 0; k < 8; k++) e[k] = tempered_e(z[k], m);
        const float G = tempered_group(__fadd_rn(e[0], e[1]), __fadd_rn(e[2], e[3]), __fadd_rn(e[4], e[5]),
                                       __fadd_rn(e[6], e[7]));
        float C = 0.f, before = 0.f, mine = 0.f;   // C_a = G_0 + ... + G_a added in turn, in all 8 lanes alike
#pragma unroll
        for (int b = 0; b < 8; b++) {
            if (b == a) before = C;
            C = __fadd_rn(C, __shfl_sync(FULL, G, lead + b));
            if (b == a) mine = C;
        }
        float t;
        const float val = tempered_chunk(key, j, m, C, t);
        // the group it picks: the first whose C_a exceeds t, else the last with G_a > 0; in it, from C_(a-1), the
        // e's added in column order: the first column where the sum exceeds t, else its last with e > 0
        const unsigned hit = (__ballot_sync(FULL, mine > t) >> lead) & 0xffu;
        const unsigned pos = (__ballot_sync(FULL, G > 0.f) >> lead) & 0xffu;
        int pick = -1, last = 0;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            before = __fadd_rn(before, e[k]);
            if (e[k] > 0.f) last = k;
            if (pick < 0 && before > t) pick = k;
        }
        const int ga = hit ? __ffs(hit) - 1 : 31 - __clz(pos | 1u);
        pick = __shfl_sync(FULL, pick < 0 ? last : pick, lead + ga);
        if (live && val > best) {   // (a lane's chunks in increasing order: a tie keeps the lower one)
            best = val;
            bi = j * TCHUNK + 8 * ga + pick;
        }
    }
    block_argmax_merge(best, bi, out_r, sv, si);
}

// A row of logits into shared memory (a sampled row reads its logits a few times over), read with row_visit.
// Returns this thread's part of the row's {maximum, minimum} (sample_block's first pass, taken while loading).
__device__ float2 load_row(float* dst, const float* src, int V)
{
    float mx = -INFINITY, mn = INFINITY;
    row_visit(src, V, [&](int i, float v) { dst[i] = v; mx = fmaxf(mx, v); mn = fminf(mn, v); });
    __syncthreads();
    return make_float2(mx, mn);
}

// rows: int64 prompt row ids; the row id of logits row r is rows[seqidx[r]]. step_at: null, or where the step
// number is in device memory (then step is not used: a decode step replayed as a CUDA graph reads its step there).
// cache: the launch gave V floats of dynamic shared memory for the row.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
sample_rows(const float* __restrict__ logits, int ld, int V, const long long* __restrict__ rows,
            const int* __restrict__ seqidx, int step, const int* __restrict__ step_at, unsigned long long seed,
            double temperature, int top_k, double top_p, int cache, int* __restrict__ out, int R)
{
    pdl_wait();
    extern __shared__ float srow[];
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* l = logits + (size_t)r * ld;
    if (step_at != nullptr) step = *step_at;
    const long long rid = rows[seqidx ? seqidx[r] : r];
    if (plain_row(temperature, top_k, top_p, V)) {
        tempered_row(l, V, temperature, seed, rid, step, out + r, sv, si);
        return;
    }
    float2 mm = make_float2(0.0f, 0.0f);
    if (cache) { mm = load_row(srow, l, V); l = srow; }
    sample_block(l, V, rid, step, seed, temperature, top_k, top_p, out + r, mm, cache);
}

// Per-row settings (twin: model/sampling.py sample_rows_params): logits row r is sequence q = seqidx[r], with
// prompt row rows[q] and its own seed / temperature / top_k / top_p / penalty [q]; step_at as sample_rows'. First
// the repetition penalty (transformers' rule, float32) on the tokens the sequence has seen (seen: bitmap [slots,
// words], its row q - seq_base; null or penalty 1: none); then the argmax (temperature <= 0) or the sampling rules.
// A sampled row with cache (V floats of dynamic shared memory) is penalized in its shared copy; otherwise the
// penalty is written into the logits in place, and they are read back after the block's writes: not through
// __restrict__ / const (the read-only cache could serve stale values).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
sample_rows_params(float* logits, int ld, int V, const long long* __restrict__ rows, const int* __restrict__ seqidx,
                   int step, const int* __restrict__ step_at, const unsigned long long* __restrict__ seeds,
                   const double* __restrict__ temps, const int* __restrict__ top_ks, const double* __restrict__ top_ps,
                   const float* __restrict__ penalties, const unsigned* __restrict__ seen, int words, int seq_base,
                   int cache, int* __restrict__ out, int R)
{
    pdl_wait();
    extern __shared__ float srow[];
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    const int q = seqidx[r];
    const double temperature = temps[q];
    const bool plain = plain_row(temperature, top_ks[q], top_ps[q], V);   // rule 6: one read, in global memory
    float* l = logits + (size_t)r * ld;
    float2 mm = make_float2(0.0f, 0.0f);
    bool have_mm = false;   // mm is the row's as sample_block will read it (not after a penalty)
    if (cache && temperature > 0.0 && !plain) { mm = load_row(srow, l, V); l = srow; have_mm = true; }
    const float pen = penalties[q];
    if (seen != nullptr && pen != 1.0f) {
        have_mm = false;
        const unsigned* bits = seen + (size_t)(q - seq_base) * words;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            if ((bits[i >> 5] >> (i & 31)) & 1u) {
                const float v = l[i];
                l[i] = v < 0.0f ? v * pen : v / pen;
            }
        }
        __syncthreads();
    }
    const int st = step_at != nullptr ? *step_at : step;
    if (temperature <= 0.0) block_argmax(l, V, out + r, sv, si);
    else if (plain) tempered_row(l, V, temperature, seeds[q], rows[q], st, out + r, sv, si);
    else sample_block(l, V, rows[q], st, seeds[q], temperature, top_ks[q],
                      top_ps[q], out + r, mm, have_mm);
}

// The repetition penalty's seen tokens: sequence seq[i] (its bitmap row seq[i] - seq_base, words uint32 each)
// has seen token tok[i]; called with a group's prompt tokens before its prefill's selection, and with each decode
// step's input tokens (the previous step's output) before its selection (twin: model/sampling.py mark_seen).
extern "C" __global__ void mark_seen(const int* __restrict__ tok, const int* __restrict__ seq, int n, int seq_base,
                                     unsigned* __restrict__ bits, int words)
{
    pdl_wait();
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
    pdl_wait();
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
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[idx[i]];
}

// Rule 6's row parameters for the LM head's EPI_TEMPERED epilogue: out[r] = {key, float bits of 1 / T} of logits
// row r (sequence q = seqidx[r], prompt row rows[q]); 1 / T = 0 for a greedy row (T <= 0). The settings are the
// job's (seed, temperature) or, where seeds / temps are not null, each sequence's [q]; step_at as sample_rows'.
extern "C" __global__ void tempered_keys(const long long* __restrict__ rows, const int* __restrict__ seqidx, int step,
                                         const int* __restrict__ step_at, unsigned long long seed,
                                         const unsigned long long* __restrict__ seeds, double temperature,
                                         const double* __restrict__ temps, int2* __restrict__ out, int R)
{
    pdl_wait();
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const int q = seqidx[r];
    const double t = temps != nullptr ? temps[q] : temperature;
    const unsigned long long s = seeds != nullptr ? seeds[q] : seed;
    const int st = step_at != nullptr ? *step_at : step;
    const unsigned key = tempered_key(s, (unsigned long long)rows[q], (unsigned long long)st);
    out[r] = t > 0.0 ? make_int2((int)key, __float_as_int((float)(1.0 / t))) : make_int2(0, 0);
}
