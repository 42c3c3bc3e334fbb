"""Baselines for the performance issue, on the same weights and the same prompts as our engine:

  (a) transformers GPT2LMHeadModel.generate (attn_implementation="sdpa", greedy, every token generated:
      the model's eos is switched off), fp16 and fp32 (TF32 off);
  (b) a compact PyTorch KV-cache engine (CompactGPT2 below: plain tensors, SDPA causal prefill over a
      right-padded batch, preallocated KV cache written in place, cuBLAS matmuls, masked one-query decode
      attention (cuDNN SDPA with fixed shapes, or matmul + softmax), argmax decode loop), fp16 and fp32.

  python3 benchmarks/baselines.py --model HF_DIR --workloads-dir DIR [--workload w1,w2] \
      [--engine transformers,compact] [--dtype float16,float32] [--results results.jsonl] \
      [--tokens-dir DIR] [--compare]
  python3 benchmarks/baselines.py --self-check      # compact engine = transformers' greedy tokens, tiny model

HF_DIR comes from export_weights.py (random:gpt2 exported once, so every engine reads the same file); a
random:... spec is exported to a temporary directory. Batches: transformers W1 --hf-batch-w1 (8192: one
batch), W2 --hf-batch-w2 (256, input order, left padding); compact W1 one batch, W2 length-sorted batches
of --compact-batch-w2 (512). Each (engine, dtype, workload) first runs a warm-up on its first batch with
2 new tokens, then the timed run over the whole workload: torch.cuda.synchronize + CUDA events around it;
tokens/s = generated tokens / elapsed.

--tokens-dir saves every run's greedy tokens as int32 [N, new] files ENGINE-WORKLOAD-DTYPE.i32 (like the
seed workload's answer.bin); transformers-w1-float32.i32 is what check_vs_transformers.py compares ours with.
--compare also runs our engine (run_workloads.py's pipeline, 1 GPU, --model HF_DIR) on the same files in the
same invocation, first (before torch takes GPU memory), and prints ours next to the baselines, with token
agreement with ours. Without CUDA everything runs on the CPU (for smoke tests at tiny sizes).
"""
import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (EOT, WORKLOADS, append_jsonl, base_record, fmt_int, fmt_s, print_table,  # noqa: E402
                          read_prompt_tokens, save_tokens, tokens_key)


# ---------------------------------------------------------------- the compact PyTorch engine

class CompactGPT2:
    """GPT-2 greedy generation in ~100 lines of plain PyTorch: fp16/fp32 weights, cuBLAS matmuls (F.linear), a
    KV cache [layer, batch, head, T + new, head_dim] preallocated per batch and written in place, SDPA causal
    prefill over a right-padded batch (each row's last real position gathered), then the decode loop, one
    query per row, with an additive mask [batch, 1, 1, T + new] (0 on a row's prompt and generated slots, -inf
    elsewhere) updated in place each step; tokens stay on the GPU until the end (no host sync in the loop).

    Decode attention (see _attend1), for long decodes (>= FUSED_MIN_NEW tokens, fp16, CUDA): SDPA restricted
    to cuDNN attention over the whole cache, so that every step of a batch has the same shapes. torch's SDPA
    picks cuDNN for a masked call on Hopper, and cuDNN builds a new plan (tens of ms) for every new shape:
    slicing the cache to the longest row's prefix, a new key length each step, made W2 run at ~9k tokens/s
    (torch 2.11); for the same reason the prefill keeps to flash / memory-efficient attention. Otherwise
    (short decodes, fp32, CPU, or cuDNN refusing) a masked matmul + fp32 softmax over that prefix; never
    SDPA's math fallback (it upcasts the cache to fp32). The caches start zeroed: masked slots are still
    read and must hold no NaN/inf. The lm head is padded to a multiple of 64 rows (cuBLAS's fp16 kernels
    want aligned output rows: 50,257 rows ran ~6x slower); the extra logits are sliced off before argmax."""

    FUSED_MIN_NEW = 32                        # decode through cuDNN only when generating at least this many tokens

    def __init__(self, params, device, dtype, fused_decode=True):
        import torch
        from torch.nn.attention import SDPBackend
        self.torch, self.dev, self.dt, cfg = torch, device, dtype, params.config
        self.H, self.C, self.eps, self.nl = cfg.n_head, cfg.n_embd, cfg.layer_norm_epsilon, cfg.n_layer
        self.gelu = "tanh" if cfg.activation_function != "gelu" else "none"
        self.D = self.C // self.H
        self.scale = 1.0 / math.sqrt(self.D)
        # cuDNN attention builds a plan per new shape (a new prompt length each batch): not for the prefill
        self.prefill_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        self.decode_backends = [SDPBackend.CUDNN_ATTENTION]
        self.fused = torch.device(device).type == "cuda" and dtype != torch.float32 and fused_decode
        self.use_fused = False                # this generate() call's choice
        self.refused = None                   # cuDNN's error when it refused a decode step (the matmul path since)

        def t(a, transpose=False):
            a = np.ascontiguousarray(a.T if transpose else a)
            return torch.from_numpy(a).to(device=device, dtype=dtype)
        self.wte, self.wpe = t(params.wte), t(params.wpe)
        self.V = params.head.shape[0]
        self.head = torch.zeros(-(-self.V // 64) * 64, self.C, device=device, dtype=dtype)
        self.head[:self.V] = t(params.head)
        self.lnf = (t(params.ln_f_w), t(params.ln_f_b))
        # F.linear(x, W, b) = x @ W.T + b: Conv1D weights [K, N] are stored transposed, [N, K]
        self.layers = [{n: (t(L[n + ".weight"], transpose=not n.startswith("ln")), t(L[n + ".bias"]))
                        for n in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}
                       for L in params.layers]

    def _block(self, L, x, attend):
        """x: [..., C] (prefill [B, T, C], decode [B, C]); attend(q, k, v) gets [..., H, D] views."""
        F, C = self.torch.nn.functional, self.C
        qkv = F.linear(F.layer_norm(x, (C,), *L["ln_1"], self.eps), *L["attn.c_attn"])
        q, k, v = (z.unflatten(-1, (self.H, self.D)) for z in qkv.split(C, dim=-1))
        x = x + F.linear(attend(q, k, v).flatten(-2), *L["attn.c_proj"])
        h = F.gelu(F.linear(F.layer_norm(x, (C,), *L["ln_2"], self.eps), *L["mlp.c_fc"]), approximate=self.gelu)
        return x + F.linear(h, *L["mlp.c_proj"])

    def _attend1(self, q, k, v, mask, hi):
        """q [B, H, D] (one query per row) over k, v [B, H, S, D] with mask [B, 1, 1, S] -> [B, H, D]; keys at
        >= hi are masked in every row."""
        torch, q = self.torch, q[:, :, None]
        if self.use_fused:
            try:
                with torch.nn.attention.sdpa_kernel(self.decode_backends):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, 0]
            except RuntimeError as e:         # cuDNN does not take it here: the matmul path from now on
                self.fused = self.use_fused = False
                self.refused = str(e).strip().splitlines()[0][:200]
        sc = torch.matmul(q * self.scale, k[:, :, :hi].transpose(-1, -2)).float() + mask[..., :hi]
        return torch.matmul(torch.softmax(sc, dim=-1).to(self.dt), v[:, :, :hi])[:, :, 0]

    def _next(self, x):
        F = self.torch.nn.functional
        return F.linear(F.layer_norm(x, (self.C,), *self.lnf, self.eps), self.head)[:, :self.V].argmax(-1)

    def generate(self, prompts, max_new):
        """prompts: list of int arrays -> int32 [B, max_new] greedy tokens (eos ignored)."""
        torch, F, D = self.torch, self.torch.nn.functional, self.D
        with torch.inference_mode():
            B, lens_np = len(prompts), np.array([len(p) for p in prompts], np.int64)
            T, S = int(lens_np.max()), int(lens_np.max()) + max_new
            tok = np.zeros((B, T), np.int64)                         # right padding
            tok[np.arange(T)[None, :] < lens_np[:, None]] = np.concatenate(prompts)
            tok, lens = torch.from_numpy(tok).to(self.dev), torch.from_numpy(lens_np).to(self.dev)
            bidx = torch.arange(B, device=self.dev)
            kc = torch.zeros(self.nl, B, self.H, S, D, device=self.dev, dtype=self.dt)
            vc = torch.zeros_like(kc)
            mask = torch.full((B, 1, 1, S), float("-inf"), device=self.dev, dtype=self.dt)
            mask[:, 0, 0, :T].masked_fill_(torch.arange(T, device=self.dev) < lens[:, None], 0.0)
            out = torch.empty(B, max_new, dtype=torch.int64, device=self.dev)

            def prefill_attend(li):                                  # q, k, v: [B, T, H, D]
                def f(q, k, v):
                    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    kc[li, :, :, :T], vc[li, :, :, :T] = k, v
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
                return f
            x = self.wte[tok] + self.wpe[:T]
            with torch.nn.attention.sdpa_kernel(self.prefill_backends):
                for li, L in enumerate(self.layers):
                    x = self._block(L, x, prefill_attend(li))
            out[:, 0] = self._next(x[bidx, lens - 1])
            x = None
            # cuDNN's plan for this batch's shapes costs ~50 ms to build: worth it for long decodes only
            self.use_fused = self.fused and max_new >= self.FUSED_MIN_NEW

            def decode_attend(li):                                   # q, k, v: [B, H, D]
                def f(q, k, v):
                    kc[li, bidx, :, pos], vc[li, bidx, :, pos] = k, v
                    return self._attend1(q, kc[li], vc[li], mask, T + s)
                return f
            for s in range(1, max_new):
                pos = lens + (s - 1)                                 # where token s-1 goes: each row's own position
                mask[bidx, 0, 0, pos] = 0.0
                x = self.wte[out[:, s - 1]] + self.wpe[pos]
                for li, L in enumerate(self.layers):
                    x = self._block(L, x, decode_attend(li))
                out[:, s] = self._next(x)
            return out.to(torch.int32).cpu().numpy()


# ---------------------------------------------------------------- transformers

class HFEngine:
    def __init__(self, hf_dir, device, dtype):
        import torch
        from transformers import GPT2LMHeadModel
        self.torch, self.dev = torch, device
        self.model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
        self.model = self.model.to(device).eval()
        gc = self.model.generation_config
        gc.eos_token_id = None          # generate every token (like --ignore-eos); the argmax is unchanged
        gc.pad_token_id = EOT
        gc.bos_token_id = None

    def generate(self, prompts, max_new):
        torch = self.torch
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), EOT, np.int64)
        mask = np.zeros((B, T), np.int64)
        for i, p in enumerate(prompts):             # left padding
            ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
        ids, mask = torch.from_numpy(ids).to(self.dev), torch.from_numpy(mask).to(self.dev)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                      do_sample=False, num_beams=1)
        gen = out[:, T:]
        assert gen.shape[1] == max_new, f"generate() returned {gen.shape[1]} new tokens, wanted {max_new}"
        return gen.to(torch.int32).cpu().numpy()


# ---------------------------------------------------------------- driver

def set_precision(torch, dtype):
    """fp32 means IEEE fp32: TF32 off for matmuls and cuDNN."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for obj in (torch.backends.cuda.matmul, torch.backends.cudnn):   # newer torch: the same, spelled anew
        try:
            if hasattr(obj, "fp32_precision"):
                obj.fp32_precision = "ieee"
        except Exception:  # noqa: BLE001
            pass


def batches_for(engine, workload, prompts, a):
    n = len(prompts)
    if workload == "w2":
        size = a.hf_batch_w2 if engine == "transformers" else a.compact_batch_w2
        order = np.arange(n)
        if engine == "compact" or a.hf_sort_w2:
            order = np.argsort([len(p) for p in prompts], kind="stable")
    else:
        size = a.hf_batch_w1 if engine == "transformers" else a.compact_batch_w1
        order = np.arange(n)
    size = max(1, min(size, n))
    return [order[i:i + size] for i in range(0, n, size)]


def run_engine(eng, prompts, batches, max_new, torch, cuda):
    out = np.empty((len(prompts), max_new), np.int32)
    eng.generate([prompts[i] for i in batches[0]], min(2, max_new))      # warm-up
    if cuda:
        torch.cuda.synchronize()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
    t0 = time.perf_counter()
    for idx in batches:
        out[idx] = eng.generate([prompts[i] for i in idx], max_new)
    if cuda:
        ev1.record()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    elapsed = ev0.elapsed_time(ev1) / 1e3 if cuda else wall
    return out, elapsed, wall


def agreement(a, b):
    if a is None or b is None or a.shape != b.shape:
        return None
    return float((a == b).mean())


def ours_tokens(path, width):
    from bench_common import read_output, tokens_matrix
    return tokens_matrix(read_output(path)[1], width)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF dir from export_weights.py (or random:..., exported to /tmp)")
    ap.add_argument("--workloads-dir", default="/tmp/gpt2job-bench/workloads")
    ap.add_argument("--workload", default="w1,w2")
    ap.add_argument("--engine", default="transformers,compact")
    ap.add_argument("--dtype", default="float16,float32")
    ap.add_argument("--only", help="comma list of ENGINE:WORKLOAD:DTYPE to run (overrides the cross product), "
                                   "e.g. transformers:w1:float16,compact:w2:float16")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--hf-batch-w1", type=int, default=8192)
    ap.add_argument("--hf-batch-w2", type=int, default=256)
    ap.add_argument("--hf-sort-w2", action="store_true", help="length-sort W2 for transformers too")
    ap.add_argument("--compact-batch-w1", type=int, default=8192)
    ap.add_argument("--compact-batch-w2", type=int, default=512)
    ap.add_argument("--results", help="append one JSON line per run here")
    ap.add_argument("--tokens-dir", help="save each run's tokens as int32 [N, new] ENGINE-WORKLOAD-DTYPE.i32")
    ap.add_argument("--compare", action="store_true", help="also run our engine (1 GPU) on the same weights/files")
    ap.add_argument("--ours-backend", default="cuda", help="backend for --compare (numpy for CPU smoke tests)")
    ap.add_argument("--out-dir", default="/tmp/gpt2job-bench/out", help="--compare's outputs and logs")
    ap.add_argument("--self-check", action="store_true",
                    help="only check the compact engine against transformers' greedy generate on a tiny random "
                         "GPT-2 (2 layers, n_embd 64, ragged prompts, fp32; on CUDA also its fp16 decode paths "
                         "against each other; a few seconds) and exit 0 if they agree")
    a = ap.parse_args(argv)
    if a.self_check:
        return self_check(a.device)
    if not a.model:
        ap.error("--model is required")

    import torch
    cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    device = "cuda" if cuda else "cpu"
    set_precision(torch, None)
    hf_dir = a.model
    if hf_dir.startswith("random:"):
        import export_weights
        hf_dir = export_weights.export(a.model, os.path.join(tempfile.gettempdir(), "gpt2job-bench-" +
                                                             "".join(c if c.isalnum() else "_" for c in a.model)))
    if a.only:
        jobs = [tuple(x.split(":")) for x in a.only.split(",") if x]
    else:
        jobs = [(e, w, d) for w in a.workload.split(",") for e in a.engine.split(",") for d in a.dtype.split(",")]
    names = sorted({w for _, w, _ in jobs})
    import run_workloads
    run_workloads.ensure_workloads(a.workloads_dir, names)
    prompts = {w: read_prompt_tokens(os.path.join(a.workloads_dir, WORKLOADS[w]["file"])) for w in names}
    if a.tokens_dir:
        os.makedirs(a.tokens_dir, exist_ok=True)

    rows, ours = [], {}
    if a.compare:          # ours first, before torch holds GPU memory
        os.makedirs(a.out_dir, exist_ok=True)
        for w in names:
            spec = WORKLOADS[w]
            for d in sorted({d for _, ww, d in jobs if ww == w}):
                tag = f"cmp-{w}-{d}"
                out, log = os.path.join(a.out_dir, tag + ".h5"), os.path.join(a.out_dir, tag + ".log")
                res = run_workloads.run_job(os.path.join(a.workloads_dir, spec["file"]), out, hf_dir, a.ours_backend,
                                            d, 1, spec["max_new_tokens"], spec["ignore_eos"], log=log)
                rec = run_workloads.record_of(res, w, d, 1, hf_dir, a.ours_backend, len(prompts[w]),
                                              spec["max_new_tokens"], spec["ignore_eos"], log)
                append_jsonl(a.results, rec)
                toks = ours_tokens(out, spec["max_new_tokens"]) if res["rc"] == 0 else None
                ours[(w, d)] = toks
                rows.append(["ours", w, d, "-", fmt_int(rec["generated_tokens"]), fmt_s(rec["generation_s"]),
                             fmt_int(rec["throughput_tok_s"]), "-", "ok" if res["rc"] == 0 else f"rc={res['rc']}"])
                print(f"ours {w} {d}: {fmt_int(rec['throughput_tok_s'])} tok/s (rc={res['rc']})  [{log}]", flush=True)

    from gpt2job.model.weights import load_params
    params = None
    for engine, w, d in jobs:
        dt = {"float16": torch.float16, "float32": torch.float32}[d]
        spec = WORKLOADS[w]
        P, new = prompts[w], spec["max_new_tokens"]
        batches = batches_for(engine, w, P, a)
        t0 = time.perf_counter()
        try:
            if engine == "transformers":
                eng = HFEngine(hf_dir, device, dt)
            elif engine == "compact":
                params = params or load_params(hf_dir)
                eng = CompactGPT2(params, device, dt)
            else:
                raise SystemExit(f"unknown engine {engine!r}")
            load_s = time.perf_counter() - t0
            toks, elapsed, wall = run_engine(eng, P, batches, new, torch, cuda)
            status = "ok"
            path = decode_path(eng)
        except torch.cuda.OutOfMemoryError as e:
            toks, elapsed, wall, load_s, status = None, None, None, None, f"OOM: {str(e)[:120]}"
            path = None
        finally:
            eng = None
            if cuda:
                torch.cuda.empty_cache()
        gen = len(P) * new if toks is not None else None
        tps = gen / elapsed if toks is not None else None
        tok_file = None
        if a.tokens_dir and toks is not None:
            tok_file = os.path.join(a.tokens_dir, f"{engine}-{w}-{d}.i32")
            save_tokens(tok_file, toks, tokens_key(hf_dir, P, new))
        agree = agreement(toks, ours.get((w, d)))
        rec = base_record(engine=engine, workload=w, dtype=d, gpus=1, model=hf_dir, device=device,
                          prompts=len(P), max_new_tokens=new, batch=len(batches[0]), n_batches=len(batches),
                          order=("length-sorted" if w == "w2" and (engine == "compact" or a.hf_sort_w2) else "input"),
                          generated_tokens=gen, time_s=elapsed, wall_s=wall, load_s=load_s, throughput_tok_s=tps,
                          status=status, tokens_file=tok_file, agreement_with_ours=agree, decode_attention=path,
                          torch=torch.__version__, transformers=_tf_version())
        append_jsonl(a.results, rec)
        print(f"{engine} {w} {d}: {fmt_int(tps)} tok/s ({fmt_s(elapsed)} s, batch {len(batches[0])} x "
              f"{len(batches)}) {status}{'; decode attention: ' + path if path else ''}", flush=True)
        rows.append([engine, w, d, len(batches[0]), fmt_int(gen), fmt_s(elapsed), fmt_int(tps),
                     "-" if agree is None else f"{agree:.2%}", status])
    print()
    print_table(["engine", "workload", "dtype", "batch", "generated", "time_s", "tok/s", "=ours", "status"], rows)
    return 0 if all(r[-1] == "ok" for r in rows) else 1


def decode_path(eng):
    """How the compact engine's last batch's decode steps attended (cuDNN's fused kernel, or the matmul path: short
    decodes, fp32, or cuDNN refused a step, with its error): a run that lost cuDNN halfway is not the fair baseline.
    None for transformers."""
    if not isinstance(eng, CompactGPT2):
        return None
    if eng.refused:
        return f"matmul (cuDNN refused: {eng.refused})"
    return "cudnn" if eng.use_fused else "matmul"


def self_check(device=None):
    """The compact engine's greedy tokens = transformers' (fp32, TF32 off) on a tiny random GPT-2 with ragged
    prompts: exercises the right-padded prefill, the per-row decode mask and the padded lm head. On CUDA also
    fp16: the cuDNN decode path vs the matmul path (>= 90% of tokens; fp16 rounding may flip a near-tie, and a
    greedy row diverges from there). Returns 0 when all pass."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from gpt2job.model.weights import load_params
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    set_precision(torch, None)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=EOT + 1, initializer_range=0.1)
    rng = np.random.default_rng(0)
    groups = [[rng.integers(0, EOT, n) for n in lens] for lens in ([5, 17, 9, 1, 12], [7, 7, 7])]  # ragged, uniform
    bad = 0

    def report(what, a, b, bar):
        nonlocal bad
        agree = float((a == b).mean())
        bad += agree < bar
        print(f"self-check {what}: {agree:.1%} of {a.size} tokens agree (bar {bar:.0%})")
    with tempfile.TemporaryDirectory() as d:
        GPT2LMHeadModel(cfg).save_pretrained(d)
        params = load_params(d)
        hf, compact = HFEngine(d, device, torch.float32), CompactGPT2(params, device, torch.float32)
        for prompts in groups:
            report(f"fp32 compact vs transformers, lengths {[len(p) for p in prompts]}",
                   compact.generate(prompts, 12), hf.generate(prompts, 12), 1.0)
        if torch.device(device).type == "cuda":
            fused = CompactGPT2(params, device, torch.float16)
            fused.FUSED_MIN_NEW = 1
            plain = CompactGPT2(params, device, torch.float16, fused_decode=False)
            for prompts in groups:
                report(f"fp16 compact cuDNN decode vs matmul decode, lengths {[len(p) for p in prompts]}",
                       fused.generate(prompts, 12), plain.generate(prompts, 12), 0.9)
            print(f"self-check: fp16 decode attention through {'cuDNN' if fused.fused else 'matmul (cuDNN refused)'}")
    print("self-check:", "ok" if not bad else "FAILED")
    return int(bad > 0)


def _tf_version():
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
