"""The attention kernels' registry records and launchers (transformer.cu, attention_prefill.cu), a mixin of Kernels
(kernels.py, which launches them through Kernels.launch): which decode attention kernel a step runs, by its rows,
heads and cache length."""
import numpy as np

from gpt2job.backends.cuda.kernels_select import _kernel, ptr


class AttentionKernels:
    """Launchers of the attention kernels (Kernels inherits them; self.n_sm and self.launch are Kernels')."""

    ATTENTION = {(False, False, 0): _kernel("attention_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (False, True, 0): _kernel("attention_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, False, 1): _kernel("attention_grouped_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 1): _kernel("attention_grouped_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, False, 4): _kernel("attention_grouped_long_f32", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 4): _kernel("attention_grouped_long_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 8): _kernel("attention_grouped_short_f16", "transformer.cu", "PPPPiPPiiiif", 128),
                 (True, True, 9): _kernel("attention_grouped_ahead_f16", "transformer.cu", "PPPPiPPiiiif", 128)}
    ATTENTION_LONG_FROM = 128   # cache positions S from which the grouped kernel loads 4 key steps ahead, not 1
                                # (W2's S of 768: 3.3% faster jobs; W1's ~24: slower; RESULTS.md, session 19)
    ATTENTION_SHORT_WARPS = 16  # fp16: 8 key steps a round while the step's warps fit this many an SM, at any S
    ATTENTION_AHEAD_WARPS = 12  # ... and the next round's in flight while they fit this many (3 blocks an SM)

    # fp16 steps that would take key steps one at a time (many rows, S < ATTENTION_LONG_FROM) run blocks that each
    # copy whole rows (keys, values, query) into shared memory, up to this many rows in buffers at once (3: the
    # next two in flight), where that many buffers of 2 S C + C halves fit (the same results; RESULTS.md, session 41)
    ATTENTION_ROWS = {2: _kernel("attention_rows2_f16", "transformer.cu", "PPPPiPPiiiif", 384),   # threads: at most
                      3: _kernel("attention_rows3_f16", "transformer.cu", "PPPPiPPiiiif", 384)}
    ATTENTION_ROWS_BUFFERS = 3   # 0: never

    def setup_attention(self, drv):
        """Let the rows kernels take the dynamic shared memory they may be given (beyond the default 48 KB)."""
        dev = drv.Context.get_device()
        optin = dev.get_attribute(drv.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        self.attention_smem_sm = dev.get_attribute(drv.device_attribute.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
        rooms = []
        for k in self.ATTENTION_ROWS.values():
            f = self.funcs[k.name]
            rooms.append(optin - f.get_attribute(drv.function_attribute.SHARED_SIZE_BYTES))
            f.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, rooms[-1])
        self.attention_smem_room = min(rooms)

    def rows_buffers(self, H, D, S):
        """How many row buffers the rows kernel gets at this shape (0: it does not run)."""
        per = (2 * S + 1) * H * D * 2
        fit = [n for n in self.ATTENTION_ROWS if n <= self.ATTENTION_ROWS_BUFFERS and n * per <= self.attention_smem_room]
        return max(fit, default=0)

    def attention(self, stream, half, qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, scale,
                  grouped=None, keys=None):
        """Causal attention of R rows over the cache, one warp per (row, head). grouped (default: when D in 8,
        16, 32, 64, 128): the lane-group kernel, else the lane-per-key one. keys: the grouped kernel's key steps loaded
        ahead, 1, 4, 8 or 9 (fp16; 9: 8 and the next 8 in flight), or 0 with grouped: blocks that copy whole rows
        into shared memory ahead of the one they compute (fp16) (default: by the constants above). Same results."""
        if R:
            assert D <= 128
            grouped = D in (8, 16, 32, 64, 128) if grouped is None else grouped
            assert not grouped or D in (8, 16, 32, 64, 128)
            if not grouped:
                keys = 0
            nw = R * H
            if grouped and keys is None:
                per_sm = nw / self.n_sm
                keys = 9 if half and per_sm <= self.ATTENTION_AHEAD_WARPS else 8 if half and \
                    per_sm <= self.ATTENTION_SHORT_WARPS else 4 if S >= self.ATTENTION_LONG_FROM else 1
                if keys == 1 and half and (H * D) % 8 == 0 and self.rows_buffers(H, D, S):
                    keys = 0
            if grouped and keys == 0:
                nbuf = self.rows_buffers(H, D, S)
                assert half and (H * D) % 8 == 0 and nbuf
                smem = nbuf * (2 * S + 1) * H * D * 2
                per_sm = max(1, self.attention_smem_sm // (smem + 1024))   # blocks an SM (1 KB: the system's)
                self.launch(self.ATTENTION_ROWS[nbuf], (min(R, per_sm * self.n_sm), 1, 1), stream, qkv, kc, vc,
                            row_slot, slot_base, row_pos, out, R, H, D, S, np.float32(scale), shared=smem,
                            block=(min(32 * H, self.ATTENTION_ROWS[nbuf].threads), 1, 1))
                return
            self.launch(self.ATTENTION[grouped, half, keys], ((nw + 3) // 4, 1, 1), stream,
                        qkv, kc, vc, row_slot, slot_base, row_pos, out, R, H, D, S, np.float32(scale))

    ATTENTION_PREFILL = _kernel("attention_prefill_f16", "attention_prefill.cu", "PPPPiPPPiiiif", 128)

    def attention_prefill(self, stream, qkv, kc, vc, row_slot, slot_base, row_pos, out, tiles, n_tiles, row_base,
                          H, D, S, scale):
        """Tensor-core causal attention (fp16, D == 64) of the rows covered by tiles: int32 [n_tiles, 2] pairs
        {first_row, n_rows} (8-byte aligned), each 1..16 rows of ONE sequence (one slot), e.g. consecutive tokens
        of a prompt. first_row counts from the chunk's first row; qkv, row_slot, row_pos and out point at the
        pass's first row, which is chunk row row_base. Same results as attention(half=True) on those rows."""
        if n_tiles:
            assert D == 64 and ptr(tiles) % 8 == 0
            nw = n_tiles * H   # one warp per (tile, head), 4 warps per block
            self.launch(self.ATTENTION_PREFILL, ((nw + 3) // 4, 1, 1), stream, qkv, kc, vc, row_slot, slot_base,
                        row_pos, out, tiles, n_tiles, row_base, H, S, np.float32(scale))
