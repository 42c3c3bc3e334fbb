// Per-row kernels of the GPT-2 forward pass: embedding, layer norm, shared-prefix KV copies, the last layer's rows,
// causal attention (keys and values reach the cache from the QKV product's epilogue, EPI_QKV). NumPy twins:
// gpt2job.model.reference (embed, layer_norm, kv_copy, take_rows, attention), compared in tests/test_cuda_kernels.py.
// Suffix _f32: activations float; _f16: activations half (statistics and softmax always in fp32).
#include "common.cuh"

// x[r, :] = wte[tok[r], :] + wpe[pos[r], :]   (fp32 residual stream)
extern "C" __global__ void embed(const int* __restrict__ tok, const int* __restrict__ pos,
                                 const float* __restrict__ wte, const float* __restrict__ wpe,
                                 float* __restrict__ x, int R, int C)
{
    pdl_wait();
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* a = wte + (size_t)tok[r] * C;
    const float* b = wpe + (size_t)pos[r] * C;
    float* o = x + (size_t)r * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = a[c] + b[c];
}

// The fp16 products' weights from the float32 checkpoint, rounded on the GPU so that the host neither transposes
// nor converts (NumPy twin: reference.f16_weight). half_t: out[n, k] = half(w[k, n]), a [K, N] Conv1D weight as
// stored to the products' [N, K], through 32 x 32 tiles in shared memory (reads and writes coalesced); blocks of
// 256 threads, grid (ceil(N / 32), ceil(K / 32)). half_of: out[i] = half(a[i]) (the LM head, [V, C] as stored).
extern "C" __global__ void half_t(const float* __restrict__ w, __half* __restrict__ out, int K, int N)
{
    pdl_wait();
    __shared__ float t[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int n0 = blockIdx.x * 32, k0 = blockIdx.y * 32;
    for (int i = ty; i < 32; i += 8) {
        const int k = k0 + i, n = n0 + tx;
        if (k < K && n < N) t[i][tx] = w[(size_t)k * N + n];
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 8) {
        const int n = n0 + i, k = k0 + tx;
        if (n < N && k < K) out[(size_t)n * K + k] = __float2half_rn(t[tx][i]);
    }
}

extern "C" __global__ void half_of(const float* __restrict__ a, __half* __restrict__ out, unsigned long long n)
{
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(a[i]);
}

#define LN_NV 8   // fast path: C % 4 == 0 and C <= 1024
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__half* p, float a, float b, float c, float d) {
    __half2 h[2] = {__floats2half2_rn(a, b), __floats2half2_rn(c, d)};
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<uint2*>(h);
}

// One warp per row: out[r] = (x[in] - mean) / sqrt(var + eps) * w + b, in = rowidx ? rowidx[r] - idx_base : r.
// PREFETCH: the weight and bias loads are issued with the row's, so that a step of few rows does not wait for
// their latency again after the statistics (51 more registers: picked for a decode step's rows only,
// Kernels.layernorm). The same arithmetic either way.
template <typename OutT, bool PREFETCH>
__device__ __forceinline__ void layernorm_impl(const float* __restrict__ x, const int* __restrict__ rowidx, int idx_base,
                                               const float* __restrict__ w, const float* __restrict__ b,
                                               OutT* __restrict__ out, int R, int C, float eps)
{
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const int in = rowidx ? rowidx[r] - idx_base : r;
    const float* xr = x + (size_t)in * C;
    OutT* o = out + (size_t)r * C;
    if ((C & 3) == 0 && C <= 32 * 4 * LN_NV) {
        // fast path: the row held in registers (16-byte loads), two-pass statistics from registers
        const int C4 = C >> 2;
        constexpr int NW = PREFETCH ? LN_NV : 1;
        float4 v[LN_NV], ww[NW], bb[NW];
        const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < LN_NV; i++) {
            const int c4 = lane + 32 * i;
            v[i] = c4 < C4 ? reinterpret_cast<const float4*>(xr)[c4] : zero;
            if constexpr (PREFETCH) {
                ww[i] = c4 < C4 ? reinterpret_cast<const float4*>(w)[c4] : zero;
                bb[i] = c4 < C4 ? reinterpret_cast<const float4*>(b)[c4] : zero;
            }
        }
#pragma unroll
        for (int i = 0; i < LN_NV; i++) s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
        const float mean = warp_sum(s) / (float)C;
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < LN_NV; i++) {
            if (lane + 32 * i < C4) {
                const float a = v[i].x - mean, b_ = v[i].y - mean, c = v[i].z - mean, d = v[i].w - mean;
                q += (a * a + b_ * b_) + (c * c + d * d);
            }
        }
        const float var = warp_sum(q) / (float)C;
        const float den = sqrtf(var + eps);
#pragma unroll
        for (int i = 0; i < LN_NV; i++) {
            const int c4 = lane + 32 * i;
            if (c4 < C4) {
                float4 wi, bi;
                if constexpr (PREFETCH) { wi = ww[i]; bi = bb[i]; }
                else { wi = reinterpret_cast<const float4*>(w)[c4]; bi = reinterpret_cast<const float4*>(b)[c4]; }
                store4(o + 4 * c4, (v[i].x - mean) / den * wi.x + bi.x, (v[i].y - mean) / den * wi.y + bi.y,
                       (v[i].z - mean) / den * wi.z + bi.z, (v[i].w - mean) / den * wi.w + bi.w);
            }
        }
        return;
    }
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const float mean = warp_sum(s) / (float)C;
    float q = 0.f;
    for (int c = lane; c < C; c += 32) { float d = xr[c] - mean; q += d * d; }
    const float var = warp_sum(q) / (float)C;
    const float den = sqrtf(var + eps);
    for (int c = lane; c < C; c += 32) o[c] = from_f<OutT>((xr[c] - mean) / den * w[c] + b[c]);
}

#define DEF_LAYERNORM(NAME, OutT, PREFETCH)                                                                    \
    extern "C" __global__ void NAME(const float* x, const int* rowidx, int idx_base, const float* w, const float* b, \
                                    OutT* out, int R, int C, float eps)                                         \
    { pdl_wait(); layernorm_impl<OutT, PREFETCH>(x, rowidx, idx_base, w, b, out, R, C, eps); }
DEF_LAYERNORM(layernorm_f32, float, false)
DEF_LAYERNORM(layernorm_f16, __half, false)
DEF_LAYERNORM(layernorm_prefetch_f32, float, true)
DEF_LAYERNORM(layernorm_prefetch_f16, __half, true)

// Shared prompt prefixes (gpt2job/backends/cuda/prefix_share.py): for each entry {dst, src, pos} of ent [n, 3],
// copy the key and value rows at position pos of cache slot src - slot_base into slot dst - slot_base (kc, vc:
// [slots, S, C]); a source row is never a destination. One block per entry. NumPy twin:
// gpt2job.model.reference.kv_copy.
template <typename T>
__device__ __forceinline__ void kv_copy_impl(const int* __restrict__ ent, int n, int slot_base, T* kc, T* vc, int S,
                                             int C)
{
    const int e = blockIdx.x;
    if (e >= n) return;
    const size_t dst = ((size_t)(ent[3 * e] - slot_base) * S + ent[3 * e + 2]) * C;
    const size_t src = ((size_t)(ent[3 * e + 1] - slot_base) * S + ent[3 * e + 2]) * C;
    if ((C * sizeof(T)) % 16 == 0) {   // rows start 16-byte aligned: copy 16 bytes at a time
        const int nv = (int)(C * sizeof(T) / 16);
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            reinterpret_cast<uint4*>(kc + dst)[i] = reinterpret_cast<const uint4*>(kc + src)[i];
            reinterpret_cast<uint4*>(vc + dst)[i] = reinterpret_cast<const uint4*>(vc + src)[i];
        }
    } else {
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            kc[dst + c] = kc[src + c];
            vc[dst + c] = vc[src + c];
        }
    }
}

extern "C" __global__ void kv_copy_f32(const int* ent, int n, int slot_base, float* kc, float* vc, int S, int C)
{ pdl_wait(); kv_copy_impl<float>(ent, n, slot_base, kc, vc, S, C); }

extern "C" __global__ void kv_copy_f16(const int* ent, int n, int slot_base, __half* kc, __half* vc, int S, int C)
{ pdl_wait(); kv_copy_impl<__half>(ent, n, slot_base, kc, vc, S, C); }

// The rows the last layer still computes (Model.forward's `heads`): dst row i = src row idx[i] - idx_base (idx
// NULL: src row i), `width` 4-byte words a row, row strides in words. One block per row. NumPy twin:
// gpt2job.model.reference.take_rows.
extern "C" __global__ void take_rows(const int* __restrict__ idx, int idx_base, const unsigned* __restrict__ src,
                                     int src_ld, unsigned* __restrict__ dst, int dst_ld, int width, int n)
{
    pdl_wait();
    const int i = blockIdx.x;
    if (i >= n) return;
    const unsigned* s = src + (size_t)(idx ? idx[i] - idx_base : i) * src_ld;
    unsigned* d = dst + (size_t)i * dst_ld;
    for (int c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
}

// Causal attention over the cache, one warp per (query row r, head h); ragged: each row carries its own
// slot and absolute position p and sees keys 0..p of its slot. Online softmax over 32-key tiles,
// lane j scores key j of the tile; each lane accumulates output dims lane + 32 i. D <= 128.
#define ATT_WARPS 4
// q (shared, fp32) . k (one cache row), accumulated in order d = 0..D-1; 16-byte loads where aligned.
__device__ __forceinline__ float dot_row(const float* q, const float* k, int D) {
    float dot = 0.f;
    if ((D & 3) == 0) {
        const float4* k4 = reinterpret_cast<const float4*>(k);
        for (int i = 0; i < (D >> 2); i++) {
            const float4 v = k4[i];
            dot = fmaf(q[4 * i], v.x, dot); dot = fmaf(q[4 * i + 1], v.y, dot);
            dot = fmaf(q[4 * i + 2], v.z, dot); dot = fmaf(q[4 * i + 3], v.w, dot);
        }
        return dot;
    }
    for (int d = 0; d < D; d++) dot = fmaf(q[d], k[d], dot);
    return dot;
}
__device__ __forceinline__ float dot_row(const float* q, const __half* k, int D) {
    float dot = 0.f;
    if ((D & 7) == 0) {
        const uint4* k8 = reinterpret_cast<const uint4*>(k);
        for (int i = 0; i < (D >> 3); i++) {
            uint4 v = k8[i];
            const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 f = __half22float2(h[j]);
                dot = fmaf(q[8 * i + 2 * j], f.x, dot); dot = fmaf(q[8 * i + 2 * j + 1], f.y, dot);
            }
        }
        return dot;
    }
    for (int d = 0; d < D; d++) dot = fmaf(q[d], __half2float(k[d]), dot);
    return dot;
}
__device__ __forceinline__ float2 load2f(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2f(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
template <typename T>
__device__ __forceinline__ void attention_impl(const T* __restrict__ qkv, const T* __restrict__ kc, const T* __restrict__ vc,
                                               const int* __restrict__ row_slot, int slot_base, const int* __restrict__ row_pos,
                                               T* __restrict__ out, int R, int H, int D, int S, float scale)
{
    __shared__ float qs[ATT_WARPS][128];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gw = blockIdx.x * ATT_WARPS + warp;
    const int r = gw / H, h = gw - r * H;
    if (r >= R) return;
    const int C = H * D;
    const bool pairs = (D & 1) == 0;   // C even too: 4-byte (half) / 8-byte (float) aligned pair loads
    const int p = row_pos[r];
    const size_t base = (size_t)(row_slot[r] - slot_base) * S * C + (size_t)h * D;
    const T* q = qkv + (size_t)r * 3 * C + (size_t)h * D;
    for (int d = lane; d < D; d += 32) qs[warp][d] = to_f(q[d]);
    __syncwarp();
    float m = -INFINITY, l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; j0 <= p; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j <= p) {
            s = dot_row(qs[warp], kc + base + (size_t)j * C, D) * scale;
        }
        const float mt = warp_max(s);
        const float mn = fmaxf(m, mt);
        const float corr = expf(m - mn);
        const float e = expf(s - mn);
        l = l * corr + warp_sum(e);
#pragma unroll
        for (int i = 0; i < 4; i++) acc[i] *= corr;
        m = mn;
        const int nj = min(32, p - j0 + 1);
        if (pairs) {   // lane owns dims 2 lane + 64 i, i < 2 (pair loads, 4 keys in flight)
#pragma unroll 4
            for (int jj = 0; jj < nj; jj++) {
                const float pj = __shfl_sync(0xffffffffu, e, jj);
                const T* vr = vc + base + (size_t)(j0 + jj) * C;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int d = 2 * lane + 64 * i;
                    if (d < D) {
                        const float2 f = load2f(vr + d);
                        acc[2 * i] = fmaf(pj, f.x, acc[2 * i]);
                        acc[2 * i + 1] = fmaf(pj, f.y, acc[2 * i + 1]);
                    }
                }
            }
        } else {
            for (int jj = 0; jj < nj; jj++) {
                const float pj = __shfl_sync(0xffffffffu, e, jj);
                const T* vr = vc + base + (size_t)(j0 + jj) * C;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int d = lane + 32 * i;
                    if (d < D) acc[i] = fmaf(pj, to_f(vr[d]), acc[i]);
                }
            }
        }
    }
    T* o = out + (size_t)r * C + (size_t)h * D;
    const float inv = 1.f / l;
    if (pairs) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int d = 2 * lane + 64 * i;
            if (d < D) { o[d] = from_f<T>(acc[2 * i] * inv); o[d + 1] = from_f<T>(acc[2 * i + 1] * inv); }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = from_f<T>(acc[i] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f32(const float* qkv, const float* kc, const float* vc, const int* row_slot, int slot_base,
              const int* row_pos, float* out, int R, int H, int D, int S, float scale)
{ pdl_wait(); attention_impl<float>(qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale); }

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f16(const __half* qkv, const __half* kc, const __half* vc, const int* row_slot, int slot_base,
              const int* row_pos, __half* out, int R, int H, int D, int S, float scale)
{ pdl_wait(); attention_impl<__half>(qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale); }

// Grouped variant (D % 8 == 0, D / 8 a power of two dividing 32, i.e. D in {8, 16, 32, 64, 128}): one warp per
// (row, head), split into G = 256 / D groups of D / 8 lanes; lane li of a group owns dims 8 li .. 8 li + 7
// (16-byte loads of q, k, v). Group g walks keys g, g + G, ... with its own online softmax (running max m,
// sum l, accumulator acc); the groups merge at the end through shuffles. Every lane works on every key
// step, and the K and V rows are read coalesced.
__device__ __forceinline__ void load8f(const float* p, float* f) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8f(const __half* p, float* f) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int j = 0; j < 4; j++) { const float2 t = __half22float2(h[j]); f[2 * j] = t.x; f[2 * j + 1] = t.y; }
}
// 8 elements as loaded (16 bytes of fp16, 32 of fp32), converted to float only when used (unpack8f)
template <typename T> struct Raw8;
template <> struct Raw8<__half> { uint4 v; };
template <> struct Raw8<float> { float4 a, b; };
__device__ __forceinline__ void load_raw(const __half* p, Raw8<__half>& r) { r.v = *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void load_raw(const float* p, Raw8<float>& r) {
    r.a = reinterpret_cast<const float4*>(p)[0];
    r.b = reinterpret_cast<const float4*>(p)[1];
}
__device__ __forceinline__ void unpack8f(const Raw8<__half>& r, float* f) { load8f(reinterpret_cast<const __half*>(&r.v), f); }
__device__ __forceinline__ void unpack8f(const Raw8<float>& r, float* f) {
    f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w; f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
}
__device__ __forceinline__ void store8(float* p, const float* f) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ void store8(__half* p, const float* f) {
    __half2 h[4];
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
}

// KEYS: key steps of a group whose loads are issued together (1, 4 or 8, see the loop)
template <typename T, int KEYS, bool AHEAD = false>
__device__ __forceinline__ void attention_grouped_impl(const T* __restrict__ qkv, const T* __restrict__ kc,
                                                       const T* __restrict__ vc, const int* __restrict__ row_slot,
                                                       int slot_base, const int* __restrict__ row_pos,
                                                       T* __restrict__ out, int R, int H, int D, int S, float scale)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gw = blockIdx.x * ATT_WARPS + warp;
    const int r = gw / H, h = gw - r * H;
    if (r >= R) return;
    const int C = H * D;
    const int LPG = D >> 3, G = 32 / LPG;
    const int g = lane / LPG, d0 = (lane - g * LPG) * 8;
    const int p = row_pos[r];
    const size_t base = (size_t)(row_slot[r] - slot_base) * S * C + (size_t)h * D + d0;
    // key j at base + j * C: j * C in 32 bits (j <= p < S <= n_positions; it fits), which keeps the long fp16 kernel at
    // 80 registers with nothing spilled (94 with 64-bit products: benchmarks/RESULTS.md)
    float q[8], acc[8];
    load8f(qkv + (size_t)r * 3 * C + (size_t)h * D + d0, q);
#pragma unroll
    for (int i = 0; i < 8; i++) { q[i] *= scale; acc[i] = 0.f; }
    float m = -INFINITY, l = 0.f;
    // keys j = g + G t, in that order; all lanes of the warp run the same number of iterations (shuffles stay
    // converged). KEYS > 1: the keys and values of KEYS steps are loaded before any of them is used, as raw 16-byte
    // words (fewer registers than floats): more loads of a warp in flight, which long contexts need to keep the
    // memory busy (KEYS 4: 94 registers). KEYS 1: each step loads and then uses its key (55 registers, more warps an
    // SM): faster on short contexts, where the steps past the last key and fewer warps cost more than that gains.
    // KEYS 3 (fp16, caches under 128 positions): three steps' loads in flight at 71 registers (7 blocks an SM, KEYS 1
    // has 9): W1's 6 steps a group in two rounds (whole W1 steps a bit shorter than KEYS 2: RESULTS.md).
    // KEYS 8 (fp16): 8 steps a round (a 64-dim head's first 32 positions in one), for steps whose warps fit on the
    // SMs at once. AHEAD (fp16, KEYS 8): a round's steps run while the next round's loads are in flight (168
    // registers: 3 blocks an SM), for steps whose warps fit on the SMs at that occupancy (benchmarks/RESULTS.md).
    const int nit = (p + G) / G;
    auto step = [&](bool ok, const float* kf, const float* vf) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) s = fmaf(q[i], ok ? kf[i] : 0.f, s);
        for (int o = 1; o < LPG; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (ok) {
            const float mn = fmaxf(m, s);
            const float corr = expf(m - mn);   // m = -inf at the first key: corr = 0
            const float e = expf(s - mn);
            l = l * corr + e;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = fmaf(e, vf[i], acc[i] * corr);
            m = mn;
        }
    };
    if constexpr (KEYS == 1) {
#pragma unroll 2
        for (int t = 0; t < nit; t++) {
            const int j = g + G * t;
            const bool ok = j <= p;
            float kf[8], vf[8];
            if (ok) {
                load8f(kc + base + j * C, kf);
                load8f(vc + base + j * C, vf);
            }
            step(ok, kf, vf);
        }
    } else {   // rounds of KEYS steps whose loads are issued together
        auto load_round = [&](int t0, Raw8<T>* kr, Raw8<T>* vr) {
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                const int j = g + G * (t0 + u);
                if (j <= p) {
                    load_raw(kc + base + j * C, kr[u]);
                    load_raw(vc + base + j * C, vr[u]);
                }
            }
        };
        auto run_round = [&](int t0, const Raw8<T>* kr, const Raw8<T>* vr) {
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                float kf[8], vf[8];
                unpack8f(kr[u], kf);
                unpack8f(vr[u], vf);
                step(g + G * (t0 + u) <= p, kf, vf);   // false past step nit - 1 for every lane
            }
        };
        Raw8<T> kn[KEYS], vn[KEYS];   // AHEAD: the next round's words, loaded before this round's steps run
        if constexpr (AHEAD) load_round(0, kn, vn);
        for (int t0 = 0; t0 < nit; t0 += KEYS) {
            Raw8<T> kr[KEYS], vr[KEYS];
            if constexpr (AHEAD) {
#pragma unroll
                for (int u = 0; u < KEYS; u++) { kr[u] = kn[u]; vr[u] = vn[u]; }
                load_round(t0 + KEYS, kn, vn);
            } else {
                load_round(t0, kr, vr);
            }
            run_round(t0, kr, vr);
        }
    }
    // merge the groups: lanes lane and lane ^ o (o >= LPG) hold the same dims of different groups
    for (int o = LPG; o < 32; o <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
        const float mn = fmaxf(m, m2);
        const float c1 = (m == -INFINITY) ? 0.f : expf(m - mn);
        const float c2 = (m2 == -INFINITY) ? 0.f : expf(m2 - mn);
        l = l * c1 + l2 * c2;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float a2 = __shfl_xor_sync(0xffffffffu, acc[i], o);
            acc[i] = acc[i] * c1 + a2 * c2;
        }
        m = mn;
    }
    if (g == 0) {
        const float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= inv;
        store8(out + (size_t)r * C + (size_t)h * D + d0, acc);
    }
}

#define DEF_ATTENTION_GROUPED(NAME, T, KEYS, AHEAD)                                                            \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                               \
    NAME(const T* qkv, const T* kc, const T* vc, const int* row_slot, int slot_base, const int* row_pos, T* out, \
         int R, int H, int D, int S, float scale)                                                                \
    {                                                                                                          \
        pdl_wait();                                                                                            \
        attention_grouped_impl<T, KEYS, AHEAD>(qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale); \
    }
DEF_ATTENTION_GROUPED(attention_grouped_f32, float, 1, false)
DEF_ATTENTION_GROUPED(attention_grouped_f16, __half, 1, false)       // fp16: the tests' one-step form (not picked)
DEF_ATTENTION_GROUPED(attention_grouped_long_f32, float, 4, false)    // long contexts (Kernels.attention)
DEF_ATTENTION_GROUPED(attention_grouped_long_f16, __half, 4, false)
DEF_ATTENTION_GROUPED(attention_grouped_three_f16, __half, 3, false)  // short caches (Kernels.attention)
DEF_ATTENTION_GROUPED(attention_grouped_short_f16, __half, 8, false)  // steps of few warps an SM (Kernels.attention)
DEF_ATTENTION_GROUPED(attention_grouped_ahead_f16, __half, 8, true)   // steps of fewer still
