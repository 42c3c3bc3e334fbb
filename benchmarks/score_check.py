"""`python -m gpt2job score` against transformers: per-token log-likelihoods, fp32.

  PYTHON_WITH_TORCH benchmarks/score_check.py [--backend numpy|cuda] [--dtype float32] [--rows 12] [--no-124m]

For each model (tests/fixtures/tiny-hf, tiny-published, tiny-fp16 and a seeded random GPT2LMHeadModel of GPT-2 124M's
shapes, written by save_pretrained into a temporary folder): random token rows, half of them split into
context + continuation, go through `python -m gpt2job score IN OUT --backend B` (the job: master, worker, journal,
writer); transformers computes log_softmax(GPT2LMHeadModel(ids).logits) in float32 (TF32 off) gathered at the next
tokens, for the same scored positions. Prints a table of max |difference| of token log-probabilities and of row sums,
and whether the scored tokens and counts agree; exit 1 when a token differs by more than --tolerance (1e-4).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def write_124m(directory, seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257, initializer_range=0.05)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # non-trivial LayerNorms and biases (the default init leaves them 1 and 0)
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith(".weight")
                        else 0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_input(path, ctx, cont):
    import h5py
    with h5py.File(path, "w") as f:
        for name, rs in (("context_tokens", ctx), ("continuation_tokens", cont)):
            d = f.create_dataset(name, (len(rs),), dtype=h5py.vlen_dtype(np.int32))
            for i, r in enumerate(rs):
                d[i] = np.asarray(r, np.int32)


def hf_scores(model_dir, rows, starts):
    """transformers fp32: per row the log-probabilities of tokens starts..L-1."""
    import torch
    from transformers import GPT2LMHeadModel
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r, s in zip(rows, starts):
            ids = torch.tensor(np.asarray(r, np.int64))[None]
            lp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]            # [L, V]
            nxt = ids[0, 1:]
            out.append(lp[:-1].gather(1, nxt[:, None])[:, 0].numpy()[s - 1:])
    return out


def check(name, model_dir, a, tmp):
    import h5py
    import json
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    V, P = cfg["vocab_size"], cfg.get("n_positions", 1024)
    rng = np.random.default_rng(a.seed)
    rows = [rng.integers(0, V, rng.integers(2, min(64, P) + 1)).astype(np.int32) for _ in range(a.rows)]
    ctx = [r[:len(r) // 2] if i % 2 else r[:0] for i, r in enumerate(rows)]     # odd rows: context + continuation
    cont = [r[len(c):] for r, c in zip(rows, ctx)]
    starts = [max(len(c), 1) for c in ctx]
    inp, out = os.path.join(tmp, f"{name}.in.h5"), os.path.join(tmp, f"{name}.out.h5")
    write_input(inp, ctx, cont)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "gpt2job", "score", inp, out, "--model", model_dir, "--backend",
                        a.backend, "--dtype", a.dtype, "--overwrite"], env=env, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"{name}: gpt2job score exited {p.returncode}")
    with h5py.File(out, "r") as f:
        ours = [np.asarray(x) for x in f["token_logprobs"][()]]
        toks = [np.asarray(x) for x in f["scored_tokens"][()]]
        sums, counts = f["sum_logprob"][()], f["n_tokens"][()]
    ref = hf_scores(model_dir, rows, starts)
    same_tokens = all(t.tolist() == r[s:].tolist() for t, r, s in zip(toks, rows, starts)) and \
        counts.tolist() == [len(x) for x in ref]
    d_tok = max(float(np.abs(o - r).max()) for o, r in zip(ours, ref))
    d_sum = float(np.abs(sums - np.array([r.astype(np.float64).sum() for r in ref])).max())
    return {"model": name, "rows": len(rows), "tokens": int(counts.sum()), "max_abs_token": d_tok,
            "max_abs_sum": d_sum, "same_tokens": same_tokens, "ok": same_tokens and d_tok <= a.tolerance}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--no-124m", action="store_true", help="only the tiny checkpoints")
    a = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(n, os.path.join(FIXTURES, n)) for n in ("tiny-hf", "tiny-published", "tiny-fp16")]
        if not a.no_124m:
            models.append(("random-124m", write_124m(os.path.join(tmp, "random-124m"))))
        for name, d in models:
            results.append(check(name, d, a, tmp))
            r = results[-1]
            print(f"{r['model']:<14} rows {r['rows']:>3}  tokens {r['tokens']:>5}  max|d token| {r['max_abs_token']:.2e}"
                  f"  max|d sum| {r['max_abs_sum']:.2e}  tokens/counts same {r['same_tokens']}  "
                  f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    print(f"backend {a.backend}, dtype {a.dtype}, tolerance {a.tolerance:g} per token (fp32)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
