"""NumPy reference GPT-2: the oracle for every CUDA kernel and the CPU fallback backend.

Pure functions on float32 arrays. Shapes: B batch rows, T tokens, C n_embd, H heads, D head size,
S cache length, V vocabulary. A batch holds prompts of different lengths, right-padded; row b's
tokens sit at positions 0..len_b-1, and its cache entries past its length are masked out.
"""
import math

import numpy as np

from gpt2job.model.config import GPT2Config


# ---------------------------------------------------------------- elementwise / per-row building blocks

def layer_norm(x, w, b, eps):
    """x: [..., C] -> [..., C]; statistics in float32."""
    mean = x.mean(axis=-1, keepdims=True)                     # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)      # [..., 1]
    return (x - mean) / np.sqrt(var + eps) * w + b            # [..., C]


def gelu_tanh(x):
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))


def gelu_erf(x):
    """Exact GELU (activation_function == 'gelu')."""
    from math import erf
    return (0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / math.sqrt(2.0)))).astype(x.dtype)


def activation(cfg: GPT2Config):
    return gelu_erf if cfg.activation_function == "gelu" else gelu_tanh


def linear(x, w, b):
    """x: [..., K] @ w: [K, N] + b: [N] -> [..., N] (Conv1D layout)."""
    return x @ w + b


def embed(wte, wpe, tokens, positions):
    """tokens, positions: [B, T] int -> [B, T, C]."""
    return wte[tokens] + wpe[positions]


def f16_weight(w, transpose=True):
    """A float32 weight as the fp16 products read it: [K, N] (Conv1D, as stored) -> [N, K] float16, or without
    transpose (the LM head) only rounded; round to nearest even, as the GPU's half_t / half_of."""
    w = np.asarray(w, np.float32)
    with np.errstate(over="ignore"):   # beyond the largest half: inf, as on the GPU
        return np.ascontiguousarray(w.T if transpose else w).astype(np.float16)


def softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def split_heads(x, n_head):
    """[B, T, C] -> [B, H, T, D]."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, H, T, D] -> [B, T, C]."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention(q, k_cache, v_cache, q_pos, kv_len, scale):
    """Causal attention over a KV cache.

    q: [B, H, T, D] queries at absolute positions q_pos: [B, T];
    k_cache, v_cache: [B, H, S, D]; kv_len: [B] valid cache entries per row.
    Query t of row b sees keys j with j <= q_pos[b, t] and j < kv_len[b]. -> [B, H, T, D]
    """
    S = k_cache.shape[2]
    scores = np.einsum("bhtd,bhsd->bhts", q, k_cache) * np.float32(scale)   # [B, H, T, S]
    j = np.arange(S)[None, None, :]                                          # [1, 1, S]
    visible = (j <= q_pos[:, :, None]) & (j < kv_len[:, None, None])         # [B, T, S]
    scores = np.where(visible[:, None, :, :], scores, np.float32(-np.inf))   # [B, H, T, S]
    probs = softmax(scores, axis=-1).astype(np.float32)                      # [B, H, T, S]
    return np.einsum("bhts,bhsd->bhtd", probs, v_cache)                      # [B, H, T, D]


# ---------------------------------------------------------------- the transformer

def block(cfg, layer, li, x, positions, k_cache, v_cache, kv_len):
    """One transformer block on x: [B, T, C] at positions: [B, T].

    Writes this step's keys/values into k_cache/v_cache: [B, H, S, D] at their positions, then attends.
    kv_len: [B] cache length per row after this step. Returns [B, T, C].
    """
    B, T, C = x.shape
    H = cfg.n_head
    h = layer_norm(x, layer["ln_1.weight"], layer["ln_1.bias"], cfg.layer_norm_epsilon)  # [B, T, C]
    qkv = linear(h, layer["attn.c_attn.weight"], layer["attn.c_attn.bias"])             # [B, T, 3C]
    q, k, v = (split_heads(a, H) for a in np.split(qkv, 3, axis=-1))                     # [B, H, T, D] each
    rows = np.arange(B)[:, None]                                                         # [B, 1]
    k_cache[rows, :, positions] = k.transpose(0, 2, 1, 3)                                # [B, T, H, D] scattered
    v_cache[rows, :, positions] = v.transpose(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(cfg.d_head)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(li + 1)
    a = merge_heads(attention(q, k_cache, v_cache, positions, kv_len, scale))           # [B, T, C]
    x = x + linear(a, layer["attn.c_proj.weight"], layer["attn.c_proj.bias"])           # [B, T, C]
    h = layer_norm(x, layer["ln_2.weight"], layer["ln_2.bias"], cfg.layer_norm_epsilon)  # [B, T, C]
    m = activation(cfg)(linear(h, layer["mlp.c_fc.weight"], layer["mlp.c_fc.bias"]))     # [B, T, 4C]
    return x + linear(m, layer["mlp.c_proj.weight"], layer["mlp.c_proj.bias"])          # [B, T, C]


def kv_copy(k_cache, v_cache, copies, slot_base=0):
    """Shared-prefix rows (twin of cuda_src/transformer.cu kv_copy): for each {dst, src, pos} row of copies [E, 3],
    cache[dst - slot_base, pos] = cache[src - slot_base, pos], in k and v. Caches in the CUDA layout [slots, S, C];
    a source row is never a destination. Returns new arrays."""
    d, s, p = (copies[:, 0] - slot_base, copies[:, 1] - slot_base, copies[:, 2])       # [E] each
    k, v = k_cache.copy(), v_cache.copy()                                                # [slots, S, C]
    k[d, p] = k_cache[s, p]
    v[d, p] = v_cache[s, p]
    return k, v


def take_rows(src, idx=None, idx_base=0):
    """Rows of src (twin of cuda_src/transformer.cu take_rows, on rows of any type): row i = src[idx[i] - idx_base],
    or src itself when idx is None. Returns a new array."""
    return src.copy() if idx is None else src[np.asarray(idx, np.int64) - idx_base]


def new_kv_cache(cfg, batch, length):
    """One (k, v) pair per layer, each [B, H, S, D] float32."""
    shape = (batch, cfg.n_head, length, cfg.d_head)
    return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layer)]


def forward_hidden(params, tokens, positions, cache, kv_len):
    """tokens, positions: [B, T]; returns the final-layer-norm hidden states [B, T, C]."""
    cfg = params.config
    x = embed(params.wte, params.wpe, tokens, positions)                                 # [B, T, C]
    for li, layer in enumerate(params.layers):
        x = block(cfg, layer, li, x, positions, cache[li][0], cache[li][1], kv_len)
    return layer_norm(x, params.ln_f_w, params.ln_f_b, cfg.layer_norm_epsilon)           # [B, T, C]


def lm_head(params, h):
    """h: [..., C] -> logits [..., V] (tied to wte unless the checkpoint has its own head)."""
    return h @ params.head.T


def pad_prompts(prompts):
    """List of 1-D int arrays -> (tokens [B, Tmax] right-padded with 0, lengths [B])."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)                        # [B]
    tokens = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)               # [B, Tmax]
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def prefill(params, prompts, cache_len):
    """Run the prompts; returns (cache, lengths [B], last-position logits [B, V])."""
    tokens, lengths = pad_prompts(prompts)                                               # [B, T], [B]
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))                                   # [B, T]
    cache = new_kv_cache(params.config, B, cache_len)
    h = forward_hidden(params, tokens, positions, cache, lengths)                        # [B, T, C]
    last = h[np.arange(B), lengths - 1]                                                  # [B, C]
    return cache, lengths, lm_head(params, last)                                         # [B, V]


def decode_step(params, cache, next_tokens, positions):
    """One new token per row at positions: [B]; returns logits [B, V]."""
    h = forward_hidden(params, next_tokens[:, None], positions[:, None], cache, positions + 1)  # [B, 1, C]
    return lm_head(params, h[:, 0])                                                      # [B, V]


def full_logits(params, tokens):
    """Teacher-forced logits for equal-length rows tokens: [B, T] -> [B, T, V] (the NumPy backend's score; tests,
    fp16 checks)."""
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    cache = new_kv_cache(params.config, B, T)
    h = forward_hidden(params, tokens, positions, cache, np.full(B, T))
    return lm_head(params, h)
