// Tensor-core matrix product: C[M,N] (=|+=) epilogue(A[M,K] @ B[N,K]^T + bias), fp16 inputs, fp32 accumulation.
// A row-major [M,K] (lda), B row-major [N,K] (ldb: weights stored K-contiguous, i.e. transposed Conv1D),
// C row-major (ldc), out half or float. Needs K % 8 == 0, lda/ldb % 8 == 0, 16-byte aligned bases.
// 128x128x32 block tile, 8 warps (2x4, 64x32 per warp), mma.sync m16n8k16, ldmatrix, 3-stage cp.async.
#include "common.cuh"

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int sz = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// (row, 16-byte chunk) -> half offset in a [rows][32] tile; XOR swizzle makes ldmatrix conflict-free.
__device__ __forceinline__ int swz(int row, int chunk) { return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3); }

__device__ __forceinline__ void store2(float* p, float a, float b, bool both, bool vec, bool resid) {
    if (resid) { p[0] += a; if (both) p[1] += b; return; }
    if (both && vec) { *reinterpret_cast<float2*>(p) = make_float2(a, b); return; }
    p[0] = a; if (both) p[1] = b;
}
__device__ __forceinline__ void store2(__half* p, float a, float b, bool both, bool vec, bool resid) {
    if (both && vec) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b); return; }
    p[0] = __float2half_rn(a); if (both) p[1] = __float2half_rn(b);
}

template <typename OutT>
__device__ __forceinline__ void gemm_f16_impl(const __half* __restrict__ A, int lda, const __half* __restrict__ B, int ldb,
                                              OutT* __restrict__ C, int ldc, const float* __restrict__ bias,
                                              int M, int N, int K, int mode)
{
    __shared__ __align__(128) __half As[STAGES][BM * BK];
    __shared__ __align__(128) __half Bs[STAGES][BN * BK];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

    auto load_tile = [&](int stage, int k0) {
#pragma unroll
        for (int it = 0; it < 2; it++) {
            const int id = tid + it * 256, row = id >> 2, ch = id & 3;
            const int gk = k0 + ch * 8;
            const int gm = m0 + row;
            const bool va = gm < M && gk < K;
            cp_async16(&As[stage][swz(row, ch)], va ? (const void*)(A + (size_t)gm * lda + gk) : (const void*)A, va);
            const int gn = n0 + row;
            const bool vb = gn < N && gk < K;
            cp_async16(&Bs[stage][swz(row, ch)], vb ? (const void*)(B + (size_t)gn * ldb + gk) : (const void*)B, vb);
        }
    };

    const int nk = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) load_tile(s, s * BK);
        cp_async_commit();
    }
    for (int t = 0; t < nk; t++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int tn = t + STAGES - 1;
            if (tn < nk) load_tile(tn % STAGES, tn * BK);
            cp_async_commit();
        }
        const int st = t % STAGES;
        const __half* as = As[st];
        const __half* bs = Bs[st];
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            unsigned af[4][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const int row = wm * 64 + mi * 16 + (lane & 15);
                ldmatrix_x4(af[mi], &as[swz(row, ks * 2 + (lane >> 4))]);
            }
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                const int row = wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
                unsigned r[4];
                ldmatrix_x4(r, &bs[swz(row, ks * 2 + ((lane >> 3) & 1))]);
                bf[nj * 2][0] = r[0]; bf[nj * 2][1] = r[1];
                bf[nj * 2 + 1][0] = r[2]; bf[nj * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma16816(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();

    const bool resid = (mode == EPI_RESID);
    const bool vec = (ldc & 1) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int half_ = 0; half_ < 2; half_++) {
            const int row = m0 + wm * 64 + mi * 16 + (lane >> 2) + half_ * 8;
            if (row >= M) continue;
            OutT* crow = C + (size_t)row * ldc;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
                if (col >= N) continue;
                const bool both = col + 1 < N;
                float v0 = acc[mi][ni][half_ * 2 + 0], v1 = acc[mi][ni][half_ * 2 + 1];
                if (bias != nullptr) { v0 += bias[col]; if (both) v1 += bias[col + 1]; }
                if (!resid) { v0 = apply_act(v0, mode); v1 = apply_act(v1, mode); }
                store2(crow + col, v0, v1, both, vec, resid);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemm_f16_outh(const __half* A, int lda, const __half* B, int ldb, __half* C, int ldc, const float* bias,
              int M, int N, int K, int mode)
{
    gemm_f16_impl<__half>(A, lda, B, ldb, C, ldc, bias, M, N, K, mode);
}

extern "C" __global__ void __launch_bounds__(256)
gemm_f16_outf(const __half* A, int lda, const __half* B, int ldb, float* C, int ldc, const float* bias,
              int M, int N, int K, int mode)
{
    gemm_f16_impl<float>(A, lda, B, ldb, C, ldc, bias, M, N, K, mode);
}
