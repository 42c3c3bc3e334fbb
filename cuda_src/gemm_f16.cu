// Tensor-core matrix product: C[M,N] (=|+=) epilogue(A[M,K] @ B[N,K]^T + bias), fp16 inputs, fp32 accumulation.
// A row-major [M,K] (lda), B row-major [N,K] (ldb: weights stored K-contiguous, i.e. transposed Conv1D),
// C row-major (ldc), out half or float. Needs K % 8 == 0, lda/ldb % 8 == 0, 16-byte aligned bases.
// mma.sync m16n8k16 tile variants with ldmatrix and a cp.async pipeline (below); GEMM_F16_PART 1..11 compiles
// one of them (each variant is a module of its own). The wgmma and TMA kernels (gemm_wgmma.cu, gemm_tma.cu)
// include this file with GEMM_F16_PART 99 for its helpers and the shared epilogue.
#include "common.cuh"
#include "mma.cuh"

__device__ __forceinline__ void store2(float* p, float a, float b, bool both, bool vec) {
    if (both && vec) { *reinterpret_cast<float2*>(p) = make_float2(a, b); return; }
    p[0] = a; if (both) p[1] = b;
}
__device__ __forceinline__ void store2(__half* p, float a, float b, bool both, bool vec) {
    if (both && vec) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b); return; }
    p[0] = __float2half_rn(a); if (both) p[1] = __float2half_rn(b);
}
// the pair p[0], p[1] (p[1] only when both) as float2; EPI_RESID reads the residual with it
__device__ __forceinline__ float2 load2(const float* p, bool both, bool vec) {
    if (both && vec) return *reinterpret_cast<const float2*>(p);
    return make_float2(p[0], both ? p[1] : 0.f);
}
__device__ __forceinline__ float2 load2(const __half* p, bool both, bool vec) {
    if (both && vec) return __half22float2(*reinterpret_cast<const __half2*>(p));
    return make_float2(__half2float(p[0]), both ? __half2float(p[1]) : 0.f);
}

// ---------------------------------------------------------------------------------------------------------
// Templated variants: BMxBN block tile, BK k-slice, WMxWN warp tile, ST-stage cp.async pipeline in dynamic
// shared memory (set MAX_DYNAMIC_SHARED_SIZE_BYTES before launch). Epilogues EPI_* of common.cuh, plus
// EPI_QKV: columns [0, kvC) go to C (the q part of the qkv buffer); columns [kvC, 2kvC) and [2kvC, 3kvC)
// (keys, values) go straight into the KV cache kc, vc [slots, S, kvC] at (row_slot[r] - slot_base, row_pos[r]).
#define EPI_QKV 4
#define EPI_ARGMAX 5   // out float only: per-chunk (max, argmax) partials, see below; reduce with argmax_partials
#define EPI_ARGMAX_LSE 6   // EPI_ARGMAX and each chunk's sum of exp(v - max): reduce with argmax_logprob_partials
#define EPI_TEMPERED 7     // sampling rule 6's partials per 64 columns (tempered_epilogue): reduce with argmax_partials
__device__ __forceinline__ bool argmax_mode(int mode) {
    return mode == EPI_ARGMAX || mode == EPI_ARGMAX_LSE || mode == EPI_TEMPERED;
}
template <typename T> struct kIsHalf { static constexpr bool value = false; };
template <> struct kIsHalf<__half> { static constexpr bool value = true; };

template <int BK_> __device__ __forceinline__ int swz_t(int row, int chunk) {
    if (BK_ == 128) return row * 128 + ((chunk ^ (row & 7)) << 3);
    if (BK_ == 64) return row * 64 + ((chunk ^ (row & 7)) << 3);
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
}

// EPI_TEMPERED: the fp16 LM head of rows sampled with a temperature alone (model/sampling.py rule 6), the logits never
// written: per (row, chunk of TCHUNK columns) a float2 {value, column bits} to C viewed as float2 [M, ldc] (ldc >=
// ceil(N / 64)); argmax_partials picks each row's. rp [M] int2: {key, float bits of 1 / T}; 1 / T = 0 for a greedy
// row, whose partials are EPI_ARGMAX's, per 64 columns (its largest logit and the lowest column holding it). A sampled
// row's partial is its chunk's value and the column its draw picks (common.cuh tempered_*): chunk c of the warp's
// columns is ni = 8 c .. 8 c + 7, group a = ni - 8 c, lane quad q holding its columns 8 a + 2 q, + 1; the quad's
// shuffles make the sums sampling.cu tempered_row makes, in its order, so both give a row the same token. No bias.
template <int MI, int NI>
__device__ __forceinline__ void tempered_epilogue(float (&acc)[MI][NI][4], int row0, int col0, float2* C, int ldc,
                                                  int M, int N, const int2* __restrict__ rp)
{
    if constexpr (NI % 8 != 0) {
        __trap();   // (never launched: Model.select takes EPI_TEMPERED only on tiles whose wn is a multiple of 64)
    } else {
        const int lane = threadIdx.x & 31, q = lane & 3, quad0 = lane & ~3;
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
#pragma unroll
            for (int half_ = 0; half_ < 2; half_++) {
                const int row = row0 + mi * 16 + (lane >> 2) + half_ * 8;
                const int2 p = row < M ? rp[row] : make_int2(0, 0);
                const float invt = __int_as_float(p.y);
                const bool greedy = !(invt > 0.f);
                const float sc = greedy ? 1.f : invt;
#pragma unroll
                for (int c = 0; c < NI / 8; c++) {
                    const int j = (col0 >> 6) + c, cc = col0 + TCHUNK * c + 2 * q;   // lane's column of group 0
                    float z[8][2], m = -INFINITY;
                    int first = 0x7fffffff;
#pragma unroll
                    for (int a = 0; a < 8; a++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const bool ok = cc + 8 * a + e < N;
                            z[a][e] = ok ? __fmul_rn(acc[mi][8 * c + a][half_ * 2 + e], sc) : -INFINITY;
                            if (ok && (z[a][e] > m || first == 0x7fffffff)) { m = z[a][e]; first = cc + 8 * a + e; }
                        }
#pragma unroll
                    for (int o = 1; o < 4; o <<= 1) {   // the chunk's largest z, its lowest column
                        const float om = __shfl_xor_sync(0xffffffffu, m, o);
                        const int of = __shfl_xor_sync(0xffffffffu, first, o);
                        if (of != 0x7fffffff && (first == 0x7fffffff || om > m || (om == m && of < first))) {
                            m = om; first = of;
                        }
                    }
                    const bool live = first != 0x7fffffff;   // (a chunk past N: nothing written)
                    const float mm = live ? m : 0.f;
                    float G[8], Cs[8], run = 0.f;
#pragma unroll
                    for (int a = 0; a < 8; a++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) z[a][e] = tempered_e(z[a][e], mm);   // z now holds e
                        const float pq = __fadd_rn(z[a][0], z[a][1]);
                        const float x1 = __fadd_rn(pq, __shfl_xor_sync(0xffffffffu, pq, 1));
                        G[a] = __fadd_rn(x1, __shfl_xor_sync(0xffffffffu, x1, 2));   // = tempered_group's bits
                        run = __fadd_rn(run, G[a]);
                        Cs[a] = run;
                    }
                    float t;
                    const float val = tempered_chunk((unsigned)p.x, j, mm, run, t);
                    int ga = -1, glast = 0;
                    float before = 0.f, blast = 0.f;
#pragma unroll
                    for (int a = 0; a < 8; a++) {
                        if (G[a] > 0.f) { glast = a; blast = a ? Cs[a - 1] : 0.f; }
                        if (ga < 0 && Cs[a] > t) { ga = a; before = a ? Cs[a - 1] : 0.f; }
                    }
                    if (ga < 0) { ga = glast; before = blast; }
                    float my0 = 0.f, my1 = 0.f;
#pragma unroll
                    for (int a = 0; a < 8; a++) if (a == ga) { my0 = z[a][0]; my1 = z[a][1]; }
                    int pick = -1, last = 0;
#pragma unroll
                    for (int k = 0; k < 8; k++) {   // column 8 ga + k: lane quad0 + k / 2, its e of column k % 2
                        const float ek = __shfl_sync(0xffffffffu, (k & 1) ? my1 : my0, quad0 + (k >> 1));
                        before = __fadd_rn(before, ek);
                        if (ek > 0.f) last = k;
                        if (pick < 0 && before > t) pick = k;
                    }
                    if (q == 0 && row < M && live) {
                        const int col = col0 + TCHUNK * c + 8 * ga + (pick < 0 ? last : pick);
                        C[(size_t)row * ldc + j] = greedy ? make_float2(m, __int_as_float(first))
                                                          : make_float2(val, __int_as_float(col));
                    }
                }
            }
        }
    }
}

// Epilogue shared by the templated mma.sync kernels and the wgmma kernel: acc[mi][ni][4] is the m16n8 fragment
// layout (this warp's rows row0 + 16 mi + lane / 4 (+ 8), columns col0 + 8 ni + 2 (lane % 4) (+ 1)).
template <int MI, int NI, int WN_, typename OutT>
__device__ __forceinline__ void gemm_f16_epilogue(float (&acc)[MI][NI][4], int row0, int col0, OutT* __restrict__ C,
                                                  int ldc, const float* __restrict__ bias, int M, int N, int mode,
                                                  const int* __restrict__ row_slot, const int* __restrict__ row_pos,
                                                  int slot_base, int S, __half* __restrict__ kc,
                                                  __half* __restrict__ vc, int kvC)
{
    const int lane = threadIdx.x & 31;
    if (mode == EPI_TEMPERED) {
        tempered_epilogue<MI, NI>(acc, row0, col0, reinterpret_cast<float2*>(C), ldc, M, N,
                                  reinterpret_cast<const int2*>(row_slot));
        return;
    }
    if (mode == EPI_ARGMAX || mode == EPI_ARGMAX_LSE) {
        // greedy LM head: per (row, WN-column chunk) the largest value and its lowest column, written as
        // float2 {value, int bits of column} to C viewed as float2 [M, ldc] (ldc = number of WN chunks);
        // EPI_ARGMAX_LSE (greedy --logprobs): float4 {value, column bits, sum over the chunk of exp(v - value), 0}
        // [M, ldc], the chunk's share of the row's softmax denominator
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
#pragma unroll
            for (int half_ = 0; half_ < 2; half_++) {
                const int row = row0 + mi * 16 + (lane >> 2) + half_ * 8;
                // this lane's value at (ni, e), bias added, and its column (both passes below walk them alike)
                auto value = [&](int ni, int e, int col) {
                    float v = acc[mi][ni][half_ * 2 + e];
                    if (bias != nullptr) v += bias[col];
                    return v;
                };
                auto column = [&](int ni, int e) { return col0 + ni * 8 + (lane & 3) * 2 + e; };
                float best = -INFINITY;
                int bi = 0x7fffffff;
#pragma unroll
                for (int ni = 0; ni < NI; ni++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = column(ni, e);
                        if (col < N) {
                            const float v = value(ni, e, col);
                            if (v > best || bi == 0x7fffffff) { best = v; bi = col; }
                        }
                    }
                }
#pragma unroll
                for (int o = 1; o < 4; o <<= 1) {   // the 4 lanes of a quad share the row
                    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
                    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                    if (oi != 0x7fffffff && (bi == 0x7fffffff || ov > best || (ov == best && oi < bi))) {
                        best = ov; bi = oi;
                    }
                }
                const int chunk = col0 / WN_;
                if (mode == EPI_ARGMAX_LSE) {   // every lane of the quad holds the chunk's max now
                    float se = 0.f;
#pragma unroll
                    for (int ni = 0; ni < NI; ni++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int col = column(ni, e);
                            if (col < N) se += __expf(value(ni, e, col) - best);
                        }
                    }
                    se += __shfl_xor_sync(0xffffffffu, se, 1);
                    se += __shfl_xor_sync(0xffffffffu, se, 2);
                    if ((lane & 3) == 0 && row < M && bi != 0x7fffffff)
                        reinterpret_cast<float4*>(C)[(size_t)row * ldc + chunk] =
                            make_float4(best, __int_as_float(bi), se, 0.f);
                } else if ((lane & 3) == 0 && row < M && bi != 0x7fffffff) {
                    reinterpret_cast<float2*>(C)[(size_t)row * ldc + chunk] = make_float2(best, __int_as_float(bi));
                }
            }
        }
        return;
    }

    const bool resid = (mode == EPI_RESID);
    const bool qkvm = kIsHalf<OutT>::value && (mode == EPI_QKV);
    const bool vec = (ldc & 1) == 0;
    // Columns in groups of EG fragments: a group's bias (and, for EPI_RESID, the residual values of both row
    // halves) is loaded before any of its stores, so the loads overlap instead of each paying the full memory
    // latency behind the previous store (the compiler cannot move a load of C above a store to C).
    constexpr int EG = NI < 2 ? NI : 2;
    // EPI_QKV: the row's cache cell (slot * S + position; int: the cache holds far fewer than 2^31 cells)
    int kvrow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int half_ = 0; half_ < 2; half_++) {
            const int row = row0 + mi * 16 + (lane >> 2) + half_ * 8;
            kvrow[mi][half_] = (qkvm && row < M) ? (row_slot[row] - slot_base) * S + row_pos[row] : 0;
        }
#pragma unroll
    for (int g = 0; g < NI; g += EG) {
        float2 bv[EG];
#pragma unroll
        for (int e = 0; e < EG; e++) {
            const int col = col0 + (g + e) * 8 + (lane & 3) * 2;
            bv[e] = make_float2(0.f, 0.f);
            if (bias != nullptr && col < N) { bv[e].x = bias[col]; if (col + 1 < N) bv[e].y = bias[col + 1]; }
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            float2 old[2][EG];
            if (resid) {
#pragma unroll
                for (int half_ = 0; half_ < 2; half_++) {
                    const int row = row0 + mi * 16 + (lane >> 2) + half_ * 8;
#pragma unroll
                    for (int e = 0; e < EG; e++) {
                        const int col = col0 + (g + e) * 8 + (lane & 3) * 2;
                        old[half_][e] = make_float2(0.f, 0.f);
                        if (row < M && col < N)
                            old[half_][e] = load2(C + (size_t)row * ldc + col, col + 1 < N, vec);
                    }
                }
            }
#pragma unroll
            for (int half_ = 0; half_ < 2; half_++) {
                const int row = row0 + mi * 16 + (lane >> 2) + half_ * 8;
                if (row >= M) continue;
                OutT* crow = C + (size_t)row * ldc;
                const size_t kvoff = (size_t)kvrow[mi][half_] * kvC;
#pragma unroll
                for (int e = 0; e < EG; e++) {
                    const int col = col0 + (g + e) * 8 + (lane & 3) * 2;
                    if (col >= N) continue;
                    const bool both = col + 1 < N;
                    float v0 = acc[mi][g + e][half_ * 2 + 0] + bv[e].x, v1 = acc[mi][g + e][half_ * 2 + 1] + bv[e].y;
                    if (qkvm) {
                        if (col >= kvC) {   // kvC even, col even: the pair never straddles q/k/v
                            __half* dst = (col < 2 * kvC) ? kc + kvoff + (col - kvC) : vc + kvoff + (col - 2 * kvC);
                            store2(dst, v0, v1, both, true);
                            continue;
                        }
                    } else if (resid) {
                        v0 += old[half_][e].x; v1 += old[half_][e].y;
                    } else {
                        v0 = apply_act_fast(v0, mode); v1 = apply_act_fast(v1, mode);
                    }
                    store2(crow + col, v0, v1, both, vec);
                }
            }
        }
    }
}

template <int BM_, int BN_, int BK_, int WM_, int WN_, int ST_, typename OutT>
__device__ __forceinline__ void gemm_f16_tmpl(const __half* __restrict__ A, int lda, const __half* __restrict__ B, int ldb,
                                              OutT* __restrict__ C, int ldc, const float* __restrict__ bias,
                                              int M, int N, int K, int mode,
                                              const int* __restrict__ row_slot, const int* __restrict__ row_pos,
                                              int slot_base, int S, __half* __restrict__ kc, __half* __restrict__ vc,
                                              int kvC)
{
    constexpr int NWN = BN_ / WN_;
    constexpr int THREADS = (BM_ / WM_) * NWN * 32;
    constexpr int MI = WM_ / 16, NI = WN_ / 8;
    constexpr int CH = BK_ / 8;   // 16-byte chunks per tile row
    static_assert(NI % 2 == 0, "WN multiple of 16");
    static_assert((BM_ * CH) % THREADS == 0 && (BN_ * CH) % THREADS == 0, "tile load split");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __half* As = reinterpret_cast<__half*>(smem_raw);
    __half* Bs = As + ST_ * BM_ * BK_;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / NWN, wn = warp % NWN;
    const int m0 = blockIdx.y * BM_, n0 = blockIdx.x * BN_;

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

    auto load_tile = [&](int stage, int k0) {
        __half* as = As + stage * BM_ * BK_;
        __half* bs = Bs + stage * BN_ * BK_;
#pragma unroll
        for (int it = 0; it < BM_ * CH / THREADS; it++) {
            const int id = tid + it * THREADS, row = id / CH, ch = id % CH;
            const int gk = k0 + ch * 8, gm = m0 + row;
            const bool va = gm < M && gk < K;
            cp_async16(&as[swz_t<BK_>(row, ch)], va ? (const void*)(A + (size_t)gm * lda + gk) : (const void*)A, va);
        }
#pragma unroll
        for (int it = 0; it < BN_ * CH / THREADS; it++) {
            const int id = tid + it * THREADS, row = id / CH, ch = id % CH;
            const int gk = k0 + ch * 8, gn = n0 + row;
            const bool vb = gn < N && gk < K;
            cp_async16(&bs[swz_t<BK_>(row, ch)], vb ? (const void*)(B + (size_t)gn * ldb + gk) : (const void*)B, vb);
        }
    };

    const int nk = (K + BK_ - 1) / BK_;
#pragma unroll
    for (int s = 0; s < ST_ - 1; s++) {
        if (s < nk) load_tile(s, s * BK_);
        cp_async_commit();
    }
    for (int t = 0; t < nk; t++) {
        cp_async_wait<ST_ - 2>();
        __syncthreads();
        {
            const int tn = t + ST_ - 1;
            if (tn < nk) load_tile(tn % ST_, tn * BK_);
            cp_async_commit();
        }
        const int st = t % ST_;
        const __half* as = As + st * BM_ * BK_;
        const __half* bs = Bs + st * BN_ * BK_;
#pragma unroll
        for (int ks = 0; ks < BK_ / 16; ks++) {
            unsigned af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const int row = wm * WM_ + mi * 16 + (lane & 15);
                ldmatrix_x4(af[mi], &as[swz_t<BK_>(row, ks * 2 + (lane >> 4))]);
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; nj++) {
                const int row = wn * WN_ + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
                unsigned r[4];
                ldmatrix_x4(r, &bs[swz_t<BK_>(row, ks * 2 + ((lane >> 3) & 1))]);
                bf[nj * 2][0] = r[0]; bf[nj * 2][1] = r[1];
                bf[nj * 2 + 1][0] = r[2]; bf[nj * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) mma16816(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();

    gemm_f16_epilogue<MI, NI, WN_, OutT>(acc, m0 + wm * WM_, n0 + wn * WN_, C, ldc, bias, M, N, mode, row_slot, row_pos,
                                          slot_base, S, kc, vc, kvC);
}

#define GEMM_F16_ARGS(OutT) const __half* A, int lda, const __half* B, int ldb, OutT* C, int ldc, const float* bias, \
    int M, int N, int K, int mode, const int* row_slot, const int* row_pos, int slot_base, int S, __half* kc,       \
    __half* vc, int kvC
#define GEMM_F16_PASS A, lda, B, ldb, C, ldc, bias, M, N, K, mode, row_slot, row_pos, slot_base, S, kc, vc, kvC
#define DEF_GEMM_F16(NAME, BM_, BN_, BK_, WM_, WN_, ST_, MINB)                                              \
    extern "C" __global__ void __launch_bounds__((BM_ / WM_) * (BN_ / WN_) * 32, MINB)                     \
    NAME##_outh(GEMM_F16_ARGS(__half))                                                                      \
    { pdl_wait(); gemm_f16_tmpl<BM_, BN_, BK_, WM_, WN_, ST_, __half>(GEMM_F16_PASS); }                      \
    extern "C" __global__ void __launch_bounds__((BM_ / WM_) * (BN_ / WN_) * 32, MINB)                     \
    NAME##_outf(GEMM_F16_ARGS(float))                                                                       \
    { pdl_wait(); gemm_f16_tmpl<BM_, BN_, BK_, WM_, WN_, ST_, float>(GEMM_F16_PASS); }

// name: t<BM>x<BN>k<BK>s<stages>; each has its record (tile, threads, smem, part) in
// gpt2job/backends/cuda/kernels.py F16_TILES
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 1
DEF_GEMM_F16(gemm_f16_t128x128k32s4, 128, 128, 32, 64, 32, 4, 2)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 2
DEF_GEMM_F16(gemm_f16_t128x256k32s4, 128, 256, 32, 64, 64, 4, 1)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 3
DEF_GEMM_F16(gemm_f16_t128x256k64s3, 128, 256, 64, 64, 64, 3, 1)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 4
DEF_GEMM_F16(gemm_f16_t256x128k64s3, 256, 128, 64, 64, 64, 3, 1)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 5
DEF_GEMM_F16(gemm_f16_t128x128k64s3, 128, 128, 64, 64, 32, 3, 2)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 6
DEF_GEMM_F16(gemm_f16_t64x128k64s4, 64, 128, 64, 32, 32, 4, 3)
#endif
// narrow tiles for decode-sized products (a few hundred rows): more blocks over the SMs, the same K order
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 7
DEF_GEMM_F16(gemm_f16_t64x64k64s4, 64, 64, 64, 32, 32, 4, 3)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 8
DEF_GEMM_F16(gemm_f16_t32x64k64s4, 32, 64, 64, 32, 16, 4, 4)
#endif
// the narrowest: fewer bytes per block and K step; a decode product whose 32x32 tiles all fit on the SMs at once
// (at most ~160 rows of 768 columns) then runs each K loop faster
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 9
DEF_GEMM_F16(gemm_f16_t32x32k64s8, 32, 32, 64, 16, 16, 8, 4)
#endif
// the narrow decode tiles with 128-wide k slices: half the K loop's iterations and barriers, which bound a decode
// product whose blocks all run at once; 32x64 only while its blocks fit on the SMs at once, two an SM (picks.py)
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 10
DEF_GEMM_F16(gemm_f16_t32x32k128s4, 32, 32, 128, 16, 16, 4, 3)
#endif
#if !defined(GEMM_F16_PART) || GEMM_F16_PART == 11
DEF_GEMM_F16(gemm_f16_t32x64k128s4, 32, 64, 128, 32, 16, 4, 2)
#endif
