"""GPT-2 on the GPU: the weights (relaid out for the chosen precision and uploaded), the forward pass over the
layers, and the head (ln_f, LM head, token selection). The precision picks its product kernels once (F32Products,
F16Products); the rest of the model is the same code for both.

Float32: plain FP32 FMA products (no TF32; split-K for decode-sized products), weights as the checkpoint's Conv1D
[K, N]. Float16: tensor-core products with fp32 accumulation (Kernels.pick_f16 chooses the tile per product shape),
weights transposed to K-contiguous fp16 [N, K]; the residual stream, layer-norm statistics, softmax and logits stay
fp32. Fusions: the QKV product's epilogue writes keys and values straight into the KV cache (EPI_QKV); greedy fp16
selects tokens in the LM head's epilogue (EPI_ARGMAX; with --logprobs alone EPI_ARGMAX_LSE, which also sums each
chunk's share of the softmax), and so does fp16 sampling with a temperature alone in large batches (EPI_TEMPERED:
model/sampling.py rule 6, per 64 columns a Gumbel-perturbed log-mass and a draw), so the logits never reach memory;
fp16 prefill attention with head size 64 runs on tensor cores over tiles of up to 16 consecutive tokens of one
prompt (attention_prefill). A generation's prefill runs the last layer past its keys and values on each prompt's last
row alone (forward's heads, _take_heads).
"""
import math
from dataclasses import dataclass

import numpy as np

from gpt2job.backends.cuda.kernels import (EPI_ARGMAX, EPI_ARGMAX_LSE, EPI_BIAS, EPI_GELU_ERF, EPI_GELU_TANH,
                                           EPI_QKV, EPI_RESID, EPI_TEMPERED, F16_TILES)
from gpt2job.backends.cuda.device import UPLOAD_SCRATCH
from gpt2job.errors import UserError
from gpt2job.model.sampling import CHUNK, plain

# every activation config.py accepts (it refuses the others when it reads the config; a test holds the two the same)
ACTIVATIONS = {"gelu": EPI_GELU_ERF, "gelu_new": EPI_GELU_TANH, "gelu_pytorch_tanh": EPI_GELU_TANH,
               "gelu_fast": EPI_GELU_TANH}
SPLITK_BYTES = 4 * 4 * 4096   # fp32 split-K workspace a head row: 4 K slices of N < 4096 floats (more for fewer rows)
# Rule 6 in the LM head's epilogue from this many head rows (fewer: the logits and the selection kernel, the same
# tokens bit for bit). benchmarks/tempered_head.py: the fused head is faster than logits + selection from 546 to
# 8,192 rows; at 64-256 rows the two are even, so the selection kernels keep those (benchmarks/RESULTS.md).
TEMPERED_MIN_ROWS = 512


def head_for(sampling, V, lp_k=None, sel=None):
    """The LM head select runs (Model.head_buffers): "tempered", rule 6 in the product's epilogue (sampling at a
    temperature alone, no --logprobs; fused from TEMPERED_MIN_ROWS rows); "argmax", the fused greedy head (with
    --logprobs' K = 0 it sums the softmax too); else "logits", materialised and then selected. lp_k: --logprobs' K
    (None: off); sel: the rows' own settings (rows.RowSel), which replace sampling."""
    if lp_k is None and (sel.plain if sel is not None else plain(sampling, V)):
        return "tempered"
    return "argmax" if sel is None and sampling.greedy and not lp_k else "logits"


def check_config(cfg, dtype):
    """A UserError unless the CUDA backend runs this model in this precision."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"dtype {dtype!r} is not supported by the cuda backend", None, "dtype",
                        "use float32 or float16")
    if cfg.d_head > 128:
        raise UserError(f"head size {cfg.d_head} > 128 is not supported by the cuda backend", None, "n_head",
                        "use a GPT-2 config with n_embd / n_head <= 128")
    if dtype == "float16" and (cfg.n_embd % 8 or cfg.d_mlp % 8):
        raise UserError(f"float16 needs n_embd and the MLP width to be multiples of 8 "
                        f"(got {cfg.n_embd}, {cfg.d_mlp})", None, "dtype", "use --dtype float32")


class F32Products:
    """fp32 matrix products: weights Conv1D [K, N] as stored; the LM head [C, Vpad] zero-padded."""
    half, elt = False, 4

    def __init__(self, kernels, device, head_rows):
        self.k, self.dev, self.head_rows = kernels, device, head_rows

    def weight(self, w):
        return self.dev.upload(w)

    def head_weight(self, head, V, Vpad):
        ht = np.zeros((head.shape[1], Vpad), np.float32)        # [C, Vpad] = [K, N] padded
        ht[:, :V] = head.T
        return self.dev.upload(ht)

    def linear(self, A, W, out, bias, M, N, K, mode, out_half, split=True):   # split False: one K slice
        ws, slices = None, 0
        if split and M <= self.head_rows and N < 4096:   # decode-sized products may take the split-K path
            ws = self.dev.buf("splitk", SPLITK_BYTES * self.head_rows)
            slices = SPLITK_BYTES * self.head_rows // max(4 * M * N, 1)   # (K slices of M x N floats it holds)
        self.k.gemm_f32(self.dev.compute, A, K, W, N, out, N, bias, M, N, K, mode, ws=ws, ws_slices=slices)

    def qkv(self, h, W, q_out, bias, R, C, cache):
        self.k.gemm_f32(self.dev.compute, h, C, W, 3 * C, q_out, 3 * C, bias, R, 3 * C, C, EPI_QKV, qkv=cache)

    def logits(self, hl, W, out, m, V, C, Vpad):
        self.k.gemm_f32(self.dev.compute, hl, C, W, Vpad, out, Vpad, None, m, V, C, EPI_BIAS)

    def argmax_tile(self, m, V, C):
        return None   # fp32 writes logits, then the argmax kernel

    def workspaces(self, head_rows):
        """(name, bytes) of the pool buffers its products use besides their operands, for head_rows rows."""
        return [("splitk", SPLITK_BYTES * head_rows)]


class F16Products:
    """fp16 matrix products on tensor cores: weights transposed to K-contiguous [N, K] fp16."""
    half, elt = True, 2

    def __init__(self, kernels, device, head_rows, fuse_argmax):
        self.k, self.dev, self.head_rows, self.fuse_argmax = kernels, device, head_rows, fuse_argmax

    def weight(self, w):   # [K, N] float32 -> [N, K] half, on the GPU (reference.f16_weight)
        K, N = np.shape(w)
        return self.dev.upload_half(w, lambda src, out, _: self.k.half_t(self.dev.compute, src, out, K, N))

    def head_weight(self, head, V, Vpad):   # [V, C] = [N, K] as stored, rounded on the GPU, 4C rows at a time
        C = np.shape(head)[1]               # (the scratch then stays as small as the MLP's weights need)
        return self.dev.upload_half(head, lambda src, out, part: self.k.half_of(self.dev.compute, src, out, part.size),
                                    rows=4 * C)

    def linear(self, A, W, out, bias, M, N, K, mode, out_half, split=True):   # (fp16 products never split K)
        self.k.gemm_f16(self.dev.compute, A, K, W, K, out, N, bias, M, N, K, mode, out_half)

    def qkv(self, h, W, q_out, bias, R, C, cache):
        # keys and values go from the product's epilogue straight into the cache; q_out keeps only q
        self.k.gemm_f16(self.dev.compute, h, C, W, C, q_out, 3 * C, bias, R, 3 * C, C, EPI_QKV, True, qkv=cache)

    def logits(self, hl, W, out, m, V, C, Vpad):
        self.k.gemm_f16(self.dev.compute, hl, C, W, C, out, Vpad, None, m, V, C, EPI_BIAS, False)

    def argmax_tile(self, m, V, C):
        """The tile whose (max, argmax) epilogue serves a greedy LM head of m rows (None: options.fuse_argmax off)."""
        return self.k.pick_argmax(m, V, C) if self.fuse_argmax else None

    def workspaces(self, head_rows):
        return []


@dataclass
class Layer:
    ln1_w: object
    ln1_b: object
    ln2_w: object
    ln2_b: object
    qkv_w: object
    qkv_b: object
    proj_w: object
    proj_b: object
    fc_w: object
    fc_b: object
    fc2_w: object
    fc2_b: object


class Model:
    """The weights on the device and the passes over them. Activations live in the device's buffer pool (x: the
    fp32 residual stream; h, qkv, att, fc in the precision's type; hl: ln_f of the head rows; in the last layer with
    heads, fc and h also hold the head rows' queries, residual rows, slots and positions for a moment)."""

    def __init__(self, device, kernels, params, dtype, options, head_rows):
        cfg = self.cfg = params.config
        self.dev, self.k = device, kernels
        self.head_rows = int(head_rows)
        self.p = p = (F16Products(kernels, device, self.head_rows, options.fuse_argmax) if dtype == "float16"
                      else F32Products(kernels, device, self.head_rows))
        self.half, self.elt = p.half, p.elt
        self.act_mode = ACTIVATIONS[cfg.activation_function]
        self.prefill_attn = p.half and cfg.d_head == 64 and options.prefill_attn   # else the per-row kernel
        self.V = cfg.vocab_size
        self.Vpad = (self.V + 127) // 128 * 128
        up = device.upload
        self.wte = up(params.wte)
        self.wpe = up(params.wpe)
        self.layers = [Layer(ln1_w=up(L["ln_1.weight"]), ln1_b=up(L["ln_1.bias"]),
                             ln2_w=up(L["ln_2.weight"]), ln2_b=up(L["ln_2.bias"]),
                             qkv_w=p.weight(L["attn.c_attn.weight"]), qkv_b=up(L["attn.c_attn.bias"]),
                             proj_w=p.weight(L["attn.c_proj.weight"]), proj_b=up(L["attn.c_proj.bias"]),
                             fc_w=p.weight(L["mlp.c_fc.weight"]), fc_b=up(L["mlp.c_fc.bias"]),
                             fc2_w=p.weight(L["mlp.c_proj.weight"]), fc2_b=up(L["mlp.c_proj.bias"]))
                       for L in params.layers]
        self.lnf_w = up(params.ln_f_w)
        self.lnf_b = up(params.ln_f_b)
        self.head_w = p.head_weight(np.asarray(params.head, np.float32), self.V, self.Vpad)   # params.head: [V, C]
        device.drop(UPLOAD_SCRATCH)

    # ---------------------------------------------------------------- sizes

    def kv_bytes_per_position(self):
        return 2 * self.cfg.n_layer * self.cfg.n_embd * self.elt

    def set_head_rows(self, head_rows):
        """Size the head (and the fp32 split-K workspace) for head_rows rows: fewer when device memory is short
        (fp32: products of more rows then run without split-K, which sums in another order)."""
        self.head_rows = self.p.head_rows = int(head_rows)

    def activation_bytes(self, rows, head_rows=None):
        """Device memory of the activations of a pass of `rows` rows and of the head (an upper bound: it counts the
        logits, which a greedy fp16 head never writes)."""
        C, e = self.cfg.n_embd, self.elt
        hr = self.head_rows if head_rows is None else head_rows
        act = rows * (4 * C + e * (C + 3 * C + C + self.cfg.d_mlp) + 16)
        act += hr * (self.Vpad * 4 + C * e)
        if not self.half:
            act += SPLITK_BYTES * hr
        return act

    def activation_buffers(self, rows, head_rows=None):
        """(name, bytes) of the pool buffers of a pass of `rows` rows, and of ln_f's output."""
        C, e = self.cfg.n_embd, self.elt
        hr = self.head_rows if head_rows is None else head_rows
        return [("x", rows * C * 4), ("h", rows * C * e), ("qkv", rows * 3 * C * e), ("att", rows * C * e),
                ("fc", rows * self.cfg.d_mlp * e), ("hl", hr * C * e)]

    def head_buffers(self, head, head_rows=None, lse=False):
        """(name, bytes) of the pool buffers the head writes for the job's selection (head_for, backend.head_kind):
        the split-K workspace (fp32), then for "argmax" (greedy fp16 with the fused head) the argmax partials (lse:
        with the sums of --logprobs), else the logits; "tempered" (fp16 sampling by rule 6 alone) adds rule 6's
        partials and keys, which select's fused head takes in groups of TEMPERED_MIN_ROWS rows or more."""
        hr = self.head_rows if head_rows is None else head_rows
        out = self.p.workspaces(hr)
        tile = self.p.argmax_tile(hr, self.V, self.cfg.n_embd) if head == "argmax" else None
        if tile is not None:
            out.append(("argmax_part", hr * -(-self.V // F16_TILES[tile].wn) * (16 if lse else 8)))
        else:
            out.append(("logits", hr * self.Vpad * 4))
        return out + (self.tempered_buffers(hr) if head == "tempered" else [])

    def tempered_buffers(self, hr):
        """(name, bytes) of rule 6's partials and keys in the fused head for hr head rows (none where no tile takes
        hr rows)."""
        return [] if self.tempered_tile(hr) is None else [("argmax_part", hr * -(-self.V // CHUNK) * 8),
                                                           ("tempered", hr * 8)]

    def tempered_tile(self, m):
        """The tile whose epilogue draws m rows' tokens by rule 6, or None (logits, then Kernels.sample): fewer rows
        than TEMPERED_MIN_ROWS, or a warp tile that rule 6's chunks of 64 columns would straddle."""
        tile = self.p.argmax_tile(m, self.V, self.cfg.n_embd)
        return None if tile is None or m < TEMPERED_MIN_ROWS or F16_TILES[tile].wn % CHUNK else tile

    # ---------------------------------------------------------------- the passes

    def forward(self, R, p_tok, p_pos, p_seq, slot_base, S, kv, tiles=None, copies=None, heads=None):
        """Run the layers on R rows (token ids / positions / slots at the given device pointers) with the KV cache
        kv [(keys, values) per layer] of slots slot_base.. of S positions. tiles (prefill passes): (device pointer,
        count, row_base) of the pass's attention_prefill tiles, used when self.prefill_attn. copies (prefill
        passes): (device pointer, count) of the pass's shared-prefix {dst, src, pos} key/value rows, copied in
        each layer before its attention. heads (prefill passes): (p_rowidx, idx_base, n), the n rows whose next
        token is chosen (row i: row p_rowidx[i] - idx_base): the last layer then computes keys and values for
        every row and the rest for those rows alone (_take_heads). Returns (x, p_rowidx, idx_base): the residual
        stream before ln_f (pool buffer x) and where select finds the head rows in it ((None, 0): rows 0..n-1)."""
        cfg, k, st, p, half = self.cfg, self.k, self.dev.compute, self.p, self.half
        C, H, D, F = cfg.n_embd, cfg.n_head, cfg.d_head, cfg.d_mlp
        e = self.elt
        buf = self.dev.buf
        x = buf("x", R * C * 4)
        h = buf("h", R * C * e)
        qkv = buf("qkv", R * 3 * C * e)
        att = buf("att", R * C * e)
        fc = buf("fc", R * F * e)
        k.embed(st, p_tok, p_pos, self.wte, self.wpe, x, R, C)
        eps = cfg.layer_norm_epsilon
        at = (None, 0) if heads is None else heads[:2]
        for li, L in enumerate(self.layers):
            kc, vc = kv[li]
            k.layernorm(st, half, x, None, 0, L.ln1_w, L.ln1_b, h, R, C, eps)
            p.qkv(h, L.qkv_w, qkv, L.qkv_b, R, C, (p_seq, p_pos, slot_base, S, kc, vc, C))
            if copies is not None:   # shared prefixes: rows computed by another prompt of the group
                k.kv_copy(st, half, copies[0], copies[1], slot_base, kc, vc, S, C)
            scale = 1.0 / math.sqrt(D)
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(li + 1)
            rows, q, seq, pos = R, qkv, p_seq, p_pos
            if heads is not None and li == cfg.n_layer - 1:
                moved = self._take_heads(R, heads, p_seq, p_pos, x, h, qkv, fc)
                if moved is not None:
                    rows, (q, seq, pos), at = heads[2], moved, (None, 0)
            if tiles is not None and self.prefill_attn and rows == R:
                k.attention_prefill(st, qkv, kc, vc, p_seq, slot_base, p_pos, att, tiles[0], tiles[1], tiles[2],
                                    H, D, S, scale)
            else:
                k.attention(st, half, q, kc, vc, seq, slot_base, pos, att, rows, H, D, S, scale)
            whole = rows == R   # (fp32 head rows: no split-K, so the full pass's sums bit for bit where it split none)
            p.linear(att, L.proj_w, x, L.proj_b, rows, C, C, EPI_RESID, False, whole)
            k.layernorm(st, half, x, None, 0, L.ln2_w, L.ln2_b, h, rows, C, eps)
            p.linear(h, L.fc_w, fc, L.fc_b, rows, F, C, self.act_mode, True, whole)
            p.linear(fc, L.fc2_w, x, L.fc2_b, rows, C, F, EPI_RESID, False, whole)
        return (x, *at)

    def _take_heads(self, R, heads, p_seq, p_pos, x, h, qkv, fc):
        """Before the last layer's attention, when it saves work: the head rows' queries (stride 3C) to the front of
        pool buffer fc, their slots and positions to h, their residual rows (through fc) to the front of x. Returns
        where their queries, slots and positions now are; None (nothing moved) when every row is a head row, or fc
        or h cannot hold them (fp16: more than 0.8 R head rows)."""
        p_rowidx, base, n = heads
        C, e = self.cfg.n_embd, self.elt
        qb = n * 3 * C * e
        if n >= R or qb + n * C * 4 > R * self.cfg.d_mlp * e or 8 * n > R * C * e:
            return None
        take, st, qw = self.k.take_rows, self.dev.compute, C * e // 4   # (rows in 4-byte words)
        take(st, p_rowidx, base, qkv, 3 * qw, fc, 3 * qw, qw, n)
        take(st, p_rowidx, base, x, C, fc + qb, C, C, n)
        take(st, None, 0, fc + qb, C, x, C, C, n)
        take(st, p_rowidx, base, p_seq, 1, h, 1, 1, n)
        take(st, p_rowidx, base, p_pos, 1, h + 4 * n, 1, 1, n)
        return fc, h, h + 4 * n

    def ln_f(self, x, n, p_rowidx, idx_base):
        """ln_f of n rows of x (row i: x row p_rowidx[i] - idx_base when p_rowidx is given, else row i) in groups
        of head_rows: yields (first row, rows, pool buffer hl)."""
        C, e = self.cfg.n_embd, self.elt
        for g0 in range(0, n, self.head_rows):
            m = min(self.head_rows, n - g0)
            hl = self.dev.buf("hl", self.head_rows * C * e)
            ridx = p_rowidx + 4 * g0 if p_rowidx else None
            xin = x if p_rowidx else x + 4 * g0 * C
            self.k.layernorm(self.dev.compute, self.half, xin, ridx, idx_base, self.lnf_w, self.lnf_b, hl, m, C,
                             self.cfg.layer_norm_epsilon)
            yield g0, m, hl

    def logits(self, hl, m):
        logits = self.dev.buf("logits", self.head_rows * self.Vpad * 4)
        self.p.logits(hl, self.head_w, logits, m, self.V, self.cfg.n_embd, self.Vpad)
        return logits

    def select(self, x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling, sel=None, lp=None, step_at=0):
        """The next token of n rows of x (as ln_f picks them) into p_out (int32): ln_f, LM head, then greedy
        argmax or sampling (row i draws with output row p_rows[p_seqidx[i]]'s seed at this step; step_at: 0, or the
        device address of an int32 that holds the step instead, Kernels.sample). sel (rows.RowSel):
        each row's own settings and penalty, on the materialised logits (sampling is then unused). lp
        (logprobs.LogprobOut, --logprobs): the chosen tokens' log-probabilities (and top K) from the materialised
        logits too, except greedy without top K on the fused head, whose epilogue sums each chunk's exp too."""
        k, st = self.k, self.dev.compute
        V, Vp = self.V, self.Vpad
        head = head_for(sampling, V, None if lp is None else lp.k, sel)
        tempered, fused = head == "tempered", head != "logits"
        for g0, m, hl in self.ln_f(x, n, p_rowidx, idx_base):
            tile = None
            if fused:
                tile = self.tempered_tile(m) if tempered else self.p.argmax_tile(m, V, self.cfg.n_embd)
            if tile is not None:
                # the LM head product with the (max, argmax) epilogue: per row one (max, column) per tile.wn
                # columns (and with lp the sum of exp(logit - that max); tempered: per 64 columns, the chunk's
                # perturbed log-mass and the column it draws), then their argmax (and its log-probability); the
                # logits never reach memory
                wn = CHUNK if tempered else F16_TILES[tile].wn
                nch = (V + wn - 1) // wn
                part = self.dev.buf("argmax_part", self.head_rows * nch * (8 if lp is None else 16))
                mode, keys = EPI_ARGMAX if lp is None else EPI_ARGMAX_LSE, None
                if tempered:
                    mode, keys = EPI_TEMPERED, self.dev.buf("tempered", self.head_rows * 8)
                    job = (sampling.seed, sampling.temperature) if sel is None else (0, 0.0)
                    k.tempered_keys(st, p_rows, p_seqidx + 4 * g0, step, keys, m, *job, sel=sel, step_at=step_at)
                k.gemm_f16(st, hl, self.cfg.n_embd, self.head_w, self.cfg.n_embd, part, nch, None, m, V,
                           self.cfg.n_embd, mode, False, variant=tile, qkv=keys)
                k.argmax_partials(st, part, nch, nch, p_out + 4 * g0, m, lp=None if lp is None else lp.at(g0)[0])
                continue
            logits = raw = self.logits(hl, m)
            if sel is not None:
                if lp is not None and sel.seen:   # the penalty rewrites the logits: the log-probabilities read a copy
                    raw = self.dev.buf("logits_raw", self.head_rows * Vp * 4)
                    self.dev.drv.memcpy_dtod_async(raw, logits, m * Vp * 4, st)
                k.sample_params(st, logits, Vp, V, p_rows, p_seqidx + 4 * g0, step, sel, p_out + 4 * g0, m,
                                step_at=step_at)
            elif sampling.greedy and lp is not None:   # the argmax and the logprobs in one read of the logits
                k.logprobs(st, logits, Vp, V, p_out + 4 * g0, lp.k, *lp.at(g0), m, greedy=True)
                continue
            elif sampling.greedy:
                k.argmax(st, logits, Vp, V, p_out + 4 * g0, m)
            else:
                k.sample(st, logits, Vp, V, p_rows, p_seqidx + 4 * g0, step, sampling.seed, sampling.temperature,
                         sampling.top_k, sampling.top_p, p_out + 4 * g0, m, step_at=step_at)
            if lp is not None:   # the raw logits, the tokens just chosen
                k.logprobs(st, raw, Vp, V, p_out + 4 * g0, lp.k, *lp.at(g0), m)

    def logits_to_host(self, x, n, p_rowidx, idx_base, out):
        """The logits of n rows of x (as ln_f picks them) into out [n, V] float32 on the host (tests)."""
        self.dev.buf("logits", self.head_rows * self.Vpad * 4)   # grown before ln_f runs (a greedy fp16 head has none)
        for g0, m, hl in self.ln_f(x, n, p_rowidx, idx_base):
            logits = self.logits(hl, m)
            host = np.empty((m, self.Vpad), np.float32)
            self.dev.compute.synchronize()
            self.dev.drv.memcpy_dtoh(host, logits)
            out[g0:g0 + m] = host[:, :self.V]
