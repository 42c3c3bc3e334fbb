// Hopper tensor-core matrix product (wgmma, sm_90a): same operands, epilogues and argument list as the
// templated kernels of gemm_f16.cu (C = epilogue(A[M,K] @ B[N,K]^T + bias), fp16 in, fp32 accumulation).
// Measured on H100 (benchmarks/kernels_bench.py): 336-438 TFLOP/s at M=131072 (55-60% of cuBLAS); variants with
// 4 stages / 1 wgmma batch in flight / 128x256 tiles (1 block per SM) were slower (250-410) and were removed.
// 128x128x64 block tile, 2 consumer warpgroups (each 64 rows x 128 columns, wgmma m64n128k16, accumulators in
// registers), 3-stage cp.async pipeline into 128-byte-swizzled shared memory (the layout wgmma's descriptors
// expect: 16-byte chunk c of row r at chunk c ^ (r & 7), 8-row groups 1024 bytes apart).
// Build: -gencode=arch=compute_90a,code=sm_90a.
#define GEMM_F16_PART 99   // helpers of gemm_f16.cu only, none of its kernels
#include "gemm_f16.cu"

#define WG_BM 128
#define WG_BN 128
#define WG_BK 64
#define WG_ST 3

__device__ __forceinline__ unsigned long long wg_desc(const void* smem) {
    const unsigned long long a = (unsigned long long)__cvta_generic_to_shared(smem);
    unsigned long long d = (a & 0x3FFFFull) >> 4;          // start address
    d |= (unsigned long long)1 << 16;                      // leading byte offset (unused for swizzled K-major)
    d |= (unsigned long long)(1024 >> 4) << 32;            // stride byte offset: 8 rows x 128 B
    d |= (unsigned long long)1 << 62;                      // 128-byte swizzle
    return d;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// keeps the compiler from touching the accumulators across the asynchronous wgmma (CUTLASS's fence_operand)
template <int NREG = 64> __device__ __forceinline__ void wg_fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < NREG; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d[64] += A(64x16, desc a) * B(128x16, desc b)^T
__device__ __forceinline__ void wgmma_m64n128k16(float* d, unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(1));
}

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
{ gemm_wgmma_impl<__half>(GEMM_F16_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) gemm_f16_wgmma_outf(GEMM_F16_ARGS(float))
{ gemm_wgmma_impl<float>(GEMM_F16_PASS); }
