// Hopper tensor-core matrix product (wgmma, sm_90a): same operands, epilogues and argument list as the
// templated kernels of gemm_f16.cu (C = epilogue(A[M,K] @ B[N,K]^T + bias), fp16 in, fp32 accumulation).
// Speed against cuBLAS and the variants tried and dropped: benchmarks/RESULTS.md (Kernels).
// 128x128x64 block tile, 2 consumer warpgroups (each 64 rows x 128 columns, wgmma m64n128k16, accumulators in
// registers), 3-stage cp.async pipeline into 128-byte-swizzled shared memory (the layout wgmma's descriptors
// expect: 16-byte chunk c of row r at chunk c ^ (r & 7), 8-row groups 1024 bytes apart).
// Build: -gencode=arch=compute_90a,code=sm_90a.
#define GEMM_F16_PART 99   // helpers of gemm_f16.cu only, none of its kernels
#include "gemm_f16.cu"
#include "wgmma.cuh"

#define WG_BM 128
#define WG_BN 128
#define WG_BK 64
#define WG_ST 3

template <typename OutT>
__device__ __forceinline__ void gemm_wgmma_impl(GEMM_F16_ARGS(OutT))
{
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // 1024-byte alignment of every tile (the swizzle pattern repeats every 8 rows = 1024 B)
    __half* As = reinterpret_cast<__half*>(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __half* Bs = As + WG_ST * WG_BM * WG_BK;
    const int tid = threadIdx.x, warp = tid >> 5, wg = warp >> 2;
    const int m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * WG_BN;

    float acc[1][16][4];
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[0][j][r] = 0.f;

    auto load_tile = [&](int stage, int k0) {
        __half* as = As + stage * WG_BM * WG_BK;
        __half* bs = Bs + stage * WG_BN * WG_BK;
#pragma unroll
        for (int it = 0; it < WG_BM * 8 / 256; it++) {
            const int id = tid + it * 256, row = id >> 3, ch = id & 7;
            const int gk = k0 + ch * 8, gm = m0 + row;
            const bool va = gm < M && gk < K;
            cp_async16(&as[swz_t<64>(row, ch)], va ? (const void*)(A + (size_t)gm * lda + gk) : (const void*)A, va);
        }
#pragma unroll
        for (int it = 0; it < WG_BN * 8 / 256; it++) {
            const int id = tid + it * 256, row = id >> 3, ch = id & 7;
            const int gk = k0 + ch * 8, gn = n0 + row;
            const bool vb = gn < N && gk < K;
            cp_async16(&bs[swz_t<64>(row, ch)], vb ? (const void*)(B + (size_t)gn * ldb + gk) : (const void*)B, vb);
        }
    };

    const int nk = (K + WG_BK - 1) / WG_BK;
#pragma unroll
    for (int s = 0; s < WG_ST - 1; s++) {
        if (s < nk) load_tile(s, s * WG_BK);
        cp_async_commit();
    }
    for (int t = 0; t < nk; t++) {
        cp_async_wait<WG_ST - 2>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async writes -> async proxy
        __syncthreads();
        {
            const int tn = t + WG_ST - 1;
            if (tn < nk) load_tile(tn % WG_ST, tn * WG_BK);
            cp_async_commit();
        }
        const int st = t % WG_ST;
        const __half* as = As + st * WG_BM * WG_BK + wg * 64 * WG_BK;   // this warpgroup's 64 rows
        const __half* bs = Bs + st * WG_BN * WG_BK;
        wg_fence_acc(&acc[0][0][0]);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < WG_BK / 16; ks++)   // k16 step: +32 bytes inside the 128-byte swizzled rows
            wgmma_m64n128k16(&acc[0][0][0], wg_desc(as + ks * 16), wg_desc(bs + ks * 16));
        wg_commit();
        wg_wait0();
        wg_fence_acc(&acc[0][0][0]);
    }
    cp_async_wait<0>();
    gemm_f16_epilogue<1, 16, 128, OutT>(acc, m0 + wg * 64 + (warp & 3) * 16, n0, C, ldc, bias, M, N, mode, row_slot,
                                        row_pos, slot_base, S, kc, vc, kvC);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemm_f16_wgmma_outh(GEMM_F16_ARGS(__half))
{ pdl_wait(); gemm_wgmma_impl<__half>(GEMM_F16_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) gemm_f16_wgmma_outf(GEMM_F16_ARGS(float))
{ pdl_wait(); gemm_wgmma_impl<float>(GEMM_F16_PASS); }
