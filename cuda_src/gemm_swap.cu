// Decode-sized fp16 products with the operands swapped (sm_90a): C = epilogue(A[M,K] @ B[N,K]^T + bias) as in
// gemm_f16.cu, computed as C^T = B A^T, so the weights B fill wgmma's 64-row side and the few hundred token rows
// of A its N side (any multiple of 8 for wgmma; 16 here, the argmax epilogue's row groups). A block takes WR
// weight rows (output columns) x BT token rows: a grid of about one block per SM with little padding, where the
// unswapped tiles round the tokens up to 32-128 rows and run in two waves (benchmarks/RESULTS.md; cuBLAS picks
// this form at these sizes).
//
// 288 threads: warps 0-7 are two consumer warpgroups, each computing a 64 (weights) x WN (tokens) block with
// wgmma m64nWNk16 (WR = 128: the warpgroups take weight rows 0-63 and 64-127; WR = 64: both take the 64 weight
// rows, and token rows 0..WN-1 and WN..2WN-1); warp 8 is the producer (one thread issues the TMA loads). The
// stage ring and its barriers are gemm_tma.cu's (tmA: the tokens, box 64 x BT; tmB: the weights, box 64 x WR).
// The finished block goes through shared memory (the stages, free once both warpgroups are done) back to the
// unswapped layout, and out through swap_epilogue: gemm_f16_epilogue's arithmetic, so every tile gives the same
// bits, with whole-sector stores (the greedy head's argmax epilogue, never picked here, takes gemm_f16_epilogue).
// Build: -gencode=arch=compute_90a,code=sm_90a -DSWAP_NAME=.. -DSWAP_WR=.. -DSWAP_WN=.. -DSWAP_ST=.. (kernels.py
// F16_TILES).
#define GEMM_TMA_BN 0   // gemm_tma.cu's helpers, none of its kernels
#define GEMM_TMA_PERSIST 0
#include "gemm_tma.cu"

#define SWAP_THREADS 288
#define SWAP_ROW 72   // floats per row of the transposed block in shared memory (64 + 8: the reads are free of bank
                      // conflicts, the writes two-way)

__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__half* p, const float (&v)[4]) {   // rounded as store2's half2 pairs
    const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<const unsigned*>(&a);
    u.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __half* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x)),
                 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}

// The outputs of one warpgroup's block, from its transposed tile tb ([WN tokens][SWAP_ROW floats], 64 output
// columns from col0, tokens from row0). Each lane takes 4 adjacent columns of a token row, a warp 2 rows, so every
// store (and EPI_RESID's residual load) covers whole 32-byte sectors where the rows start 32-byte aligned (GPT-2's
// shapes); gemm_f16_epilogue's fragment order wrote 16 (half) or 32 (float) bytes a row and instruction, and took
// a large share of a wide product's time here (benchmarks/RESULTS.md). What would wait on memory is fetched before: the
// lane's bias bv (before the K loop), each token row's KV-cache cell for EPI_QKV (kvrow, in shared memory), and
// EPI_RESID's residuals G rows at a time ahead of their stores. Each element's arithmetic is gemm_f16_epilogue's,
// so the bits are the same: acc + bias, then the residual add (EPI_RESID), the activation, or nothing for EPI_QKV
// (its key and value columns go to the KV cache), rounded alike (fp16: round to nearest, as __floats2half2_rn).
template <int WN, typename OutT>
__device__ __forceinline__ void swap_epilogue(const float* tb, const float (&bv)[4], const int* kvrow, int row0,
                                              int col0, OutT* __restrict__ C, int ldc, int M, int N, int mode,
                                              __half* __restrict__ kc, __half* __restrict__ vc, int kvC)
{
    // 2 token rows a warp and iteration; EPI_RESID (float outputs) loads G iterations' residuals at once (8: steps
    // a bit shorter than with 4 or 2), half outputs have nothing to load (a group of 1 halves their machine code: 4
    // made them slower; benchmarks/RESULTS.md)
    constexpr bool HALF = kIsHalf<OutT>::value;
    constexpr int IT = WN / 8, G = HALF ? 1 : 8;
    const int lane = threadIdx.x & 31, w4 = (threadIdx.x >> 5) & 3;
    const int c = 4 * (lane & 15), col = col0 + c;
    if (col >= N) return;
    const bool resid = !HALF && mode == EPI_RESID;   // (EPI_RESID has float outputs: Kernels.gemm_f16 asserts it)
    const bool qkvm = HALF && mode == EPI_QKV;
    // 4 columns as one vector: all inside the product, aligned (ldc and, for the cache, kvC multiples of 4), and
    // for EPI_QKV on one side of the q / key / value boundaries
    const bool vec = col + 3 < N && (ldc & 3) == 0 && (!qkvm || (kvC & 3) == 0);
#pragma unroll 1
    for (int i0 = 0; i0 < IT; i0 += G) {
        float4 a[G], o[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            const int t = 8 * (i0 + g) + 2 * w4 + (lane >> 4), row = row0 + t;   // token row: block, product
            o[g] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (i0 + g < IT) {
                a[g] = *reinterpret_cast<const float4*>(tb + t * SWAP_ROW + c);
                if (resid && vec && row < M) o[g] = load4(C + (size_t)row * ldc + col);
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            const int t = 8 * (i0 + g) + 2 * w4 + (lane >> 4), row = row0 + t;
            if (i0 + g >= IT || row >= M) break;
            float v[4] = {a[g].x + bv[0], a[g].y + bv[1], a[g].z + bv[2], a[g].w + bv[3]};
            OutT* crow = C + (size_t)row * ldc;
            const size_t kvoff = qkvm ? (size_t)kvrow[t] * kvC : 0;
            if (vec) {
                if (qkvm && col >= kvC) {
                    store4(col < 2 * kvC ? kc + kvoff + (col - kvC) : vc + kvoff + (col - 2 * kvC), v);
                    continue;
                }
                if (resid) {
                    v[0] += o[g].x; v[1] += o[g].y; v[2] += o[g].z; v[3] += o[g].w;
                } else if (!qkvm) {
#pragma unroll
                    for (int j = 0; j < 4; j++) v[j] = apply_act_fast(v[j], mode);
                }
                store4(crow + col, v);
                continue;
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {   // one element at a time: the edges of the product, odd strides
                const int cj = col + j;
                if (cj >= N) break;
                OutT* dst = crow + cj;
                float x = v[j];
                if (qkvm && cj >= kvC) {
                    dst = reinterpret_cast<OutT*>(cj < 2 * kvC ? kc + kvoff + (cj - kvC) : vc + kvoff + (cj - 2 * kvC));
                } else if (resid) {
                    x += to_f(*dst);
                } else if (!qkvm) {
                    x = apply_act_fast(x, mode);
                }
                *dst = from_f<OutT>(x);
            }
        }
    }
}

template <int WR, int WN, int ST, typename OutT>
__device__ __forceinline__ void gemm_swap_impl(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(OutT))
{
    static_assert(WR == 64 || WR == 128, "64 or 128 weight rows");
    static_assert(WN % 16 == 0 && WN <= 256, "token rows a warpgroup: a multiple of 16");
    constexpr int BT = WR == 128 ? WN : 2 * WN;                  // token rows a block
    static_assert(BT <= 256, "a TMA box of at most 256 rows; kvrow: a consumer thread a token row");
    constexpr int W_BYTES = WR * TMA_BK * 2, T_BYTES = BT * TMA_BK * 2;
    static_assert(ST * (W_BYTES + T_BYTES) >= 2 * WN * SWAP_ROW * 4, "the transposed blocks fit in the stages");
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* base = reinterpret_cast<unsigned char*>(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __half* Ws = reinterpret_cast<__half*>(base);                            // [ST][WR x 64]
    __half* Ts = reinterpret_cast<__half*>(base + ST * W_BYTES);             // [ST][BT x 64]
    unsigned long long* full = reinterpret_cast<unsigned long long*>(base + ST * (W_BYTES + T_BYTES));
    unsigned long long* empty = full + ST;
    int* kvrow = reinterpret_cast<int*>(empty + ST);   // [BT]: EPI_QKV, each token row's KV-cache cell
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nk = (K + TMA_BK - 1) / TMA_BK;
    const int n0 = blockIdx.x * WR, m0 = blockIdx.y * BT;   // first output column (weight row) and token row
    if (tid == 0) init_stage_barriers<ST>(full, empty, 8);   // empty: the 8 consumer warps
    __syncthreads();

    if (warp == 8) {   // producer
        if (lane == 0) {
            acquire_tensormaps(tmA, tmB);
            int it = 0;   // gemm_tma.cu's loads with the roles swapped: the weights (tmB) are its A
            load_tile_stages<BT, ST, WR>(tmB, tmA, Ws, Ts, full, empty, n0, m0, nk, it);
        }
        return;
    }

    const int wg = warp >> 2, w4 = warp & 3;
    const int w_off = WR == 128 ? 64 * wg : 0, t_off = WR == 128 ? 0 : WN * wg;   // this warpgroup's block
    // the epilogue's inputs that do not depend on the product, fetched while the first stages load: the bias of
    // this lane's 4 columns (swap_epilogue's), the KV-cache cells of the block's token rows (one a thread; int:
    // the cache holds far fewer than 2^31 cells)
    float bv[4];
    const int bcol = n0 + w_off + 4 * (lane & 15);
#pragma unroll
    for (int j = 0; j < 4; j++) bv[j] = (bias != nullptr && bcol + j < N) ? bias[bcol + j] : 0.f;
    if (mode == EPI_QKV && tid < BT)   // (EPI_QKV has half outputs: Kernels.gemm_f16 asserts it)
        kvrow[tid] = m0 + tid < M ? (row_slot[m0 + tid] - slot_base) * S + row_pos[m0 + tid] : 0;
    float acc[WN / 2];
#pragma unroll
    for (int i = 0; i < WN / 2; i++) acc[i] = 0.f;
    int it = 0;
    const unsigned long long dW = wg_desc(Ws + w_off * TMA_BK), dT = wg_desc(Ts + t_off * TMA_BK);   // stage 0
    consume_tile_stages<ST, WN / 2>(acc, full, empty, nk, it, lane, [&](int s, int ks) {
        wgmma_m64k16<WN>(acc, wg_desc_at(dW, s * W_BYTES + ks * 32), wg_desc_at(dT, s * T_BYTES + ks * 32));
    });
    wg_wait0();
    wg_fence_acc<WN / 2>(acc);

    // transpose through shared memory: both warpgroups' MMAs have read their last stage (and every TMA load has
    // landed: each was waited for), so the stages are free
    consumers_sync();
    float* tb = reinterpret_cast<float*>(base) + wg * WN * SWAP_ROW;   // [WN tokens][64 weight rows (+ pad)]
#pragma unroll
    for (int j = 0; j < WN / 8; j++)
#pragma unroll
        for (int r = 0; r < 4; r++)   // m64nWN: weight row 16 w4 + lane / 4 (+ 8), token 8 j + 2 (lane % 4) (+ 1)
            tb[(8 * j + 2 * (lane & 3) + (r & 1)) * SWAP_ROW + 16 * w4 + (lane >> 2) + 8 * (r >> 1)] = acc[4 * j + r];
    named_sync(2 + wg, 128);   // each warp reads back rows the warpgroup's other warps wrote
    if (argmax_mode(mode)) {   // (the greedy LM head: never picked here, kept correct)
#pragma unroll 1
        for (int mi = 0; mi < WN / 16; mi++) {
            float out[1][2][4];   // m16n8: token 16 mi + lane / 4 (+ 8), weight row 16 w4 + 8 ni + 2 (lane % 4) (+ 1)
#pragma unroll
            for (int ni = 0; ni < 2; ni++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const float2 v = *reinterpret_cast<const float2*>(
                        tb + (16 * mi + (lane >> 2) + 8 * h) * SWAP_ROW + 16 * w4 + 8 * ni + 2 * (lane & 3));
                    out[0][ni][2 * h] = v.x;
                    out[0][ni][2 * h + 1] = v.y;
                }
            gemm_f16_epilogue<1, 2, 16, OutT>(out, m0 + t_off + 16 * mi, n0 + w_off + 16 * w4, C, ldc, bias, M, N,
                                              mode, row_slot, row_pos, slot_base, S, kc, vc, kvC);
        }
        return;
    }
    swap_epilogue<WN, OutT>(tb, bv, kvrow + t_off, m0 + t_off, n0 + w_off, C, ldc, M, N, mode, kc, vc, kvC);
}

// name: gemm_f16_s<BT>x<WR>_<out>; records in gpt2job/backends/cuda/kernels.py F16_TILES
#define DEF_GEMM_SWAP(NAME, WR, WN, ST)                                                                          \
    extern "C" __global__ void __launch_bounds__(SWAP_THREADS, 1)                                               \
    NAME##_outh(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(__half))                                  \
    { pdl_wait(); gemm_swap_impl<WR, WN, ST, __half>(tmA, tmB, GEMM_F16_PASS); }                                 \
    extern "C" __global__ void __launch_bounds__(SWAP_THREADS, 1)                                               \
    NAME##_outf(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(float))                                   \
    { pdl_wait(); gemm_swap_impl<WR, WN, ST, float>(tmA, tmB, GEMM_F16_PASS); }

// SWAP_NAME, SWAP_WR, SWAP_WN, SWAP_ST: the one variant this module compiles (set by kernels.py)
#define DEF_GEMM_SWAP_EXPANDED(...) DEF_GEMM_SWAP(__VA_ARGS__)   // SWAP_NAME expanded before ## pastes it
#if defined(SWAP_NAME)
DEF_GEMM_SWAP_EXPANDED(SWAP_NAME, SWAP_WR, SWAP_WN, SWAP_ST)
#endif
