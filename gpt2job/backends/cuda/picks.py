"""Which fp16 tile variant runs a product: the picks measured fastest on H100 (benchmarks/RESULTS.md, kernel
tables), among the variants compiled. Pure Python: a TilePicker holds the tile records (kernels.F16_TILES), the
names of the compiled variants, the GPU's SM count and the kernel options."""


NARROW = "t32x64k64s4"      # the decode tile of small products (when compiled) ...
NARROW_OUTPUTS = 800_000    # ... of at most this many outputs (rows x columns)
NARROW_K128 = "t32x64k128s4"  # ... its twin on 128-wide k slices where its blocks fit on the SMs in one wave, two an SM
NARROWEST = ("t32x32k128s4", "t32x32k64s8")   # ... and of products whose 32x32 tiles fit on the SMs in one wave: the
                                              # first compiled (the second: the earlier default, a fallback)
STAGED_FROM = 1800          # the staged-epilogue TMA kernels from this many rows (benchmarks/RESULTS.md)
PINGPONG_FROM = 1024        # the ping-pong kernel (tma128pp) for the layer products from this many rows (where no
                            # swapped tile is compiled: else from SWAP_ROWS[1] + 1, N > K, or SWAP_NARROW_TO + 1)
SWAP_ROWS = (192, 1024)     # the swapped decode tiles (gemm_swap.cu) for the layer products of this many rows (both
                            # ends included) ...
SWAP_WIDE_FROM = 128        # ... from this many for those with more outputs than inputs (QKV, MLP up) ...
SWAP_NARROW_TO = 2048       # ... and up to this many for the others (attention out, MLP down): measured at 137 and
                            # 2,048 rows once their k-loops issued fewer instructions (benchmarks/RESULTS.md)


class TilePicker:
    def __init__(self, tiles, variants, n_sm, options):
        self.tiles = tiles                  # {name: F16Tile}
        self.variants = tuple(variants)     # the compiled ones, in compile order
        self.n_sm = n_sm
        self.options = options

    def pick_f16(self, M, N, out_half=True, K=768):
        """The tile for an M x N x K product. The layer products (N <= 16,384, not the LM head) of SWAP_ROWS rows on
        the swapped tiles (pick_swap: shorter decode steps at 192-1,024 rows, shorter still with their coalesced
        epilogue and one wave of 160- and 208-row tiles at 768-1,024 rows; RESULTS.md, "swapped decode products"), and
        those with N > K from SWAP_WIDE_FROM rows, those with N <= K up to SWAP_NARROW_TO rows. Else,
        from PINGPONG_FROM rows, the layer products on the ping-pong kernel tma128pp
        (options.tma_staged; benchmarks/RESULTS.md). Else (tma128pp not compiled: the default compiles it), from
        STAGED_FROM rows, the staged-epilogue kernels (options.tma_staged): half outputs on 128x192 tiles except mlp-up
        up to 16,384 rows (plain tma128), float outputs (the residual adds) on 128x128 tiles except attention-out at
        8,192-16,384 rows; the LM head is not staged. Otherwise: wide float outputs (the LM head's logits) on tma128,
        else the mma.sync 128x128 tiles; K >= 2048 on the TMA tiles chosen by the wave model; tma128 from 16 waves of
        128x128 tiles, wgmma from 4, else mma.sync; under 4,096 rows (decode steps) a NARROWEST tile where its blocks
        fit on the SMs at once, else the NARROW tile (NARROW_K128 where its blocks fit two an SM at once) up to
        NARROW_OUTPUTS outputs, else tma128 for K >= 2048, t64x128k64s4 under 1,024 rows, else wgmma. Variants not
        compiled are skipped; options.tma_persistent takes the persistent twin of the pick where compiled."""
        vs = self.variants
        if len(vs) == 1:
            return vs[0]
        lo, hi = (SWAP_WIDE_FROM, SWAP_ROWS[1]) if N > K else (SWAP_ROWS[0], SWAP_NARROW_TO)
        if N <= 16384 and lo <= M <= hi:
            swap = self.pick_swap(M, N)
            if swap:
                return swap
        if self.options.tma_staged and M >= PINGPONG_FROM and N <= 16384 and "tma128pp" in vs:
            return "tma128pp"
        if self.options.tma_staged and M >= STAGED_FROM and (out_half or N <= 16384):
            if out_half:
                v = "tma192s" if N < 3072 or M > 16384 else "tma128"
            else:
                v = "tma128s" if K >= 2048 or M > 16384 or M < 8192 else "tma192s"
            if v in vs:
                return v
        v = self._pick_f16(M, N, out_half, K, vs)
        if self.options.tma_persistent and v + "p" in vs:
            return v + "p"
        return v

    def pick_argmax(self, M, N, K=768):
        """The tile of the greedy LM head (the product with the (max, argmax) epilogue): options.argmax_variant if
        set, else a persistent TMA kernel where compiled (it walks the M tiles fastest, so the vocabulary matrix,
        larger than the L2, is read from memory once, not once per 128 rows), else the mma.sync 128x128 tile, else
        the plain product's pick. (The ping-pong tma128pp, M tiles fastest too for the head, measured no faster in
        whole decode steps: benchmarks/RESULTS.md.)"""
        vs = self.variants
        if self.options.argmax_variant:
            return self.options.argmax_variant
        for v in ("tma192p", "tma192s", "tma128s", "tma128p", "t128x128k64s3"):   # fastest first
            if v in vs:
                return v
        return self.pick_f16(M, N, False, K)

    def pick_swap(self, M, N):
        """The compiled swapped tile (gemm_swap.cu, one block an SM) for M token rows and N output columns, or None:
        the fewest waves of blocks x the rows each block loads (weight + token rows, for every k slice), ties to the
        smaller block."""
        best = None
        for v in self.variants:
            t = self.tiles[v]
            if t.family != "swap":
                continue
            waves = -(-(-(-M // t.bm) * -(-N // t.bn)) // self.n_sm)
            key = (waves * (t.bm + t.bn), t.bm * t.bn)
            if best is None or key < best[0]:
                best = (key, v)
        return best and best[1]

    def _pick_f16(self, M, N, out_half, K, vs):
        tiles = self.tiles
        # an mma.sync variant (runs anywhere): the measured best one, else the first compiled
        mma = "t128x128k64s3" if "t128x128k64s3" in vs else next((v for v in vs if tiles[v].family == "mma"), None)
        tma = [v for v in vs if tiles[v].family == "tma" and not tiles[v].persistent]
        if not out_half and N > 16384:   # the LM head's logits (tma128 faster than the mma.sync
            # tile at 546-8,192 rows: benchmarks/RESULTS.md)
            if "tma128" in vs:
                return "tma128"
            if mma is not None:
                return mma
        # decode-sized products (benchmarks/RESULTS.md: GPU times at 137-2,048 rows, then whole jobs);
        # prefill passes this small take the same picks. Up to ~800k outputs a product makes too few larger tiles to
        # fill the SMs: 32x64 tiles (a 4-stage pipeline measured as fast as 8 there, and faster at 1,024 rows); 32x32
        # tiles where they make at most one block per SM (with more blocks than SMs they were slower).
        # Both on 128-wide k slices where their blocks still fit on the SMs at once (half the K loop's
        # barriers; 32x64 blocks in two waves made steps slower)
        if M < 4096:
            one_wave = -(-M // 32) * -(-N // 32) <= self.n_sm      # of 32x32 blocks
            narrow = NARROW_K128 if -(-M // 32) * -(-N // 64) <= 2 * self.n_sm and NARROW_K128 in vs else NARROW
            narrowest = next((v for v in NARROWEST if v in vs), None)
            small = narrowest if one_wave and narrowest else \
                narrow if M * N <= NARROW_OUTPUTS and narrow in vs else \
                "tma128" if K >= 2048 else "t64x128k64s4" if M < 1024 else "wgmma"
            if small in vs:
                return small
        waves128 = ((M + 127) // 128) * ((N + 127) // 128) / (4 * self.n_sm)   # in units of 4 waves

        def cost(v):   # whole waves of blocks x per-block work / speed
            t = tiles[v]
            n_tiles = ((M + 127) // 128) * ((N + t.bn - 1) // t.bn)
            waves = (n_tiles + self.n_sm * t.blocks_per_sm - 1) // (self.n_sm * t.blocks_per_sm)
            return waves * t.bn * t.blocks_per_sm / t.efficiency

        deep = [v for v in tma if v != "tma128"]
        if K >= 2048 and deep:
            return min(deep, key=cost)
        if waves128 >= 4 and "tma128" in vs:
            return "tma128"
        if waves128 >= 1 and "wgmma" in vs:
            return "wgmma"
        if mma is not None:
            return mma
        return min(tma, key=cost) if tma else vs[0]
