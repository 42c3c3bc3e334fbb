"""The CUDA backend: the whole GPT-2 forward pass and token selection on one GPU, kernels in cuda_src/*.cu.

pycuda is imported only inside this module (lazily, from CudaBackend.__init__), so the rest of the
package imports without it. The GPU is chosen from local_rank before CUDA creates a context.

Work layout per chunk:
  * prefill: the prompts' tokens packed ragged ([total_tokens, C], no padding), each token carrying its
    sequence slot and position; ragged causal attention reads the slot's KV cache; the LM head and token
    selection run only on each prompt's last position. Prompts that start alike compute that prefix once
    (gpt2job.backends.cuda.prefix_share: lexicographic order, the shared key/value rows copied per layer by kv_copy).
  * decode: one row per still-active sequence; a step's input tokens are the previous step's output, on the
    GPU, so each step is launched before the previous step's tokens reach the host (one token id per row
    downloaded, logits never leave the GPU). A sequence that stopped is dropped from the step after next.
  * KV cache: per layer [slots, S, C] for K and V, S = longest prompt + max_new_tokens of the group.
    Sequences are grouped (kv_groups: even groups) so the cache fits the memory budget, 80% of the memory
    free after weights and activations; prefill passes are capped at max_prefill_rows tokens.
Precisions: "float32" (plain FP32 FMA GEMM, no TF32; split-K for decode-sized products) and "float16" (tensor
cores with fp32 accumulation: on Hopper TMA + wgmma, cp.async + wgmma or mma.sync tiles per product shape,
see cuda_kernels.Kernels.pick_f16; mma.sync elsewhere; residual stream, layer-norm statistics, softmax and
logits in fp32).
Fusions: the QKV GEMM epilogue writes keys/values straight into the KV cache (EPI_QKV); greedy fp16: the LM head
GEMM has a (max, argmax) epilogue, so the logits never reach memory (GPT2JOB_FUSE_ARGMAX=0: logits + argmax).
last_logits(prompts) gives the last-position logits computed by these kernels (tests, fp16-vs-fp32 checks).
Prefill attention in float16 with head size 64 runs on tensor cores (attention_prefill, cuda_src/attention_prefill.cu)
over tiles of up to 16 consecutive tokens of one prompt (prefill_tiles); GPT2JOB_PREFILL_ATTN=0 switches it off
(the per-row kernel then serves the prefill too, as it always serves decode, float32 and other head sizes).

Overlap: submit(chunk) uploads a chunk's tokens from a pinned buffer on a copy stream and returns at
once; result() runs the oldest submitted chunk on the compute stream. generate_many(chunks) submits
chunk i+1 before computing chunk i, so the upload overlaps the compute. self.timeline gets one dict per
chunk with CUDA-event times (ms since the backend started) of its upload, compute and last download.
"""
import collections
import dataclasses
import math
import os
import time

import numpy as np

from gpt2job.backends.cuda import prefix_share
from gpt2job.backends import Backend
from gpt2job.chunks import Completions, FINISH_LENGTH, FINISH_STOP
from gpt2job.errors import UserError

EPI_QKV = 4   # cuda_kernels.EPI_QKV (kept here: cuda_kernels imports pycuda at module level)

_TANH_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def prefill_passes(offsets, b0, b1, max_rows):
    """Split prompts b0..b1-1 (prompt b is tokens offsets[b]..offsets[b+1]) into passes of whole prompts
    holding at most max_rows tokens (a longer prompt gets a pass of its own). Yields (first, end)."""
    p0 = b0
    while p0 < b1:
        p1 = p0 + 1
        while p1 < b1 and offsets[p1 + 1] - offsets[p0] <= max_rows:
            p1 += 1
        yield p0, p1
        p0 = p1


PREFILL_TILE_ROWS = 16   # query rows per attention_prefill tile (the kernel's AP_TILE)


def prefill_tiles(offsets):
    """Tiles of attention_prefill for prompts b (tokens offsets[b]..offsets[b+1]): each prompt's tokens in tiles of
    PREFILL_TILE_ROWS consecutive rows, the last one partial. Returns (tiles int32 [NT, 2] {first_row, n_rows},
    tile_off int64 [B + 1]: prompt b's tiles are tile_off[b]..tile_off[b+1])."""
    offsets = np.asarray(offsets, np.int64)
    lens = np.diff(offsets)
    ntile = (lens + PREFILL_TILE_ROWS - 1) // PREFILL_TILE_ROWS          # [B]
    tile_off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(ntile, out=tile_off[1:])
    tp = np.repeat(np.arange(len(lens)), ntile)                           # prompt of each tile [NT]
    first = PREFILL_TILE_ROWS * (np.arange(int(tile_off[-1])) - tile_off[:-1][tp])   # first row within its prompt
    tiles = np.empty((len(tp), 2), np.int32)
    tiles[:, 0] = offsets[:-1][tp] + first
    tiles[:, 1] = np.minimum(PREFILL_TILE_ROWS, lens[tp] - first)
    return tiles, tile_off


def kv_groups(lens, extra, bytes_per_position, budget):
    """Split prompts 0..B-1 (lengths lens) into consecutive groups whose KV caches fit budget bytes, a group
    of n prompts taking n x (its longest prompt + extra) positions. Greedy, then evened out: as many groups
    as greedy needs, of near-equal size when that fits too (a small last group would leave the GPU idle in
    decode). A prompt too long for the budget on its own still gets a group. Returns [(b0, b1), ...]."""
    lens = np.asarray(lens, np.int64)
    B = len(lens)

    def fits(b0, b1):
        return b1 - b0 == 1 or (b1 - b0) * (int(lens[b0:b1].max()) + extra) * bytes_per_position <= budget

    greedy, b0 = [], 0
    while b0 < B:
        lo, hi = b0 + 1, B          # the largest b1 with fits(b0, b1): fits is monotone in b1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(b0, mid) else (lo, mid - 1)
        greedy.append((b0, lo))
        b0 = lo
    n = len(greedy)
    if n > 1:
        cuts = [B * i // n for i in range(n + 1)]
        even = list(zip(cuts[:-1], cuts[1:]))
        if all(fits(a, b) for a, b in even):
            return even
    return greedy


class _Upload:
    """A pinned host buffer + device buffer pair for one in-flight chunk upload."""

    def __init__(self):
        self.host = None
        self.dev = None
        self.nbytes = 0
        self.busy = False
        self.done_evt = None   # recorded when the copy finished (host buffer reusable)

    def reserve(self, drv, nbytes):
        """Room for at least nbytes (a smaller buffer pair is replaced by one of exactly nbytes)."""
        if self.nbytes >= nbytes:
            return
        if self.dev is not None:
            self.dev.free()
        self.host, self.dev = drv.pagelocked_empty(nbytes, np.uint8), drv.mem_alloc(nbytes)
        self.nbytes = nbytes


class CudaBackend(Backend):
    name = "cuda"
    preferred_chunk = 8192   # prompts per chunk: big batches keep the tensor cores busy

    def __init__(self, params, settings, dtype="float32", local_rank=0, share_gpus=False,
                 max_prefill_rows=131072, head_rows=8192):
        if dtype not in ("float32", "float16"):
            raise UserError(f"dtype {dtype!r} is not supported by the cuda backend", None, "dtype",
                            "use float32 or float16")
        cfg = params.config
        if cfg.activation_function == "gelu":
            self._act_mode = 2
        elif cfg.activation_function in _TANH_ACTS:
            self._act_mode = 1
        else:
            raise UserError(f"activation_function {cfg.activation_function!r} is not supported by the cuda backend",
                            None, "activation_function", "use gelu_new or gelu")
        if cfg.d_head > 128:
            raise UserError(f"head size {cfg.d_head} > 128 is not supported by the cuda backend", None, "n_head",
                            "use a GPT-2 config with n_embd / n_head <= 128")
        if dtype == "float16" and (cfg.n_embd % 8 or cfg.d_mlp % 8):
            raise UserError(f"float16 needs n_embd and the MLP width to be multiples of 8 "
                            f"(got {cfg.n_embd}, {cfg.d_mlp})", None, "dtype", "use --dtype float32")
        # every kernel of a module is loaded with the module (before the worker reports ready), not at its first
        # launch inside the first chunk (CUDA's default is lazy loading); read when CUDA initialises
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        import pycuda.driver as drv
        self.drv = drv
        drv.init()
        count = drv.Device.count()
        if count == 0:
            raise UserError("no CUDA GPU is visible", None, "backend", "use --backend numpy or run on a GPU node")
        if local_rank >= count and not share_gpus:
            raise UserError(f"worker #{local_rank + 1} on this node, but the node has only {count} GPU(s)", None,
                            "-np", f"start at most {count} worker(s) per node (the master, rank 0, needs no GPU "
                                   f"of its own: mpirun -np {count + 1} on one node), or pass --share-gpus")
        self.gpu_index = local_rank % count
        self.dev = drv.Device(self.gpu_index)
        self.ctx = self.dev.make_context()
        try:
            self._setup(params, settings, dtype, local_rank, max_prefill_rows, head_rows, share_gpus)
        except BaseException:
            self.ctx.pop()
            self.ctx.detach()
            self.ctx = None
            raise

    # ---------------------------------------------------------------- setup

    def _setup(self, params, settings, dtype, local_rank, max_prefill_rows, head_rows, share_gpus):
        from gpt2job.backends.cuda.kernels import Kernels
        drv = self.drv
        self.params = params
        self.cfg = cfg = params.config
        self.settings = settings
        self.dtype = dtype
        self.half = dtype == "float16"
        self.elt = 2 if self.half else 4
        self.max_prefill_rows = int(max_prefill_rows)
        self.head_rows = int(head_rows)
        self.k = Kernels(local_rank)
        self.fuse_kv = "v0" not in self.k.f16_variants   # EPI_QKV needs the templated fp16 GEMMs
        # greedy fp16: LM head GEMM with the (max, argmax) epilogue instead of logits + argmax (GPT2JOB_FUSE_ARGMAX=0:
        # logits + argmax kernel)
        self.fuse_argmax = os.environ.get("GPT2JOB_FUSE_ARGMAX", "1") != "0"
        # shared prompt prefixes computed once (gpt2job.backends.cuda.prefix_share); GPT2JOB_PREFIX_SHARE=0: every prompt token
        self.prefix_share = os.environ.get("GPT2JOB_PREFIX_SHARE", "1") != "0"
        # fp16 prefill attention on tensor cores (head size 64); GPT2JOB_PREFILL_ATTN=0: the per-row kernel
        self.prefill_attn = (self.half and cfg.d_head == 64 and
                             os.environ.get("GPT2JOB_PREFILL_ATTN", "1") != "0")
        self.compute = drv.Stream()
        self.copy = drv.Stream()
        self._allocs = []
        self._bufs = {}
        C, V = cfg.n_embd, cfg.vocab_size
        self.V = V
        self.Vpad = (V + 127) // 128 * 128
        f32 = np.float32

        def up(a, dt=f32):
            a = np.ascontiguousarray(a, dtype=dt)
            g = drv.mem_alloc(max(a.nbytes, 16))
            drv.memcpy_htod(g, a)
            self._allocs.append(g)
            return g

        def wmat(w):   # Conv1D [K, N] -> fp32 [K, N] or fp16 [N, K]
            return up(np.asarray(w, f32).T, np.float16) if self.half else up(w)

        self.wte = up(params.wte)
        self.wpe = up(params.wpe)
        self.layers = []
        for L in params.layers:
            self.layers.append({
                "ln1_w": up(L["ln_1.weight"]), "ln1_b": up(L["ln_1.bias"]),
                "ln2_w": up(L["ln_2.weight"]), "ln2_b": up(L["ln_2.bias"]),
                "qkv_w": wmat(L["attn.c_attn.weight"]), "qkv_b": up(L["attn.c_attn.bias"]),
                "proj_w": wmat(L["attn.c_proj.weight"]), "proj_b": up(L["attn.c_proj.bias"]),
                "fc_w": wmat(L["mlp.c_fc.weight"]), "fc_b": up(L["mlp.c_fc.bias"]),
                "fc2_w": wmat(L["mlp.c_proj.weight"]), "fc2_b": up(L["mlp.c_proj.bias"]),
            })
        self.lnf_w = up(params.ln_f_w)
        self.lnf_b = up(params.ln_f_b)
        head = np.asarray(params.head, f32)                       # [V, C]
        if self.half:
            self.head_w = up(head, np.float16)                   # [V, C] = [N, K]
        else:
            ht = np.zeros((C, self.Vpad), f32)                   # [C, Vpad] = [K, N] padded
            ht[:, :V] = head.T
            self.head_w = up(ht)
        self._uploads = []
        self._pending = collections.deque()
        self.timeline = []
        self.t0 = drv.Event()
        self.t0.record(self.compute)
        self.t0.synchronize()
        # memory budget for the KV cache: half of what is free after the weights, less the activations
        free, _total = drv.mem_get_info()
        d_mlp = cfg.d_mlp
        act = self.max_prefill_rows * (4 * C + self.elt * (C + 3 * C + C + d_mlp) + 16)
        act += self.head_rows * (self.Vpad * 4 + C * self.elt)
        if not self.half:
            act += 4 * 4 * self.head_rows * 4096            # split-K workspace of the fp32 decode products
        # most of the rest for the KV cache (less when ranks share the GPU)
        self.kv_budget = max(int((0.4 if share_gpus else 0.8) * (free - act)), 64 << 20)
        self.tok_host = self.step_host = np.empty(0, np.int32)   # pinned by _step_buffers
        self._reserve(share_gpus)

    def _reserve(self, share_gpus):
        """Allocate the large buffers now, before the worker says it is ready: the activations at their largest,
        the fp32 split-K workspace, the LM head's output and (unless ranks share the GPU: they all measured the
        same free memory) the KV cache at its budget. Growing them during the first chunk would put allocations,
        and the synchronisations that come with freeing a smaller buffer, inside the timed generation."""
        cfg, e = self.cfg, self.elt
        R, C, hr = self.max_prefill_rows, cfg.n_embd, self.head_rows
        for name, nbytes in (("x", R * C * 4), ("h", R * C * e), ("qkv", R * 3 * C * e), ("att", R * C * e),
                             ("fc", R * cfg.d_mlp * e), ("hl", hr * C * e), ("tok_out", 2 * hr * 4),
                             ("step_in", 3 * hr * 4)):
            self._buf(name, nbytes)
        if not share_gpus:
            self._buf("kv", self.kv_budget)
        if not self.half:
            self._buf("splitk", 4 * 4 * hr * 4096)
        var = self._argmax_variant(hr) if self.settings.sampling.greedy else None
        if var is not None:
            from gpt2job.backends.cuda.kernels import F16_WN
            self._buf("argmax_part", hr * -(-self.V // F16_WN[var]) * 8)
        else:
            self._buf("logits", hr * self.Vpad * 4)
        # pinned host buffers: two decode steps' inputs and tokens, and uploads sized for a chunk of max_prefill_rows
        # tokens in 16-token prompts (submit's layout: 12 bytes per token, ~20 per prompt, 12 per shared-prefix copy;
        # a chunk that needs more grows it there)
        self._step_buffers(hr)
        for _ in range(2):   # the worker keeps two chunks submitted (the next one uploads during this one)
            u = _Upload()
            u.reserve(self.drv, 20 * R)
            self._uploads.append(u)

    def _step_buffers(self, n):
        """Pinned host room for two decode steps of n rows: their inputs (step_host, 3 int32 per row: a step's
        upload may still wait for the GPU while the next step's is written) and their tokens (tok_host)."""
        if self.step_host.size < 6 * n:
            self.step_host = self.drv.pagelocked_empty(max(6 * n, 6144), np.int32)
        if self.tok_host.size < 2 * n:
            self.tok_host = self.drv.pagelocked_empty(max(2 * n, 2048), np.int32)

    def _buf(self, name, nbytes):
        nbytes = max(int(nbytes), 16)
        cur = self._bufs.get(name)
        if cur is None or cur[1] < nbytes:
            if cur is not None:
                self.compute.synchronize()
                cur[0].free()
            self._bufs[name] = (self.drv.mem_alloc(nbytes), nbytes)
        return int(self._bufs[name][0])

    def describe(self):
        return {"backend": self.name, "dtype": self.dtype, "device": self.dev.name(), "gpu_index": self.gpu_index,
                "compute_capability": "%d.%d" % self.dev.compute_capability()}

    def close(self):
        if getattr(self, "ctx", None) is None:
            return
        try:
            self.compute.synchronize()
            self.copy.synchronize()
        finally:
            if getattr(self, "k", None) is not None and self.k.tmaps is not None:
                self.k.tmaps.free()
            for a in self._allocs:
                a.free()
            for b, _ in self._bufs.values():
                b.free()
            for u in self._uploads:
                if u.dev is not None:
                    u.dev.free()
            self._allocs, self._bufs, self._uploads = [], {}, []
            self.ctx.pop()
            self.ctx.detach()
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- async chunk API

    def submit(self, chunk, share=None):
        """Validate the chunk and start uploading its tokens on the copy stream; returns at once.
        share (default self.prefix_share): compute shared prompt prefixes once (gpt2job.backends.cuda.prefix_share) when that
        saves enough; the chunk's prompts then run in the plan's order (the Completions come back in the chunk's)."""
        drv = self.drv
        cfg, gs = self.cfg, self.settings
        B = len(chunk.rows)
        offsets = np.asarray(chunk.offsets, np.int64)
        lens = np.diff(offsets)
        if B and lens.min() < 1:
            raise UserError("a prompt has no tokens", None, "prompt", "give every prompt at least one token")
        if B and int(lens.max()) + max(gs.max_new_tokens, 1) - 1 > cfg.n_positions:
            raise UserError(f"prompt length {int(lens.max())} + {gs.max_new_tokens} new tokens exceeds the model's "
                            f"{cfg.n_positions} positions", None, "max_new_tokens", "use shorter prompts or fewer tokens")
        tokens = np.asarray(chunk.tokens, np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise UserError("a token id is outside the vocabulary", None, "tokens", "check the tokenizer")
        rows = np.asarray(chunk.rows, np.int64)
        sp = None
        if (self.prefix_share if share is None else share) and B > 1 and gs.max_new_tokens > 0:
            sp = prefix_share.plan(offsets, tokens, lambda ls: self._kv_groups(ls, gs.max_new_tokens))
        if sp is not None:   # the plan's order; offsets/T/tokens from here on count computed tokens only
            rows, lens, offsets = rows[sp.perm], sp.lens, sp.offsets
            tokens, pos_of_tok, seq_of_tok = sp.tokens, sp.positions, sp.seq
            copies, copy_off = sp.copies, sp.copy_off
            T = int(offsets[-1])
        else:
            T = int(offsets[-1]) if B else 0
            seq_of_tok = np.repeat(np.arange(B, dtype=np.int32), lens)
            pos_of_tok = (np.arange(T, dtype=np.int64) - np.repeat(offsets[:-1], lens)).astype(np.int32)
            copies, copy_off = np.zeros((0, 3), np.int32), np.zeros(B + 1, np.int64)
        last = (offsets[1:] - 1).astype(np.int32)
        if self.prefill_attn:
            tiles, tile_off = prefill_tiles(offsets)
        else:   # the per-row kernel needs no tiles
            tiles, tile_off = np.zeros((0, 2), np.int32), np.zeros(B + 1, np.int64)
        NT, E = len(tiles), len(copies)
        # layout (int32 words): tokens[T] pos[T] seq[T] last[B] arange[B] pad, then rows int64[B],
        # then prefill attention tiles int32[NT, 2] (8-byte aligned), then shared-prefix copies int32[E, 3]
        n32 = 3 * T + 2 * B
        n32 += n32 & 1
        nbytes = 4 * n32 + 8 * B + 8 * NT + 12 * E
        u = next((x for x in self._uploads if not x.busy), None)
        if u is None:
            u = _Upload()
            self._uploads.append(u)
        if u.done_evt is not None:
            u.done_evt.synchronize()
        if u.nbytes < nbytes:
            u.reserve(drv, max(nbytes, 1 << 16) * 5 // 4)
        u.busy = True
        h32 = u.host[:4 * n32].view(np.int32)
        h32[0:T] = tokens[:T]
        h32[T:2 * T] = pos_of_tok
        h32[2 * T:3 * T] = seq_of_tok
        h32[3 * T:3 * T + B] = last
        h32[3 * T + B:3 * T + 2 * B] = np.arange(B, dtype=np.int32)
        u.host[4 * n32:4 * n32 + 8 * B].view(np.int64)[:] = rows
        u.host[4 * n32 + 8 * B:4 * n32 + 8 * B + 8 * NT].view(np.int32)[:] = tiles.reshape(-1)
        u.host[4 * n32 + 8 * B + 8 * NT:nbytes].view(np.int32)[:] = copies.reshape(-1)
        ev0, ev1 = drv.Event(), drv.Event()
        ev0.record(self.copy)
        if nbytes:
            drv.memcpy_htod_async(u.dev, u.host[:nbytes], self.copy)
        ev1.record(self.copy)
        u.done_evt = ev1
        base = int(u.dev)
        job = {"chunk": chunk, "upload": u, "lens": lens, "offsets": offsets, "B": B, "T": T,
               "p_tok": base, "p_pos": base + 4 * T, "p_seq": base + 8 * T, "p_last": base + 12 * T,
               "p_arange": base + 12 * T + 4 * B, "p_rows": base + 4 * n32, "ev_up": (ev0, ev1),
               "p_tiles": base + 4 * n32 + 8 * B, "tile_off": tile_off,
               "p_copies": base + 4 * n32 + 8 * B + 8 * NT, "copy_off": copy_off,
               "groups": sp.groups if sp is not None else None, "perm": sp.perm if sp is not None else None,
               "shared_tokens": int(chunk.offsets[-1]) - T if sp is not None else 0}
        self._pending.append(job)
        return job

    def result(self):
        """Compute the oldest submitted chunk; returns its Completions."""
        job = self._pending.popleft()
        try:
            return self._run(job)
        finally:
            job["upload"].busy = False

    def generate(self, chunk):
        self.submit(chunk)
        return self.result()

    def warm_up(self):
        """Two 4-token prompts, 2 new tokens, through every stage (first launches, pinned buffers) so that the
        first real chunk runs at full speed; the worker calls it before it reports ready."""
        from gpt2job.chunks import Chunk
        saved = self.settings
        new = max(min(saved.max_new_tokens, 2, self.cfg.n_positions - 1), 0)
        n = max(min(4, self.cfg.n_positions - max(new, 1) + 1), 1)   # prompt length: n + new - 1 <= positions
        self.settings = dataclasses.replace(saved, max_new_tokens=new, ignore_eos=True)
        try:
            self.generate(Chunk(-1, np.arange(2, dtype=np.int64), np.array([0, n, 2 * n], np.int64),
                                np.arange(2 * n, dtype=np.int32) % self.cfg.vocab_size))
        finally:
            self.settings = saved
            self.timeline.clear()
        if self.prefix_share and saved.max_new_tokens > 0:
            # one share plan of a full-size chunk (discarded): NumPy's first pass over arrays this large (fresh
            # memory pages) took 9.8 ms on the CI machine against 2.8 ms warm, and the first chunk has nothing to
            # hide it behind
            rng = np.random.default_rng(0)
            toks = rng.integers(0, self.cfg.vocab_size, (self.preferred_chunk, 16)).astype(np.int32)   # [B, 16]
            toks[::2, :8] = toks[0, :8]
            prefix_share.plan(np.arange(self.preferred_chunk + 1, dtype=np.int64) * 16, toks.reshape(-1),
                              lambda ls: self._kv_groups(ls, saved.max_new_tokens))

    def _idle(self):
        """The host waits for the GPU here: let the worker submit chunks that arrived meanwhile, so
        their uploads (copy stream) overlap this chunk's compute."""
        if self.idle_hook is not None:
            self.idle_hook()

    def generate_many(self, chunks):
        """Yield Completions for each chunk in order; chunk i+1's upload overlaps chunk i's compute."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        self.submit(first)
        for c in it:
            self.submit(c)
            yield self.result()
        yield self.result()

    # ---------------------------------------------------------------- debug / test API

    def last_logits(self, prompts):
        """Logits [B, V] float32 at each prompt's last position, computed by our kernels in this backend's
        dtype (prompts: list of 1-D int arrays). For tests and fp16-vs-fp32 agreement checks."""
        drv, cfg = self.drv, self.cfg
        from gpt2job.chunks import Chunk
        B = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int64)
        offsets = np.zeros(B + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts]) if B else np.zeros(0, np.int32)
        res = np.empty((B, self.V), np.float32)
        if B == 0:
            return res
        if int(lens.min()) < 1:
            raise UserError("a prompt has no tokens", None, "prompt", "give every prompt at least one token")
        job = self.submit(Chunk(-1, np.arange(B, dtype=np.int64), offsets, tokens), share=False)
        self._pending.remove(job)
        try:
            self.compute.wait_for_event(job["ev_up"][1])
            C, L, V, Vp = cfg.n_embd, cfg.n_layer, self.V, self.Vpad
            S = int(lens.max())
            for b0, b1 in self._kv_groups(np.full(B, S), 0):
                per = (b1 - b0) * S * C * self.elt
                kvbase = self._buf("kv", 2 * L * per)
                kv = [(kvbase + 2 * li * per, kvbase + (2 * li + 1) * per) for li in range(L)]
                for pb0, pb1 in prefill_passes(offsets, b0, b1, self.max_prefill_rows):
                    r0, r1 = int(offsets[pb0]), int(offsets[pb1])
                    x = self._forward(r1 - r0, job["p_tok"] + 4 * r0, job["p_pos"] + 4 * r0, job["p_seq"] + 4 * r0,
                                      b0, S, kv, tiles=self._pass_tiles(job, pb0, pb1))
                    for g0 in range(pb0, pb1, self.head_rows):
                        m = min(self.head_rows, pb1 - g0)
                        hl = self._buf("hl", self.head_rows * C * self.elt)
                        logits = self._buf("logits", self.head_rows * Vp * 4)
                        self.k.layernorm(self.compute, self.half, x, job["p_last"] + 4 * g0, r0, self.lnf_w,
                                         self.lnf_b, hl, m, C, cfg.layer_norm_epsilon)
                        if self.half:
                            self.k.gemm_f16(self.compute, hl, C, self.head_w, C, logits, Vp, None, m, V, C, 0, False)
                        else:
                            self.k.gemm_f32(self.compute, hl, C, self.head_w, Vp, logits, Vp, None, m, V, C, 0)
                        host = np.empty((m, Vp), np.float32)
                        self.compute.synchronize()
                        drv.memcpy_dtoh(host, logits)
                        res[g0:g0 + m] = host[:, :V]
        finally:
            job["upload"].busy = False
        return res

    # ---------------------------------------------------------------- the forward pass

    def _kv_groups(self, lens, extra):
        """kv_groups for prompts of these lengths, each growing by extra positions, in this backend's KV budget."""
        return kv_groups(lens, extra, 2 * self.cfg.n_layer * self.cfg.n_embd * self.elt, self.kv_budget)

    def _gemm(self, A, B_w, C_out, bias, M, N, K, mode, out_half, ldc=None):
        ldc = N if ldc is None else ldc
        if self.half:
            self.k.gemm_f16(self.compute, A, K, B_w, K, C_out, ldc, bias, M, N, K, mode, out_half)
        else:
            ws = None
            if M <= self.head_rows and N < 4096:   # decode-sized products may take the split-K path
                ws = self._buf("splitk", 4 * 4 * self.head_rows * 4096)
            self.k.gemm_f32(self.compute, A, K, B_w, N, C_out, ldc, bias, M, N, K, mode, ws=ws)

    def _pass_tiles(self, job, pb0, pb1):
        """attention_prefill tiles of the prefill pass over prompts pb0..pb1-1: (pointer, count, row_base)."""
        t0, t1 = int(job["tile_off"][pb0]), int(job["tile_off"][pb1])
        return job["p_tiles"] + 8 * t0, t1 - t0, int(job["offsets"][pb0])

    def _forward(self, R, p_tok, p_pos, p_seq, slot_base, S, kv, tiles=None, copies=None):
        """Run the layers on R rows (token ids / positions / slots at the given device pointers).
        tiles (prefill passes): (device pointer, count, row_base) of the pass's attention_prefill tiles, used
        when self.prefill_attn. copies (prefill passes with shared prefixes): (device pointer, count) of the pass's
        {dst, src, pos} key/value rows to copy in each layer before its attention. Leaves the residual stream
        (before ln_f) in buffer x."""
        cfg, k, st, half = self.cfg, self.k, self.compute, self.half
        C, H, D, F = cfg.n_embd, cfg.n_head, cfg.d_head, cfg.d_mlp
        e = self.elt
        x = self._buf("x", R * C * 4)
        h = self._buf("h", R * C * e)
        qkv = self._buf("qkv", R * 3 * C * e)
        att = self._buf("att", R * C * e)
        fc = self._buf("fc", R * F * e)
        k.embed(st, p_tok, p_pos, self.wte, self.wpe, x, R, C)
        eps = cfg.layer_norm_epsilon
        for li, L in enumerate(self.layers):
            kc, vc = kv[li]
            k.layernorm(st, half, x, None, 0, L["ln1_w"], L["ln1_b"], h, R, C, eps)
            if half and self.fuse_kv and C % 2 == 0:
                # keys and values go from the GEMM epilogue straight into the cache; qkv keeps only q
                k.gemm_f16(st, h, C, L["qkv_w"], C, qkv, 3 * C, L["qkv_b"], R, 3 * C, C, EPI_QKV, True,
                           qkv=(p_seq, p_pos, slot_base, S, kc, vc, C))
            elif not half and self.fuse_kv:
                k.gemm_f32(st, h, C, L["qkv_w"], 3 * C, qkv, 3 * C, L["qkv_b"], R, 3 * C, C, EPI_QKV,
                           qkv=(p_seq, p_pos, slot_base, S, kc, vc, C))
            else:
                self._gemm(h, L["qkv_w"], qkv, L["qkv_b"], R, 3 * C, C, 0, True)
                k.kv_store(st, half, qkv, p_seq, slot_base, p_pos, kc, vc, R, C, S)
            if copies is not None:   # shared prefixes: rows computed by another prompt of the group
                k.kv_copy(st, half, copies[0], copies[1], slot_base, kc, vc, S, C)
            scale = 1.0 / math.sqrt(D)
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(li + 1)
            if tiles is not None and self.prefill_attn:
                k.attention_prefill(st, qkv, kc, vc, p_seq, slot_base, p_pos, att, tiles[0], tiles[1], tiles[2],
                                    H, D, S, scale)
            else:
                k.attention(st, half, qkv, kc, vc, p_seq, slot_base, p_pos, att, R, H, D, S, scale)
            self._gemm(att, L["proj_w"], x, L["proj_b"], R, C, C, 3, False)
            k.layernorm(st, half, x, None, 0, L["ln2_w"], L["ln2_b"], h, R, C, eps)
            self._gemm(h, L["fc_w"], fc, L["fc_b"], R, F, C, self._act_mode, True)
            self._gemm(fc, L["fc2_w"], x, L["fc2_b"], R, C, F, 3, False)
        return x

    def _head_select(self, x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out):
        """ln_f on n rows of x (gathered through p_rowidx if given), LM head, token selection into p_out."""
        cfg, k, st = self.cfg, self.k, self.compute
        C, V, Vp = cfg.n_embd, self.V, self.Vpad
        s = self.settings.sampling
        for g0 in range(0, n, self.head_rows):
            m = min(self.head_rows, n - g0)
            hl = self._buf("hl", self.head_rows * C * self.elt)
            ridx = p_rowidx + 4 * g0 if p_rowidx else None
            xin = x if p_rowidx else x + 4 * g0 * C
            k.layernorm(st, self.half, xin, ridx, idx_base, self.lnf_w, self.lnf_b, hl, m, C, cfg.layer_norm_epsilon)
            var = self._argmax_variant(m) if s.greedy else None
            if var is not None:
                # LM head GEMM with the (max, argmax) epilogue: per row one (max, column) per F16_WN[var] columns,
                # then their argmax; the logits never reach memory
                from gpt2job.backends.cuda.kernels import EPI_ARGMAX, F16_WN
                nch = (V + F16_WN[var] - 1) // F16_WN[var]
                part = self._buf("argmax_part", self.head_rows * nch * 8)
                k.gemm_f16(st, hl, C, self.head_w, C, part, nch, None, m, V, C, EPI_ARGMAX, False, variant=var)
                k.argmax_partials(st, part, nch, nch, p_out + 4 * g0, m)
                continue
            logits = self._buf("logits", self.head_rows * Vp * 4)
            if self.half:
                k.gemm_f16(st, hl, C, self.head_w, C, logits, Vp, None, m, V, C, 0, False)
            else:
                k.gemm_f32(st, hl, C, self.head_w, Vp, logits, Vp, None, m, V, C, 0)
            if s.greedy:
                k.argmax(st, logits, Vp, V, p_out + 4 * g0, m)
            else:
                k.sample(st, logits, Vp, V, p_rows, p_seqidx + 4 * g0, step, s.seed, s.temperature, s.top_k,
                         s.top_p, p_out + 4 * g0, m)

    def _argmax_variant(self, m):
        """The fp16 tile variant whose (max, argmax) epilogue serves a greedy LM head of m rows, or None (float32,
        GPT2JOB_FUSE_ARGMAX=0): Kernels.pick_argmax's."""
        if not (self.half and self.fuse_argmax):
            return None
        return self.k.pick_argmax(m, self.V, self.cfg.n_embd)

    def _wait(self, ev):
        """Wait for the event; while poll_hook reports work left (the worker's result send), call it every 0.2 ms
        instead of blocking."""
        while self.poll_hook is not None and not ev.query():
            if self.poll_hook():
                break
            time.sleep(0.0002)
        ev.synchronize()

    def _download_async(self, p_out, n, slot):
        """Copy n int32 from the GPU into pinned slot (0 or 1) of tok_host after the compute stream's work so far:
        (start event, end event, host view), the view valid once the end event completed."""
        ev0, ev1 = self.drv.Event(), self.drv.Event()
        ev0.record(self.compute)
        half = self.tok_host.size // 2
        host = self.tok_host[slot * half:slot * half + n]
        self.drv.memcpy_dtoh_async(host, p_out, self.compute)
        ev1.record(self.compute)
        return ev0, ev1, host

    def _run(self, job):
        drv, gs = self.drv, self.settings
        chunk, B, lens = job["chunk"], job["B"], job["lens"]
        out = np.zeros((B, max(gs.max_new_tokens, 0)), np.int32)   # generated tokens, row b: out[b, :gen[b]]
        gen = np.zeros(B, np.int64)
        finish = np.full(B, FINISH_LENGTH, np.uint8)
        self.compute.wait_for_event(job["ev_up"][1])
        ev_c0 = drv.Event()
        ev_c0.record(self.compute)
        self._last_down = None
        if B and gs.max_new_tokens > 0:
            groups = job["groups"] or self._kv_groups(lens, gs.max_new_tokens)
            for b0, b1 in groups:
                self._run_group(job, b0, b1, out, gen, finish)
        ev_c1 = drv.Event()
        ev_c1.record(self.compute)
        ev_c1.synchronize()
        t = lambda ev: ev.time_since(self.t0)  # noqa: E731
        entry = {"chunk_id": chunk.chunk_id, "prompts": B, "generated": int(gen.sum()),
                 "shared_prefix_tokens": job["shared_tokens"],
                 "upload": (t(job["ev_up"][0]), t(job["ev_up"][1])), "compute": (t(ev_c0), t(ev_c1))}
        if self._last_down is not None:
            entry["download"] = (t(self._last_down[0]), t(self._last_down[1]))
        for kind, a, b in job.get("phases", []):   # device time of prefill / decode steps (ms)
            entry[kind + "_ms"] = entry.get(kind + "_ms", 0.0) + b.time_since(a)
        self.timeline.append(entry)
        if job["perm"] is not None:   # back to the chunk's order (the prompts ran in the share plan's)
            back = np.argsort(job["perm"])
            out, gen, finish = out[back], gen[back], finish[back]
        offs = np.zeros(B + 1, np.int64)
        np.cumsum(gen, out=offs[1:])
        flat = out[np.arange(out.shape[1])[None, :] < gen[:, None]].astype(np.int32)
        return Completions(chunk.chunk_id, np.asarray(chunk.rows, np.int64), offs, flat, finish)

    def _run_group(self, job, b0, b1, out, gen, finish):
        drv, cfg, gs = self.drv, self.cfg, self.settings
        C, L = cfg.n_embd, cfg.n_layer
        lens, offsets = job["lens"], job["offsets"]
        ns = b1 - b0
        S = int(lens[b0:b1].max()) + gs.max_new_tokens
        per = ns * S * C * self.elt
        kvbase = self._buf("kv", 2 * L * per)
        kv = [(kvbase + 2 * li * per, kvbase + (2 * li + 1) * per) for li in range(L)]
        tok_dev = self._buf("tok_out", 2 * ns * 4)   # [0, ns): a step's tokens; [ns, 2 ns): the next step's input
        sdev = self._buf("step_in", 3 * ns * 4)     # a step's positions, rows, and gather indices
        self._step_buffers(ns)
        ev_p0 = drv.Event()
        ev_p0.record(self.compute)
        # prefill, in passes of at most max_prefill_rows tokens (whole prompts)
        for pb0, pb1 in prefill_passes(offsets, b0, b1, self.max_prefill_rows):
            r0, r1 = int(offsets[pb0]), int(offsets[pb1])
            c0, c1 = int(job["copy_off"][pb0]), int(job["copy_off"][pb1])
            x = self._forward(r1 - r0, job["p_tok"] + 4 * r0, job["p_pos"] + 4 * r0, job["p_seq"] + 4 * r0, b0, S, kv,
                              tiles=self._pass_tiles(job, pb0, pb1), copies=(job["p_copies"] + 12 * c0, c1 - c0))
            self._head_select(x, pb1 - pb0, job["p_last"] + 4 * pb0, r0, job["p_arange"] + 4 * pb0, job["p_rows"], 0,
                              tok_dev + 4 * (pb0 - b0))
        self._idle()                       # the prefill runs on the GPU: take in and upload the next chunk
        # Decode. Step s is launched before step s-1's tokens reach the host: its input tokens are step s-1's
        # output, on the GPU, so the GPU never waits for the host between steps. A row that stops (EOS) at step s-1
        # is known only after step s was launched: it computes step s for nothing (dropped here) and leaves the
        # batch from step s+1 on (its next input gathered on the GPU).
        eos = gs.eos_token_id
        alive = np.ones(ns, bool)           # row b0 + i has not stopped (as far as the host knows)
        flight = (0, np.arange(b0, b1), self._download_async(tok_dev, ns, 0), ev_p0)   # (step, rows, download, start)
        for step in range(1, gs.max_new_tokens + 1):
            nxt = None
            if step < gs.max_new_tokens:
                prev_rows = flight[1]
                keep = alive[prev_rows - b0]
                rows = prev_rows[keep]
                n = len(rows)
                if n:
                    gather = not keep.all()
                    sh = self.step_host[(step % 2) * 3 * ns:][:3 * n]
                    sh[0:n] = lens[rows] + step - 1
                    sh[n:2 * n] = rows
                    if gather:
                        sh[2 * n:3 * n] = np.flatnonzero(keep)
                    ev_d0 = drv.Event()
                    ev_d0.record(self.compute)
                    drv.memcpy_htod_async(sdev, sh[:3 * n if gather else 2 * n], self.compute)
                    p_tok = tok_dev
                    if gather:
                        p_tok = tok_dev + 4 * ns
                        self.k.gather_tokens(self.compute, tok_dev, sdev + 8 * n, p_tok, n)
                    x = self._forward(n, p_tok, sdev, sdev + 4 * n, b0, S, kv)
                    self._head_select(x, n, None, 0, sdev + 4 * n, job["p_rows"], step, tok_dev)
                    self._idle()
                    nxt = (step, rows, self._download_async(tok_dev, n, step % 2), ev_d0)
            # the previous step's tokens reach the host (the step just launched computes meanwhile)
            pstep, prows, (e0, e1, host), start = flight
            self._wait(e1)
            self._last_down = (e0, e1)
            job.setdefault("phases", []).append(("prefill" if pstep == 0 else "decode", start, e1))
            tok = host[:len(prows)]
            live = alive[prows - b0]                 # rows stopped before pstep computed it for nothing
            prows, tok = prows[live], tok[live]
            out[prows, pstep] = tok
            gen[prows] = pstep + 1
            if not gs.ignore_eos:
                stop = tok == eos
                finish[prows[stop]] = FINISH_STOP
                alive[prows[stop] - b0] = False
            if nxt is None:
                break
            flight = nxt
