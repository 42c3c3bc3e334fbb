// Exact-mode matrix product: C[M,N] (=|+=) epilogue(A[M,K] @ B[K,N] + bias), plain FP32 FMA (no TF32).
// A row-major (lda), B row-major [K,N] (ldb, Conv1D layout), C row-major (ldc). Any M, N, K.
// 128x128 block tile, k-slices of 8 (gemm_f32) or 16 (gemm_f32_k16), 256 threads, 8x8 outputs per thread,
// double-buffered shared memory.
#include "common.cuh"

#define BM 128
#define BN 128

// r[0..3] = p[0..3], the first `left` of them in range (the rest 0); all 0 when !ok (p is not read then).
// vec: p is 16-byte aligned when ok, so four in range load as one float4.
__device__ __forceinline__ void load4_guarded(float* r, const float* p, bool ok, bool vec, int left) {
    if (ok) {
        if (vec && left > 3) {
            float4 q = *reinterpret_cast<const float4*>(p);
            r[0] = q.x; r[1] = q.y; r[2] = q.z; r[3] = q.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) r[i] = (i < left) ? p[i] : 0.f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) r[i] = 0.f;
    }
}

// BK_: k-slice per shared-memory stage (8 or 16; each thread loads BK_ / 8 float4 of A and of B per slice).
// Every output is summed over k in order 0..K-1 whatever BK_ is, so both give identical results.
template <int BK_>
__device__ __forceinline__ void gemm_f32_impl(const float* __restrict__ A, int lda, const float* __restrict__ B, int ldb,
         float* __restrict__ C, int ldc, const float* __restrict__ bias,
         int M, int N, int K, int mode, int vecA, int vecB, int vecC, int kps, float* __restrict__ ws,
         const int* __restrict__ row_slot, const int* __restrict__ row_pos, int slot_base, int S,
         float* __restrict__ kc, float* __restrict__ vc, int kvC)
{
    // mode 4 (EPI_QKV, no split-K): columns [kvC, 2 kvC) / [2 kvC, 3 kvC) go to the KV cache kc / vc
    // [slots, S, kvC] at (row_slot[row] - slot_base, row_pos[row]) instead of C.
    // split-K (gridDim.z > 1): block z takes k in [z kps, (z + 1) kps) and writes its raw sum to
    // ws + z M N ([M, N]); splitk_reduce_f32 then adds the slices in order and applies the epilogue.
    if (gridDim.z > 1) {
        const int kb = blockIdx.z * kps;
        A += kb;
        B += (size_t)kb * ldb;
        K = min(K - kb, kps);
        C = ws + (size_t)blockIdx.z * M * N;
        ldc = N;
        bias = nullptr;
        mode = EPI_BIAS;
        vecC = (N & 3) == 0;
        vecA = vecA && (kb & 3) == 0;
    }
    constexpr int NV = BK_ / 8;
    __shared__ __align__(16) float As[2][BK_][BM];
    __shared__ __align__(16) float Bs[2][BK_][BN];
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int a_row = tid >> 1, a_k = (tid & 1) * 4;
    const int b_k = tid >> 5, b_col = (tid & 31) * 4;
    const int tx = tid & 15, ty = tid >> 4;
    float ra[4 * NV], rb[4 * NV];
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.f;

    auto load = [&](int k0) {
#pragma unroll
        for (int v = 0; v < NV; v++) {
            const int gm = m0 + a_row, gk = k0 + a_k + 8 * v;
            load4_guarded(ra + 4 * v, A + (size_t)gm * lda + gk, gm < M, vecA, K - gk);
        }
#pragma unroll
        for (int v = 0; v < NV; v++) {
            const int bk = k0 + b_k + 8 * v, gn = n0 + b_col;
            load4_guarded(rb + 4 * v, B + (size_t)bk * ldb + gn, bk < K, vecB, N - gn);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int v = 0; v < NV; v++) {
#pragma unroll
            for (int i = 0; i < 4; i++) As[buf][a_k + 8 * v + i][a_row] = ra[4 * v + i];
            *reinterpret_cast<float4*>(&Bs[buf][b_k + 8 * v][b_col]) =
                make_float4(rb[4 * v], rb[4 * v + 1], rb[4 * v + 2], rb[4 * v + 3]);
        }
    };

    const int nk = (K + BK_ - 1) / BK_;
    load(0);
    store(0);
    __syncthreads();
    for (int t = 0; t < nk; t++) {
        const int cur = t & 1;
        if (t + 1 < nk) load((t + 1) * BK_);
#pragma unroll
        for (int kk = 0; kk < BK_; kk++) {
            float a[8], b[8];
            float4 v;
            v = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
            a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
            v = *reinterpret_cast<const float4*>(&As[cur][kk][64 + ty * 4]);
            a[4] = v.x; a[5] = v.y; a[6] = v.z; a[7] = v.w;
            v = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
            b[0] = v.x; b[1] = v.y; b[2] = v.z; b[3] = v.w;
            v = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
            b[4] = v.x; b[5] = v.y; b[6] = v.z; b[7] = v.w;
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (t + 1 < nk) store(cur ^ 1);
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (row >= M) continue;
        float* crow = C + (size_t)row * ldc;
        const size_t kvrow = (mode == 4) ? ((size_t)(row_slot[row] - slot_base) * S + row_pos[row]) * kvC : 0;
#pragma unroll
        for (int jh = 0; jh < 2; jh++) {
            const int col = n0 + jh * 64 + tx * 4;
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int cc = col + j;
                float bb = (bias != nullptr && cc < N) ? bias[cc] : 0.f;
                v[j] = acc[i][jh * 4 + j] + bb;
                if (mode != EPI_RESID) v[j] = apply_act(v[j], mode);
            }
            if (mode == 4) {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int cc = col + j;
                    if (cc < N) {
                        float* dst = cc < kvC ? crow + cc : (cc < 2 * kvC ? kc + kvrow + (cc - kvC)
                                                                          : vc + kvrow + (cc - 2 * kvC));
                        *dst = v[j];
                    }
                }
                continue;
            }
            if (vecC && col + 3 < N) {
                float4* p = reinterpret_cast<float4*>(crow + col);
                if (mode == EPI_RESID) {
                    float4 o = *p;
                    o.x += v[0]; o.y += v[1]; o.z += v[2]; o.w += v[3];
                    *p = o;
                } else {
                    *p = make_float4(v[0], v[1], v[2], v[3]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (col + j < N) {
                        if (mode == EPI_RESID) crow[col + j] += v[j];
                        else crow[col + j] = v[j];
                    }
                }
            }
        }
    }
}

#define GEMM_F32_ARGS const float* A, int lda, const float* B, int ldb, float* C, int ldc, const float* bias, int M, \
    int N, int K, int mode, int vecA, int vecB, int vecC, int kps, float* ws, const int* row_slot, const int* row_pos, \
    int slot_base, int S, float* kc, float* vc, int kvC
#define GEMM_F32_PASS A, lda, B, ldb, C, ldc, bias, M, N, K, mode, vecA, vecB, vecC, kps, ws, row_slot, row_pos, \
    slot_base, S, kc, vc, kvC
extern "C" __global__ void __launch_bounds__(256) gemm_f32(GEMM_F32_ARGS)
{ pdl_wait(); gemm_f32_impl<8>(GEMM_F32_PASS); }
extern "C" __global__ void __launch_bounds__(256) gemm_f32_k16(GEMM_F32_ARGS)
{ pdl_wait(); gemm_f32_impl<16>(GEMM_F32_PASS); }

// out = epilogue(sum_z ws[z] + bias) for the split-K path of gemm_f32 (slices added in z order).
extern "C" __global__ void splitk_reduce_f32(const float* __restrict__ ws, int nsplit, float* __restrict__ C, int ldc,
                                             const float* __restrict__ bias, int M, int N, int mode)
{
    pdl_wait();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)M * N) return;
    const int row = (int)(i / N), col = (int)(i - (size_t)row * N);
    float v = ws[i];
    for (int z = 1; z < nsplit; z++) v += ws[(size_t)z * M * N + i];
    if (bias != nullptr) v += bias[col];
    float* c = C + (size_t)row * ldc + col;
    if (mode == EPI_RESID) *c += v;
    else *c = apply_act(v, mode);
}
