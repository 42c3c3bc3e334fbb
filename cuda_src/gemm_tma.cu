// Hopper matrix product with TMA loads, an mbarrier pipeline and wgmma (sm_90a): same operands, epilogues and
// argument list as the templated kernels of gemm_f16.cu (C = epilogue(A[M,K] @ B[N,K]^T + bias), fp16 in, fp32
// accumulation), plus pointers to two TMA descriptors in global memory in front (gpt2job/backends/cuda/
// tensor_maps.py encodes them on the host and copies them in on the launch's stream: A as [M rows, K] with box
// 64 x 128, B as [N rows, K] with box 64 x BN, fp16, 128-byte swizzle; rows past M or N and columns past K read as
// zeros).
//
// Block tile 128 x BN x 64, BN in {128, 192, 256}; 288 threads: warps 0-7 are two consumer warpgroups (rows 0-63
// and 64-127 of the tile, wgmma m64nBNk16 with accumulators in registers), warp 8 is the producer (one thread
// issues the TMA loads). ST shared-memory stages, each guarded by two mbarriers:
//   full[s]  - the producer arms it with the stage's byte count; the TMA unit completes it when both tiles landed;
//   empty[s] - each of the 8 consumer warps arrives once its wgmma reading the stage has retired.
// Consumers keep one wgmma batch in flight (wait_group 1) and release the previous stage after it.
// Variants: one block per tile (gemm_f16_tma<BN>), persistent (gemm_f16_tma<BN>p, see gemm_tma_impl), or
// persistent with a staged epilogue (gemm_f16_tma<BN>s): the consumers write the finished tile into shared memory
// and 128 threads hand one row each to the bulk-copy unit (cp.async.bulk; EPI_RESID with cp.reduce.async.bulk
// .add.f32, the fp32 residual added in L2, never read into the SM; EPI_QKV with the key and value columns copied
// straight into their KV-cache rows), then go on to the next tile's MMAs while the copies drain. And the ping-pong
// kernel gemm_f16_tma128pp (gemm_tma_pp_impl, 384 threads): two consumer warpgroups on alternate tiles, so one's
// epilogue runs while the other's MMAs do.
// Build: -gencode=arch=compute_90a,code=sm_90a.
#define GEMM_F16_PART 99   // helpers and the shared epilogue of gemm_f16.cu, none of its kernels
#include "gemm_f16.cu"
#include "wgmma.cuh"

struct __align__(64) TmaDesc { unsigned long long opaque[16]; };   // a CUtensorMap (in global memory)

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
    } while (!done);
}
// box at (inner coordinate c0, row c1) of the tensor described by desc -> dst; completes bytes on bar
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* desc, int c0, int c1, unsigned long long* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(smem_u32(dst)), "l"((unsigned long long)desc), "r"(c0), "r"(c1), "r"(smem_u32(bar)) : "memory");
}

// bulk copies from shared to global memory (sizes and addresses multiples of 16 bytes), one bulk group per thread
__device__ __forceinline__ void bulk_store(void* dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
                 ::"l"(dst), "r"(smem_u32(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_add_f32(float* dst, const void* src, unsigned bytes) {   // dst[i] += src[i]
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 ::"l"(dst), "r"(smem_u32(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// generic-proxy shared-memory writes -> visible to the bulk-copy (async) proxy
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }   // warps 0-7

// staged epilogue: bytes per shared-memory row of the output tile (padding keeps the fragment writes free of bank
// conflicts: rows 4 (half2) or 8 (float2) banks apart; 256-wide float rows get none: 2 stages + 128 KB of rows is
// all that fits). The host sizes the kernel's shared memory the same way (_staged_smem, backends/cuda/kernels.py).
template <int TBN, typename OutT> struct StagedRow {
    static constexpr int bytes = TBN * (int)sizeof(OutT) + (sizeof(OutT) == 2 ? 16 : (TBN == 256 ? 0 : 32));
};

template <int TBN> __device__ __forceinline__ void wgmma_bn(float* d, unsigned long long a, unsigned long long b);
template <> __device__ __forceinline__ void wgmma_bn<128>(float* d, unsigned long long a, unsigned long long b)
{ wgmma_m64n128k16(d, a, b); }
template <> __device__ __forceinline__ void wgmma_bn<192>(float* d, unsigned long long a, unsigned long long b)
{ wgmma_m64n192k16(d, a, b); }
template <> __device__ __forceinline__ void wgmma_bn<256>(float* d, unsigned long long a, unsigned long long b)
{ wgmma_m64n256k16(d, a, b); }

#define TMA_BM 128
#define TMA_BK 64
#define TMA_THREADS 288
#define TMA_WIDE_N 16384   // products wider than this (the LM head): M tiles fastest (gemm_tma_impl); kernels.py's twin

// The stage ring of the TMA kernels. Its barriers, set up by one thread: full[s] takes the producer's arrival and
// the stage's bytes, empty[s] one arrival per consumer warp that reads the stage. The producer thread orders the
// descriptors' copy before the TMA unit reads them (acquire_tensormaps), then loads each tile's nk k-blocks (A rows
// from m0, B rows from n0; load_tile_stages). it: k-blocks loaded so far over all tiles (stage it % ST, phase
// it / ST); a stage is refilled once its consumers released it, and full[s] completes when both boxes have landed.
template <int ST>
__device__ __forceinline__ void init_stage_barriers(unsigned long long* full, unsigned long long* empty,
                                                    unsigned consumer_warps) {
#pragma unroll
    for (int s = 0; s < ST; s++) {
        mbar_init(&full[s], 1);
        mbar_init(&empty[s], consumer_warps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void acquire_tensormaps(const TmaDesc* tmA, const TmaDesc* tmB) {
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(tmA) : "memory");
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(tmB) : "memory");
}
// TBM: A's rows a tile (gemm_swap.cu passes the weights as A: its WR rows)
template <int TBN, int ST, int TBM = TMA_BM>
__device__ __forceinline__ void load_tile_stages(const TmaDesc* tmA, const TmaDesc* tmB, __half* As, __half* Bs,
                                                 unsigned long long* full, unsigned long long* empty, int m0, int n0,
                                                 int nk, int& it)
{
    constexpr int A_BYTES = TBM * TMA_BK * 2, B_BYTES = TBN * TMA_BK * 2;
    for (int kb = 0; kb < nk; kb++, it++) {
        const int s = it % ST;
        if (it >= ST) mbar_wait(&empty[s], ((it / ST) - 1) & 1);   // the consumers released it - ST
        mbar_expect_tx(&full[s], A_BYTES + B_BYTES);
        tma_load_2d(As + s * TBM * TMA_BK, tmA, kb * TMA_BK, m0, &full[s]);
        tma_load_2d(Bs + s * TBN * TMA_BK, tmB, kb * TMA_BK, n0, &full[s]);
    }
}

// The consumers' side of the stage ring, for one tile: each k-block waits for its stage, runs mma(s, ks) for its
// four k16 steps (one wgmma batch into the NACC accumulators at acc), and releases the stage of the batch before
// once that one has retired (a warp's lane 0 arrives on empty). it: k-blocks consumed so far over all tiles.
template <int ST, int NACC, typename Mma>
__device__ __forceinline__ void consume_tile_stages(float* acc, unsigned long long* full, unsigned long long* empty,
                                                    int nk, int& it, int lane, Mma mma)
{
    int s = it % ST, prev = 0;   // the stage of k-block it and of the one before; counted, not divided, per k-block
    unsigned phase = (it / ST) & 1;
    for (int kb = 0; kb < nk; kb++, it++) {
        mbar_wait(&full[s], phase);
        wg_fence_acc<NACC>(acc);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < TMA_BK / 16; ks++) mma(s, ks);   // k16 step: +32 bytes inside the 128-byte rows
        wg_commit();
        wg_wait1();                                 // k-block it - 1's batch has retired: release its stage
        wg_fence_acc<NACC>(acc);
        if (kb > 0 && lane == 0) mbar_arrive(&empty[prev]);
        prev = s;
        if (++s == ST) { s = 0; phase ^= 1u; }
    }
}

// One thread's bulk copies of row `row` of a staged tile (its w columns from n0, at src in shared memory): EPI_RESID
// (resid) as a bulk add into the fp32 residual, EPI_QKV (qkvm) the q columns to C and the key and value columns to
// the row's KV-cache slot and position, else a plain store.
template <typename OutT>
__device__ __forceinline__ void staged_row_out(const unsigned char* src, int row, int n0, int w, bool resid, bool qkvm,
                                               OutT* C, int ldc, const int* row_slot, const int* row_pos,
                                               int slot_base, int S, __half* kc, __half* vc, int kvC)
{
    if (resid) {
        bulk_add_f32(reinterpret_cast<float*>(C + (size_t)row * ldc + n0), src, w * 4);
    } else if (qkvm) {
        const size_t kvoff = ((size_t)(row_slot[row] - slot_base) * S + row_pos[row]) * kvC;
        for (int c = n0; c < n0 + w;) {
            const int part = c < kvC ? 0 : (c < 2 * kvC ? 1 : 2);
            const int end = min(n0 + w, part == 2 ? n0 + w : (part + 1) * kvC);
            __half* dst = part == 0 ? reinterpret_cast<__half*>(C) + (size_t)row * ldc + c
                                    : (part == 1 ? kc : vc) + kvoff + (c - part * kvC);
            bulk_store(dst, src + (c - n0) * 2, (end - c) * 2);
            c = end;
        }
    } else {
        bulk_store(C + (size_t)row * ldc + n0, src, w * (int)sizeof(OutT));
    }
}

// Staged epilogue of one 128 x TBN tile (consumer threads 0-255; acc in the wgmma fragment layout): wait until
// the previous tile's bulk copies have read the staging rows, write bias + activation (EPI_RESID: bias only, the
// residual is added by the bulk reduction) into them, then thread r < 128 copies row r of the tile out.
template <int TBN, int CROW, typename OutT>
__device__ __forceinline__ void staged_epilogue(float (&acc)[1][TBN / 8][4], unsigned char* Cs, int tid, int m0, int n0,
                                                bool have_copies, GEMM_F16_ARGS(OutT))
{
    const int warp = tid >> 5, lane = tid & 31;
    const bool resid = mode == EPI_RESID, qkvm = kIsHalf<OutT>::value && mode == EPI_QKV;
    if (have_copies && tid < TMA_BM) bulk_wait_read();
    consumers_sync();
    unsigned char* srow = Cs + ((warp >> 2) * 64 + (warp & 3) * 16 + (lane >> 2)) * CROW;
#pragma unroll
    for (int j = 0; j < TBN / 8; j++) {
        const int cl = j * 8 + (lane & 3) * 2, col = n0 + cl;
        float b0 = 0.f, b1 = 0.f;
        if (bias != nullptr && col < N) { b0 = bias[col]; b1 = bias[col + 1]; }   // N even here
#pragma unroll
        for (int half_ = 0; half_ < 2; half_++) {
            float v0 = acc[0][j][half_ * 2] + b0, v1 = acc[0][j][half_ * 2 + 1] + b1;
            if (!resid && !qkvm) { v0 = apply_act_fast(v0, mode); v1 = apply_act_fast(v1, mode); }
            OutT* p = reinterpret_cast<OutT*>(srow + half_ * 8 * CROW) + cl;
            store2(p, v0, v1, true, true);
        }
    }
    fence_async_smem();
    consumers_sync();
    if (tid < TMA_BM) {
        const int row = m0 + tid;
        if (row < M)   // the tile's columns (N * sizeof(OutT) is a multiple of 16)
            staged_row_out(Cs + tid * CROW, row, n0, min(TBN, N - n0), resid, qkvm, C, ldc, row_slot, row_pos,
                           slot_base, S, kc, vc, kvC);
        bulk_commit();
    }
}

// The tile order of a persistent grid (tile t: the t-th of the M x N tiles): N tiles fastest (the blocks running at
// once share their A rows), except for the LM head (the greedy one's argmax epilogues, or N > TMA_WIDE_N: the
// logits): there B (the vocabulary, 77 MB in fp16) outgrows the L2 and would be read from memory once per 128 rows;
// M tiles fastest reads it once while A (a few MB) stays in the L2.
__device__ __forceinline__ bool persistent_m_fast(int N, int mode) { return N > TMA_WIDE_N || argmax_mode(mode); }
template <int TBN>
__device__ __forceinline__ void persistent_origin(int tile, bool m_fast, int m_tiles, int n_tiles, int& m0, int& n0)
{
    m0 = (m_fast ? tile % m_tiles : tile / n_tiles) * TMA_BM;
    n0 = (m_fast ? tile / m_tiles : tile % n_tiles) * TBN;
}

// PERSIST = false: one block per output tile (grid: N tiles x M tiles; M tiles x N tiles where N > TMA_WIDE_N, see
// m_fast below). PERSIST = true: a grid of at most as many blocks as fit on the GPU at once, block b taking tiles b,
// b + gridDim.x, ... (N tiles fastest; M tiles fastest where m_fast); the stage ring and its barrier phases run on
// across tiles, so the producer loads the next tile while the consumers run the epilogue of this one. STAGED
// (persistent only): the epilogue goes through shared memory and bulk copies (see the top of the file) where the
// output allows it (16-byte aligned rows, not EPI_ARGMAX), else the register one.
template <int TBN, int ST, bool PERSIST, typename OutT, bool STAGED = false>
__device__ __forceinline__ void gemm_tma_impl(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(OutT))
{
    static_assert(PERSIST || !STAGED, "the staged epilogue is for persistent grids");
    constexpr int A_BYTES = TMA_BM * TMA_BK * 2, B_BYTES = TBN * TMA_BK * 2;
    constexpr int CROW = StagedRow<TBN, OutT>::bytes, C_BYTES = STAGED ? TMA_BM * CROW : 0;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // 1024-byte aligned stages (the 128-byte swizzle repeats every 8 rows = 1024 B), then the barriers
    unsigned char* base = reinterpret_cast<unsigned char*>(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __half* As = reinterpret_cast<__half*>(base);                           // [ST][128 x 64]
    __half* Bs = reinterpret_cast<__half*>(base + ST * A_BYTES);            // [ST][TBN x 64]
    unsigned char* Cs = base + ST * (A_BYTES + B_BYTES);                    // [128][CROW] staged output tile
    unsigned long long* full = reinterpret_cast<unsigned long long*>(base + ST * (A_BYTES + B_BYTES) + C_BYTES);
    unsigned long long* empty = full + ST;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nk = (K + TMA_BK - 1) / TMA_BK;
    const int n_tiles = (N + TBN - 1) / TBN;
    const int tile0 = PERSIST ? blockIdx.x : 0, tile_step = PERSIST ? gridDim.x : 1;
    const int m_tiles = (M + TMA_BM - 1) / TMA_BM;
    const int tile_end = PERSIST ? n_tiles * m_tiles : 1;
    // without PERSIST the grid says the tile order: Kernels.gemm_f16 launches M tiles x N tiles where N > TMA_WIDE_N
    const bool m_fast = PERSIST ? persistent_m_fast(N, mode) : N > TMA_WIDE_N;
    auto origin = [&](int tile, int& m0, int& n0) {   // first row and column of a tile
        if constexpr (PERSIST) {
            persistent_origin<TBN>(tile, m_fast, m_tiles, n_tiles, m0, n0);
        } else {
            m0 = (int)(m_fast ? blockIdx.x : blockIdx.y) * TMA_BM;
            n0 = (int)(m_fast ? blockIdx.y : blockIdx.x) * TBN;
        }
    };
    if (tid == 0) init_stage_barriers<ST>(full, empty, 8);   // empty: the 8 consumer warps
    __syncthreads();

    if (warp == 8) {   // producer
        if (lane == 0) {
            acquire_tensormaps(tmA, tmB);
            int it = 0;
            for (int tile = tile0; tile < tile_end; tile += tile_step) {
                int m0, n0;
                origin(tile, m0, n0);
                load_tile_stages<TBN, ST>(tmA, tmB, As, Bs, full, empty, m0, n0, nk, it);
            }
        }
        return;
    }

    const int wg = warp >> 2;
    const unsigned long long dA = wg_desc(As + wg * 64 * TMA_BK), dB = wg_desc(Bs);   // stage 0; this warpgroup's rows
    float acc[1][TBN / 8][4];
    int it = 0;   // k-blocks consumed so far (all tiles)
    // the staged epilogue needs 16-byte aligned output rows (and KV-cache rows for EPI_QKV)
    const bool qkv_out = kIsHalf<OutT>::value && mode == EPI_QKV;
    const bool staged = STAGED && !argmax_mode(mode) &&
                        (mode != EPI_RESID || !kIsHalf<OutT>::value) &&
                        ((size_t)C % 16 == 0) && ((size_t)ldc * sizeof(OutT)) % 16 == 0 &&
                        ((size_t)N * sizeof(OutT)) % 16 == 0 &&
                        (!qkv_out || (kvC % 8 == 0 && (size_t)kc % 16 == 0 && (size_t)vc % 16 == 0));
    bool have_copies = false;   // this thread has bulk copies in flight (staged epilogue)
    for (int tile = tile0; tile < tile_end; tile += tile_step) {
        int m0, n0;
        origin(tile, m0, n0);
#pragma unroll
        for (int j = 0; j < TBN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[0][j][r] = 0.f;
        consume_tile_stages<ST, TBN / 2>(&acc[0][0][0], full, empty, nk, it, lane, [&](int s, int ks) {
            wgmma_bn<TBN>(&acc[0][0][0], wg_desc_at(dA, (s * TMA_BM * TMA_BK + ks * 16) * 2),
                          wg_desc_at(dB, (s * TBN * TMA_BK + ks * 16) * 2));
        });
        wg_wait0();
        wg_fence_acc<TBN / 2>(&acc[0][0][0]);
        if (PERSIST && nk > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % ST]);   // the tile's last stage
        if (STAGED && staged) {
            staged_epilogue<TBN, CROW, OutT>(acc, Cs, tid, m0, n0, have_copies, GEMM_F16_PASS);
            have_copies = true;
        } else {
            gemm_f16_epilogue<1, TBN / 8, TBN, OutT>(acc, m0 + wg * 64 + (warp & 3) * 16, n0, C, ldc, bias, M, N,
                                                     mode, row_slot, row_pos, slot_base, S, kc, vc, kvC);
        }
    }
    if (STAGED && have_copies && tid < TMA_BM) bulk_wait_all();   // shared memory stays valid until read
}

// ------------------------------------------------------------------------------------------------------------
// Ping-pong (gemm_f16_tma128pp). 384 threads: warpgroup 0 is the producer (its warp 0, lane 0 issues the TMA
// loads; setmaxnreg.dec to 40 registers), warpgroups 1 and 2 are consumers (setmaxnreg.inc to 232) that each
// compute whole 128 x TBN tiles. The CTA's tiles i = 0, 1, 2, ... (blockIdx.x + i * gridDim.x) alternate
// between the two; their main loops take turns (named barriers 1 and 2: tile i's main loop starts once tile i - 1's
// has ended), so one consumer's epilogue (staged, into its own shared-memory rows) runs while the other's MMAs do.
// Each stage is read by one consumer: empty[s] counts its 4 warps.
#define PP_THREADS 384
__device__ __forceinline__ void named_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

// Pass p of a ping-pong consumer's staged epilogue: rows p * SR .. p * SR + SR - 1 of its tile (acc, in the wgmma
// fragment layout) + bias (bpre) into its staging rows Cs, with the activation ACT (EPI_GELU_TANH, EPI_GELU_ERF, or
// EPI_BIAS: none; EPI_RESID and EPI_QKV add the bias only). ACT is a template argument: the loops unroll into one
// straight run over the thread's 2 x TBN / 2 elements (a branch on the launch's mode between every four elements
// kept the compiler from overlapping their GELUs, and a GELU epilogue outlasted the other consumer's main loop).
template <int ACT, int TBN, int SR, int CROW, typename OutT>
__device__ __forceinline__ void pp_stage_pass(const float (&acc)[2][TBN / 8][4], const float (&bpre)[TBN / 8][2],
                                              unsigned char* Cs, int p, int warp, int lane)
{
#pragma unroll
    for (int hh = 0; hh < SR / 64; hh++) {
        const int h = p * (SR / 64) + hh;
        unsigned char* srow = Cs + (hh * 64 + warp * 16 + (lane >> 2)) * CROW;
#pragma unroll
        for (int j = 0; j < TBN / 8; j++) {
            const int cl = j * 8 + (lane & 3) * 2;
#pragma unroll
            for (int half_ = 0; half_ < 2; half_++) {
                float v0 = acc[h][j][half_ * 2] + bpre[j][0], v1 = acc[h][j][half_ * 2 + 1] + bpre[j][1];
                if (ACT != EPI_BIAS) { v0 = apply_act_fast(v0, ACT); v1 = apply_act_fast(v1, ACT); }
                store2(reinterpret_cast<OutT*>(srow + half_ * 8 * CROW) + cl, v0, v1, true, true);
            }
        }
    }
}

template <int TBN, int ST, typename OutT>
__device__ __forceinline__ void gemm_tma_pp_impl(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(OutT))
{
    constexpr int A_BYTES = TMA_BM * TMA_BK * 2, B_BYTES = TBN * TMA_BK * 2;
    // staging rows per consumer: the whole tile for half outputs, float outputs in two passes of 64 rows (the room
    // of two float tiles would leave two stages)
    constexpr int SR = kIsHalf<OutT>::value ? 128 : 64;
    constexpr int CROW = StagedRow<TBN, OutT>::bytes, C_BYTES = SR * CROW;   // per consumer
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // aligned by offset, not through an integer: the compiler then knows the staging rows are shared memory (STS
    // stores, not generic ones)
    unsigned char* base = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    __half* As = reinterpret_cast<__half*>(base);                           // [ST][128 x 64]
    __half* Bs = reinterpret_cast<__half*>(base + ST * A_BYTES);            // [ST][TBN x 64]
    unsigned char* Cs0 = base + ST * (A_BYTES + B_BYTES);                   // [2][SR][CROW]
    unsigned long long* full = reinterpret_cast<unsigned long long*>(Cs0 + 2 * C_BYTES);
    unsigned long long* empty = full + ST;
    const int tid = threadIdx.x, wgi = tid >> 7, t = tid & 127, warp = t >> 5, lane = tid & 31;
    const int nk = (K + TMA_BK - 1) / TMA_BK;
    const int n_tiles = (N + TBN - 1) / TBN, m_tiles = (M + TMA_BM - 1) / TMA_BM;
    const int tile_end = n_tiles * m_tiles;
    const int my_tiles = blockIdx.x < tile_end ? (tile_end - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    const bool m_fast = persistent_m_fast(N, mode);
    if (tid == 0) init_stage_barriers<ST>(full, empty, 4);   // empty: one consumer's 4 warps
    __syncthreads();

    if (wgi == 0) {   // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (warp == 0 && lane == 0) {
            acquire_tensormaps(tmA, tmB);
            int it = 0;
            for (int i = 0; i < my_tiles; i++) {
                int m0, n0;
                persistent_origin<TBN>(blockIdx.x + i * gridDim.x, m_fast, m_tiles, n_tiles, m0, n0);
                load_tile_stages<TBN, ST>(tmA, tmB, As, Bs, full, empty, m0, n0, nk, it);
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const unsigned long long dA = wg_desc(As), dB = wg_desc(Bs);   // stage 0 (wg_desc_at moves them)
    const int c = wgi - 1;                         // this consumer: tiles i with i % 2 == c
    unsigned char* Cs = Cs0 + c * C_BYTES;
    const bool qkvm = kIsHalf<OutT>::value && mode == EPI_QKV, resid = mode == EPI_RESID;
    const int act = (mode == EPI_GELU_TANH || mode == EPI_GELU_ERF) ? mode : EPI_BIAS;   // the staged rows' activation
    // the staged epilogue needs 16-byte aligned output rows (and KV-cache rows for EPI_QKV); else the register one
    const bool staged = !argmax_mode(mode) && (mode != EPI_RESID || !kIsHalf<OutT>::value) &&
                        ((size_t)C % 16 == 0) && ((size_t)ldc * sizeof(OutT)) % 16 == 0 &&
                        ((size_t)N * sizeof(OutT)) % 16 == 0 &&
                        (!qkvm || (kvC % 8 == 0 && (size_t)kc % 16 == 0 && (size_t)vc % 16 == 0));
    float acc[2][TBN / 8][4];
    bool have_copies = false;
    int it = 0;
    for (int i = 0; i < my_tiles; i++) {
        if ((i & 1) != c) { it += nk; continue; }  // the other consumer's tile: its stages
        int m0, n0;
        persistent_origin<TBN>(blockIdx.x + i * gridDim.x, m_fast, m_tiles, n_tiles, m0, n0);
        if (i > 0) named_sync(1 + c, 256);         // tile i - 1's main loop has ended
        // the tile's bias, loaded now: in the epilogue each load would wait behind the stores before it
        float bpre[TBN / 8][2];
#pragma unroll
        for (int j = 0; j < TBN / 8; j++) {
            const int col = n0 + j * 8 + (lane & 3) * 2;
            const bool have = bias != nullptr && col < N;   // N even here
            bpre[j][0] = have ? __ldg(bias + col) : 0.f;
            bpre[j][1] = have ? __ldg(bias + col + 1) : 0.f;
        }
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int j = 0; j < TBN / 8; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) acc[h][j][r] = 0.f;
        // both 64-row halves of the tile (acc[0], acc[1], contiguous: TBN accumulators) per k16 step
        consume_tile_stages<ST, TBN>(&acc[0][0][0], full, empty, nk, it, lane, [&](int s, int ks) {
            const unsigned long long b = wg_desc_at(dB, s * B_BYTES + ks * 32);
            wgmma_bn<TBN>(&acc[0][0][0], wg_desc_at(dA, s * A_BYTES + ks * 32), b);
            wgmma_bn<TBN>(&acc[1][0][0], wg_desc_at(dA, s * A_BYTES + 64 * TMA_BK * 2 + ks * 32), b);
        });
        wg_wait0();
        wg_fence_acc<TBN / 2>(&acc[0][0][0]);
        wg_fence_acc<TBN / 2>(&acc[1][0][0]);
        if (nk > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % ST]);
        if (i + 1 < my_tiles) named_arrive(2 - c, 256);   // tile i + 1's main loop may start
        if (!staged) {
#pragma unroll
            for (int h = 0; h < 2; h++)
                gemm_f16_epilogue<1, TBN / 8, TBN, OutT>(reinterpret_cast<float(&)[1][TBN / 8][4]>(acc[h]),
                                                         m0 + h * 64 + warp * 16, n0, C, ldc, bias, M, N, mode,
                                                         row_slot, row_pos, slot_base, S, kc, vc, kvC);
            continue;
        }
        // epilogue: this consumer's rows through its staging rows, SR rows a pass; thread t < SR copies row t out
#pragma unroll
        for (int p = 0; p < 128 / SR; p++) {
            if (have_copies) bulk_wait_read();
            named_sync(3 + c, 128);
            if (act == EPI_GELU_TANH) pp_stage_pass<EPI_GELU_TANH, TBN, SR, CROW, OutT>(acc, bpre, Cs, p, warp, lane);
            else if (act == EPI_GELU_ERF) pp_stage_pass<EPI_GELU_ERF, TBN, SR, CROW, OutT>(acc, bpre, Cs, p, warp, lane);
            else pp_stage_pass<EPI_BIAS, TBN, SR, CROW, OutT>(acc, bpre, Cs, p, warp, lane);
            fence_async_smem();
            named_sync(3 + c, 128);
            const int row = m0 + p * SR + t;
            if (t < SR && row < M)
                staged_row_out(Cs + t * CROW, row, n0, min(TBN, N - n0), resid, qkvm, C, ldc, row_slot, row_pos,
                               slot_base, S, kc, vc, kvC);
            bulk_commit();
            have_copies = true;
        }
    }
    if (have_copies) bulk_wait_all();
}

// GEMM_OUT_HALF (set by gpt2job/backends/cuda/kernels.py): 1 compiles a tile's half-output kernel alone, 0 its
// float-output one alone: a tile's two kernels compile in parallel, as two modules (a cold node's time to ready is
// its longest compile); unset: both
#if !defined(GEMM_OUT_HALF) || GEMM_OUT_HALF == 1
#define IF_OUTH(...) __VA_ARGS__
#else
#define IF_OUTH(...)
#endif
#if !defined(GEMM_OUT_HALF) || GEMM_OUT_HALF == 0
#define IF_OUTF(...) __VA_ARGS__
#else
#define IF_OUTF(...)
#endif

// the staged epilogue needs 16-byte aligned output rows (else the register one, see gemm_tma_pp_impl)
#define DEF_GEMM_TMA_PP(NAME, TBN, STH, STF)                                                                    \
    IF_OUTH(extern "C" __global__ void __launch_bounds__(PP_THREADS, 1)                                        \
    NAME##_outh(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(__half))                                 \
    { pdl_wait(); gemm_tma_pp_impl<TBN, STH, __half>(tmA, tmB, GEMM_F16_PASS); })                               \
    IF_OUTF(extern "C" __global__ void __launch_bounds__(PP_THREADS, 1)                                        \
    NAME##_outf(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(float))                                  \
    { pdl_wait(); gemm_tma_pp_impl<TBN, STF, float>(tmA, tmB, GEMM_F16_PASS); })

// name: gemm_f16_tma<TBN>[p]_<out> (p: persistent, s: staged); records in
// gpt2job/backends/cuda/kernels.py F16_TILES
#define DEF_GEMM_TMA(NAME, TBN, ST, MINB, PERSIST) DEF_GEMM_TMA2(NAME, TBN, ST, ST, MINB, PERSIST, false)
// STH / STF: stages of the half / float output kernel (the staged epilogue's rows take shared memory too)
#define DEF_GEMM_TMA2(NAME, TBN, STH, STF, MINB, PERSIST, STAGED)                                              \
    IF_OUTH(extern "C" __global__ void __launch_bounds__(TMA_THREADS, MINB)                                    \
    NAME##_outh(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(__half))                                 \
    { pdl_wait(); gemm_tma_impl<TBN, STH, PERSIST, __half, STAGED>(tmA, tmB, GEMM_F16_PASS); })                 \
    IF_OUTF(extern "C" __global__ void __launch_bounds__(TMA_THREADS, MINB)                                    \
    NAME##_outf(const TmaDesc* tmA, const TmaDesc* tmB, GEMM_F16_ARGS(float))                                  \
    { pdl_wait(); gemm_tma_impl<TBN, STF, PERSIST, float, STAGED>(tmA, tmB, GEMM_F16_PASS); })

// GEMM_TMA_BN / GEMM_TMA_PERSIST (0 plain, 1 persistent, 2 persistent + staged epilogue; set by
// gpt2job/backends/cuda/kernels.py): compile one variant only (they compile in parallel); neither set: all of them
#ifndef GEMM_TMA_PERSIST
#define GEMM_TMA_PERSIST -1
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 128 && GEMM_TMA_PERSIST == 0)
DEF_GEMM_TMA(gemm_f16_tma128, 128, 3, 2, false)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 192 && GEMM_TMA_PERSIST == 0)
DEF_GEMM_TMA(gemm_f16_tma192, 192, 4, 1, false)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 256 && GEMM_TMA_PERSIST == 0)
DEF_GEMM_TMA(gemm_f16_tma256, 256, 4, 1, false)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 128 && GEMM_TMA_PERSIST == 1)
DEF_GEMM_TMA(gemm_f16_tma128p, 128, 3, 2, true)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 192 && GEMM_TMA_PERSIST == 1)
DEF_GEMM_TMA(gemm_f16_tma192p, 192, 4, 1, true)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 256 && GEMM_TMA_PERSIST == 1)
DEF_GEMM_TMA(gemm_f16_tma256p, 256, 4, 1, true)
#endif
// staged: stages per output type so that stages + staged rows + barriers fit 227 KB (kernels.py F16_TILES)
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 128 && GEMM_TMA_PERSIST == 2)
DEF_GEMM_TMA2(gemm_f16_tma128s, 128, 5, 4, 1, true, true)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 192 && GEMM_TMA_PERSIST == 2)
DEF_GEMM_TMA2(gemm_f16_tma192s, 192, 4, 3, 1, true, true)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 256 && GEMM_TMA_PERSIST == 2)
DEF_GEMM_TMA2(gemm_f16_tma256s, 256, 3, 2, 1, true, true)
#endif
#if !defined(GEMM_TMA_BN) || (GEMM_TMA_BN == 128 && GEMM_TMA_PERSIST == 4)
DEF_GEMM_TMA_PP(gemm_f16_tma128pp, 128, 4, 4)
#endif
