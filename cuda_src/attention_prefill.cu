// Tensor-core causal attention for the prefill, fp16, head size 64: flash-attention style, mma.sync m16n8k16 with
// fp32 accumulation and an fp32 online softmax. Same semantics as attention_grouped_f16 (transformer.cu):
// query r (columns [0, C) of qkv [R, 3C]) sees keys/values 0..row_pos[r] of cache slot row_slot[r] - slot_base
// (kc, vc: [slots, S, C]); out[r, hD:(h+1)D] = softmax(scale q.k) @ v. NumPy twin: gpt2job.model.reference.attention.
//
// Work unit: a tile of up to 16 query rows of ONE sequence (one slot), in practice up to 16 consecutive tokens of
// a prompt; tiles[t] = {first_row, n_rows}, first_row counted from the chunk's first row, the pass's rows (qkv,
// row_slot, row_pos, out) starting at chunk row row_base. One warp per (tile, head), heads fastest:
//   * Q (16 x 64, rows past n_rows zero) staged in shared memory once, then held as mma A fragments;
//   * keys 0..kend (kend = the tile's largest position) in blocks of AP_KB: K and V blocks go to the warp's own
//     shared memory with 16-byte cp.async (2 stages: block b+1 loads while block b computes), XOR-swizzled so
//     ldmatrix is conflict-free; keys past kend are zero-filled (the cache there may hold anything, NaN included);
//   * S = Q K^T (ldmatrix + mma), causal mask, online softmax in fp32 (exp2 with log2 e folded into the scale),
//     P as half re-used from the accumulator layout as the A fragment, O += P V (ldmatrix.trans + mma);
//   * O / l staged through shared memory, written with 16-byte stores for rows < n_rows.
#include "common.cuh"
#include "mma.cuh"

#define AP_D 64        // head size (fixed)
#define AP_TILE 16     // query rows per tile (the mma M)
#define AP_KB 16       // keys per block
#define AP_WARPS 4     // warps per thread block
#define AP_STAGES 2    // K/V pipeline depth

static_assert(AP_KB % 16 == 0 && AP_KB >= AP_TILE, "Q is staged in one K block buffer");

__device__ __forceinline__ unsigned ap_pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}
// (row, 16-byte chunk) -> half offset in a [rows][64] tile; chunk ^ (row % 8) makes ldmatrix conflict-free.
__device__ __forceinline__ int ap_swz(int row, int chunk) { return row * AP_D + ((chunk ^ (row & 7)) << 3); }

// 5 blocks (20 warps) per SM: caps registers at 96 (no spills; 116 unbounded)
extern "C" __global__ void __launch_bounds__(AP_WARPS * 32, 5)
attention_prefill_f16(const __half* __restrict__ qkv, const __half* __restrict__ kc, const __half* __restrict__ vc,
                      const int* __restrict__ row_slot, int slot_base, const int* __restrict__ row_pos,
                      __half* __restrict__ out, const int2* __restrict__ tiles, int n_tiles, int row_base,
                      int H, int S, float scale)
{
    pdl_wait();
    // per warp: [stage][K, V][key][dim] (swizzled); Q passes through stage 1's K buffer, O through stage 0's
    __shared__ __align__(128) __half smem[AP_WARPS][AP_STAGES][2][AP_KB * AP_D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gw = blockIdx.x * AP_WARPS + warp;
    const int t = gw / H, h = gw - t * H;
    if (t >= n_tiles) return;   // whole warps only: nothing below synchronises the block
    const int2 tile = tiles[t];
    const int r0 = tile.x - row_base, n = tile.y;   // first row in the pass, rows (1..16)
    const int C = H * AP_D;
    const int g = lane >> 2, q4 = lane & 3;          // accumulator rows g, g + 8; columns 2 q4, 2 q4 + 1
    // positions of this lane's rows; rows past n repeat the last row (computed, never written, never all masked)
    const int pos_lo = row_pos[r0 + min(g, n - 1)], pos_hi = row_pos[r0 + min(g + 8, n - 1)];
    const int kend = __reduce_max_sync(0xffffffffu, max(pos_lo, pos_hi));   // last key any row sees
    const int nkb = kend / AP_KB + 1;
    const size_t kvbase = (size_t)(row_slot[r0] - slot_base) * S * C + (size_t)h * AP_D;
    __half (*sw)[2][AP_KB * AP_D] = smem[warp];

    // K and V of keys kb AP_KB .. + AP_KB - 1 into stage st; keys past kend zero-filled
    auto load_kv = [&](int st, int kb) {
#pragma unroll
        for (int i = 0; i < AP_KB * 8 / 32; i++) {
            const int id = lane + 32 * i, row = id >> 3, ch = id & 7;
            const int j = kb * AP_KB + row;
            const bool ok = j <= kend;
            const size_t off = kvbase + (size_t)(ok ? j : 0) * C + ch * 8;
            cp_async16(&sw[st][0][ap_swz(row, ch)], kc + off, ok);
            cp_async16(&sw[st][1][ap_swz(row, ch)], vc + off, ok);
        }
    };

    // Q rows (zero past n) -> stage 1's K buffer, with K/V block 0 in one group
#pragma unroll
    for (int i = 0; i < AP_TILE * 8 / 32; i++) {
        const int id = lane + 32 * i, row = id >> 3, ch = id & 7;
        const bool ok = row < n;
        cp_async16(&sw[1][0][ap_swz(row, ch)], qkv + (size_t)(r0 + (ok ? row : 0)) * 3 * C + h * AP_D + ch * 8, ok);
    }
    load_kv(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    unsigned qf[AP_D / 16][4];   // A fragments of Q, one per 16 dims
#pragma unroll
    for (int ks = 0; ks < AP_D / 16; ks++) ldmatrix_x4(qf[ks], &sw[1][0][ap_swz(lane & 15, 2 * ks + (lane >> 4))]);
    __syncwarp();   // stage 1 is free for block 1

    float o[AP_D / 8][4];   // O accumulator: n-tile d holds dims 8 d .. 8 d + 7
#pragma unroll
    for (int d = 0; d < AP_D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY;   // running max (log2 units) of rows g, g + 8
    float l_lo = 0.f, l_hi = 0.f;               // running sum of this lane's columns only (quad-summed at the end)
    const float sl = scale * 1.4426950408889634f;   // scale * log2(e)

    for (int kb = 0; kb < nkb; kb++) {
        if (kb + 1 < nkb) load_kv((kb + 1) & 1, kb + 1);
        cp_async_commit();   // (possibly empty) group of block kb + 1
        cp_async_wait<1>();  // block kb has landed (this lane's copies) ...
        __syncwarp();           // ... and every lane's
        const __half* ks_ = sw[kb & 1][0];
        const __half* vs_ = sw[kb & 1][1];

        // S = Q K^T: 16 x AP_KB, n-tile c holds keys 8 c .. 8 c + 7 of the block
        float s[AP_KB / 8][4];
#pragma unroll
        for (int c = 0; c < AP_KB / 8; c++) s[c][0] = s[c][1] = s[c][2] = s[c][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < AP_D / 16; ks++) {
#pragma unroll
            for (int nj = 0; nj < AP_KB / 16; nj++) {
                unsigned b[4];   // keys 16 nj + (0..7 | 8..15) x dims 16 ks + (0..7 | 8..15)
                const int row = 16 * nj + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(b, &ks_[ap_swz(row, 2 * ks + ((lane >> 3) & 1))]);
                mma16816(s[2 * nj], qf[ks], &b[0]);
                mma16816(s[2 * nj + 1], qf[ks], &b[2]);
            }
        }

        // causal mask, block row max (rows are spread over the 4 lanes of a quad)
        const int j0 = kb * AP_KB + 2 * q4;
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int c = 0; c < AP_KB / 8; c++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + 8 * c + e;
                s[c][e] = j <= pos_lo ? s[c][e] * sl : -INFINITY;
                s[c][2 + e] = j <= pos_hi ? s[c][2 + e] * sl : -INFINITY;
                mx_lo = fmaxf(mx_lo, s[c][e]);
                mx_hi = fmaxf(mx_hi, s[c][2 + e]);
            }
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, x));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, x));
        }
        // new max is finite: block 0 holds key 0, which every row sees; a fully masked later block keeps m
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float c_lo = exp2f(m_lo - mn_lo), c_hi = exp2f(m_hi - mn_hi);   // 0 at block 0 (m = -inf)
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= c_lo;
        l_hi *= c_hi;
#pragma unroll
        for (int c = 0; c < AP_KB / 8; c++) {
            s[c][0] = exp2f(s[c][0] - m_lo);
            s[c][1] = exp2f(s[c][1] - m_lo);
            s[c][2] = exp2f(s[c][2] - m_hi);
            s[c][3] = exp2f(s[c][3] - m_hi);
            l_lo += s[c][0] + s[c][1];
            l_hi += s[c][2] + s[c][3];
        }
#pragma unroll
        for (int d = 0; d < AP_D / 8; d++) {
            o[d][0] *= c_lo;
            o[d][1] *= c_lo;
            o[d][2] *= c_hi;
            o[d][3] *= c_hi;
        }

        // O += P V: P's accumulator layout is the A fragment layout (keys 16 kk .. 16 kk + 15 per k-step)
#pragma unroll
        for (int kk = 0; kk < AP_KB / 16; kk++) {
            unsigned pa[4] = {ap_pack_half2(s[2 * kk][0], s[2 * kk][1]), ap_pack_half2(s[2 * kk][2], s[2 * kk][3]),
                              ap_pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              ap_pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < AP_D / 16; np++) {
                unsigned b[4];   // keys 16 kk + (0..7 | 8..15) x dims 16 np + (0..7 | 8..15), transposed
                const int row = 16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3);
                ldmatrix_x4_trans(b, &vs_[ap_swz(row, 2 * np + (lane >> 4))]);
                mma16816(o[2 * np], pa, &b[0]);
                mma16816(o[2 * np + 1], pa, &b[2]);
            }
        }
        __syncwarp();   // every lane is done with stage kb & 1 before block kb + 2 overwrites it
    }
    cp_async_wait<0>();

    // O / l -> stage 0's K buffer (swizzled 16 x 64) -> 16-byte stores of rows < n
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, x);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, x);
    }
    const float i_lo = 1.f / l_lo, i_hi = 1.f / l_hi;
    __half* os = sw[0][0];
#pragma unroll
    for (int d = 0; d < AP_D / 8; d++) {
        *reinterpret_cast<__half2*>(&os[ap_swz(g, d) + 2 * q4]) = __floats2half2_rn(o[d][0] * i_lo, o[d][1] * i_lo);
        *reinterpret_cast<__half2*>(&os[ap_swz(g + 8, d) + 2 * q4]) = __floats2half2_rn(o[d][2] * i_hi, o[d][3] * i_hi);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < AP_TILE * 8 / 32; i++) {
        const int id = lane + 32 * i, row = id >> 3, ch = id & 7;
        if (row < n)
            *reinterpret_cast<uint4*>(out + (size_t)(r0 + row) * C + h * AP_D + ch * 8) =
                *reinterpret_cast<const uint4*>(&os[ap_swz(row, ch)]);
    }
}
