// Per-row kernels of the GPT-2 forward pass: embedding, layer norm, KV-cache store, causal attention.
// NumPy twins: gpt2job.reference (embed, layer_norm, attention) and tests/test_cuda_kernels.py.
// Suffix _f32: activations float; _f16: activations half (statistics and softmax always in fp32).
#include "common.cuh"

// x[r, :] = wte[tok[r], :] + wpe[pos[r], :]   (fp32 residual stream)
extern "C" __global__ void embed(const int* __restrict__ tok, const int* __restrict__ pos,
                                 const float* __restrict__ wte, const float* __restrict__ wpe,
                                 float* __restrict__ x, int R, int C)
{
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* a = wte + (size_t)tok[r] * C;
    const float* b = wpe + (size_t)pos[r] * C;
    float* o = x + (size_t)r * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = a[c] + b[c];
}

// One warp per row: out[r] = (x[in] - mean) / sqrt(var + eps) * w + b, in = rowidx ? rowidx[r] - idx_base : r.
template <typename OutT>
__device__ __forceinline__ void layernorm_impl(const float* __restrict__ x, const int* __restrict__ rowidx, int idx_base,
                                               const float* __restrict__ w, const float* __restrict__ b,
                                               OutT* __restrict__ out, int R, int C, float eps)
{
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= R) return;
    const int in = rowidx ? rowidx[r] - idx_base : r;
    const float* xr = x + (size_t)in * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const float mean = warp_sum(s) / (float)C;
    float q = 0.f;
    for (int c = lane; c < C; c += 32) { float d = xr[c] - mean; q += d * d; }
    const float var = warp_sum(q) / (float)C;
    const float den = sqrtf(var + eps);
    OutT* o = out + (size_t)r * C;
    for (int c = lane; c < C; c += 32) o[c] = from_f<OutT>((xr[c] - mean) / den * w[c] + b[c]);
}

extern "C" __global__ void layernorm_f32(const float* x, const int* rowidx, int idx_base, const float* w, const float* b,
                                         float* out, int R, int C, float eps)
{ layernorm_impl<float>(x, rowidx, idx_base, w, b, out, R, C, eps); }

extern "C" __global__ void layernorm_f16(const float* x, const int* rowidx, int idx_base, const float* w, const float* b,
                                         __half* out, int R, int C, float eps)
{ layernorm_impl<__half>(x, rowidx, idx_base, w, b, out, R, C, eps); }

// Copy each row's key and value (columns C..2C and 2C..3C of qkv [R, 3C]) into the cache
// kc, vc: [slots, S, C] at (row_slot[r] - slot_base, row_pos[r]).
template <typename T>
__device__ __forceinline__ void kv_store_impl(const T* __restrict__ qkv, const int* __restrict__ row_slot, int slot_base,
                                              const int* __restrict__ row_pos, T* __restrict__ kc, T* __restrict__ vc,
                                              int R, int C, int S)
{
    const int r = blockIdx.x;
    if (r >= R) return;
    const size_t dst = ((size_t)(row_slot[r] - slot_base) * S + row_pos[r]) * C;
    const T* src = qkv + (size_t)r * 3 * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        kc[dst + c] = src[C + c];
        vc[dst + c] = src[2 * C + c];
    }
}

extern "C" __global__ void kv_store_f32(const float* qkv, const int* row_slot, int slot_base, const int* row_pos,
                                        float* kc, float* vc, int R, int C, int S)
{ kv_store_impl<float>(qkv, row_slot, slot_base, row_pos, kc, vc, R, C, S); }

extern "C" __global__ void kv_store_f16(const __half* qkv, const int* row_slot, int slot_base, const int* row_pos,
                                        __half* kc, __half* vc, int R, int C, int S)
{ kv_store_impl<__half>(qkv, row_slot, slot_base, row_pos, kc, vc, R, C, S); }

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
    T* o = out + (size_t)r * C + (size_t)h * D;
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = from_f<T>(acc[i] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f32(const float* qkv, const float* kc, const float* vc, const int* row_slot, int slot_base,
              const int* row_pos, float* out, int R, int H, int D, int S, float scale)
{ attention_impl<float>(qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale); }

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f16(const __half* qkv, const __half* kc, const __half* vc, const int* row_slot, int slot_base,
              const int* row_pos, __half* out, int R, int H, int D, int S, float scale)
{ attention_impl<__half>(qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale); }

// Weight conversion helper: out[n, k] = half(in[k, n]) (Conv1D [K, N] fp32 -> K-contiguous fp16 [N, K]).
extern "C" __global__ void transpose_to_half(const float* __restrict__ in, __half* __restrict__ out, int K, int N)
{
    __shared__ float tile[32][33];
    const int k0 = blockIdx.y * 32, n0 = blockIdx.x * 32;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int k = k0 + i, n = n0 + threadIdx.x;
        tile[i][threadIdx.x] = (k < K && n < N) ? in[(size_t)k * N + n] : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int n = n0 + i, k = k0 + threadIdx.x;
        if (n < N && k < K) out[(size_t)n * K + k] = __float2half_rn(tile[threadIdx.x][i]);
    }
}
