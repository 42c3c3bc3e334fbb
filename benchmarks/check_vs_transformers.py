"""Correctness bars of the performance issue.

  python3 benchmarks/check_vs_transformers.py --model HF_DIR [--workloads-dir DIR] [--parts i,ii,iii]
      [--hf-tokens FILE] [--n-logit-prompts 1024] [--results results.jsonl] [--out-dir DIR]

(i)   W1 with the HF_DIR weights: our job (`python -m gpt2job run ... --backend cuda --dtype float32
      --ignore-eos`, 1 GPU under mpirun) vs transformers' fp32 greedy tokens (TF32 off): % of the generated
      tokens that agree; bar >= 99.95%. The transformers tokens are read from --hf-tokens (int32 [N, 8], as
      written by baselines.py --tokens-dir: transformers-w1-float32.i32) or computed here and saved there.
(ii)  float16 vs float32 logits, teacher-forced over the fp32 greedy continuation: for k = 0..7 the first
      --n-logit-prompts W1 prompts extended by the first k transformers-fp32 tokens; CudaBackend.last_logits
      (our kernels, backend built in-process) in float16 vs float32: max |logit difference|, top-1 agreement;
      plus how often our fp32 top-1 equals transformers' token (teacher-forced). Reported; a bar only with
      --fp16-top1-bar.
(iii) tiny checkpoints (tests/fixtures/tiny-hf, tiny-published, tiny-fp16): `gpt2job run --backend cuda
      --dtype float32` completions equal `--backend numpy`'s (tokens and finish reasons), eos stopping on
      (and --ignore-eos for tiny-hf).

Exit status 1 when a bar fails. --backend numpy (and --logits-backend reference) run the same plumbing on the
CPU for smoke tests.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (ROOT, WORKLOADS, append_jsonl, base_record, load_tokens, print_table,  # noqa: E402
                          read_output, read_prompt_tokens, save_tokens, tokens_key, tokens_matrix)
import run_workloads  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def hf_fp32_tokens(hf_dir, prompts, new, path, batch=8192):
    """transformers fp32 greedy tokens [N, new] (from path when it holds them for these weights and prompts, else
    computed and saved there)."""
    key = tokens_key(hf_dir, prompts, new)
    t = load_tokens(path, key, (len(prompts), new)) if path else None
    if t is not None:
        print(f"transformers fp32 tokens from {path}", flush=True)
        return t
    import torch
    import baselines
    baselines.set_precision(torch, "float32")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    eng = baselines.HFEngine(hf_dir, dev, torch.float32)
    out = np.concatenate([eng.generate(prompts[i:i + batch], new) for i in range(0, len(prompts), batch)])
    del eng
    if dev == "cuda":
        torch.cuda.empty_cache()
    print(f"transformers fp32 greedy tokens computed on {dev} in {time.perf_counter() - t0:.1f} s", flush=True)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_tokens(path, out, key)
    return out


def check_i(a, hf_dir, prompts, ref):
    spec = WORKLOADS["w1"]
    out, log = os.path.join(a.out_dir, "check-i-w1-float32.h5"), os.path.join(a.out_dir, "check-i-w1-float32.log")
    res = run_workloads.run_job(os.path.join(a.workloads_dir, spec["file"]), out, hf_dir, a.backend, "float32",
                                a.gpus, spec["max_new_tokens"], True, log=log, timeout=a.timeout)
    if res["rc"] != 0:
        print(res["log_tail"], flush=True)
        return [("i: W1 fp32 tokens = transformers fp32", None, a.bar, False, f"job failed rc={res['rc']} [{log}]")]
    ours = tokens_matrix(read_output(out)[1], spec["max_new_tokens"])
    eq = ours == ref
    tok, rows = float(eq.mean()), float(eq.all(axis=1).mean())
    bad = np.flatnonzero(~eq.all(axis=1))
    note = f"{len(bad)} rows differ" + (f", first row {bad[0]}: ours {ours[bad[0]].tolist()} vs "
                                        f"transformers {ref[bad[0]].tolist()}" if len(bad) else "")
    return [("i: W1 fp32 tokens = transformers fp32", tok, a.bar, tok >= a.bar, note),
            ("i: W1 fp32 rows identical", rows, None, None, f"{len(prompts)} rows")]


class RefLogits:
    """CPU stand-in for CudaBackend.last_logits: the NumPy reference; 'float16' rounds the weights to fp16."""

    def __init__(self, params, dtype):
        from gpt2job.model import reference
        self.ref = reference
        if dtype == "float16":
            import copy
            params = copy.copy(params)
            r = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
            params.wte, params.wpe = r(params.wte), r(params.wpe)
            params.layers = [{k: r(v) for k, v in L.items()} for L in params.layers]
        self.params = params

    def last_logits(self, prompts):
        return self.ref.prefill(self.params, prompts, max(len(p) for p in prompts))[2].astype(np.float32)

    def close(self):
        pass


def all_last_logits(a, params, dtype, prompt_sets):
    """{k: [n, V] float32} of the backend's last logits, or a string saying why not."""
    from gpt2job.settings import GenerationSettings
    if a.logits_backend == "reference":
        be = RefLogits(params, dtype)
    else:
        from gpt2job.backends.cuda.backend import CudaBackend
        if not hasattr(CudaBackend, "last_logits"):
            return "CudaBackend.last_logits is not there (yet)"
        be = CudaBackend(params, GenerationSettings(max_new_tokens=8, ignore_eos=True,
                                                    eos_token_id=params.config.eos_token_id), dtype=dtype)
    try:
        out = {}
        for k, ps in prompt_sets.items():
            out[k] = np.concatenate([np.asarray(be.last_logits(ps[i:i + a.logits_batch]), np.float32)
                                     for i in range(0, len(ps), a.logits_batch)])
        return out
    finally:
        be.close()


def check_ii(a, hf_dir, prompts, ref):
    from gpt2job.model.weights import load_params
    n = min(a.n_logit_prompts, len(prompts))
    new = ref.shape[1]
    sets = {k: [np.concatenate([prompts[i], ref[i, :k]]).astype(np.int32) for i in range(n)] for k in range(new)}
    params = load_params(hf_dir)
    t0 = time.perf_counter()
    l32 = all_last_logits(a, params, "float32", sets)
    if isinstance(l32, str):
        return [("ii: fp16 vs fp32 logits", None, None, None, "skipped: " + l32)]
    l16 = all_last_logits(a, params, "float16", sets)
    if isinstance(l16, str):
        return [("ii: fp16 vs fp32 logits", None, None, None, "skipped: " + l16)]
    maxd, meand, top1, ref_top1, per_k = 0.0, [], [], [], []
    for k in range(new):
        d = np.abs(l16[k] - l32[k])
        a32, a16 = l32[k].argmax(-1), l16[k].argmax(-1)
        maxd = max(maxd, float(d.max()))
        meand.append(float(d.mean()))
        top1.append(float((a16 == a32).mean()))
        ref_top1.append(float((a32 == ref[:n, k]).mean()))
        per_k.append(f"k={k}: max {d.max():.3g} top1 {top1[-1]:.2%}")
    print("   " + "; ".join(per_k), flush=True)
    print(f"   logits std (fp32) {float(np.std(l32[0])):.3f}; {time.perf_counter() - t0:.1f} s", flush=True)
    bar = a.fp16_top1_bar
    t1 = float(np.mean(top1))
    return [("ii: fp16 vs fp32 max |logit diff|", maxd, None, None, f"{n} prompts x k=0..{new - 1}; "
             f"mean |diff| {np.mean(meand):.2e}"),
            ("ii: fp16 vs fp32 top-1 agreement", t1, bar, (t1 >= bar) if bar is not None else None,
             f"worst k {min(top1):.2%}"),
            ("ii: our fp32 top-1 = transformers token (teacher-forced)", float(np.mean(ref_top1)), None, None,
             f"worst k {min(ref_top1):.2%}")]


def tiny_input(path, n_random=52, seed=5):
    import workloads
    d = np.load(os.path.join(FIXTURES, "tiny_expected.npz"), allow_pickle=False)
    off, toks = d["prompt_offsets"], d["prompt_tokens"]
    rows = [toks[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    rng = np.random.default_rng(seed)
    rows += [rng.integers(0, 1000, int(L)).astype(np.int32) for L in rng.integers(1, 100, n_random)]
    workloads.write_vlen(path, rows)
    return len(rows)


def check_iii(a):
    inp = os.path.join(a.out_dir, "tiny-input.h5")
    n = tiny_input(inp)
    results = []
    cases = [(c, False) for c in ("tiny-hf", "tiny-published", "tiny-fp16")] + [("tiny-hf", True)]
    for ckpt, ign in cases:
        outs = {}
        for be in ("numpy", a.backend):
            tag = f"tiny-{ckpt}-{be}{'-ignore-eos' if ign else ''}"
            out, log = os.path.join(a.out_dir, tag + ".h5"), os.path.join(a.out_dir, tag + ".log")
            res = run_workloads.run_job(inp, out, os.path.join(FIXTURES, ckpt), be, "float32", 0, 10, ign, log=log,
                                        timeout=a.timeout)
            if res["rc"] != 0:
                print(res["log_tail"], flush=True)
                outs = None
                break
            import h5py
            with h5py.File(out, "r") as f:
                outs[be] = ([np.asarray(t) for t in f["completion_tokens"][()]], list(f["finish_reason"][()]))
        name = f"iii: {ckpt}{' --ignore-eos' if ign else ''}: {a.backend} fp32 = numpy"
        if outs is None:
            results.append((name, None, 1.0, False, "job failed (see log)"))
            continue
        (t0, f0), (t1, f1) = outs["numpy"], outs[a.backend]
        same = [np.array_equal(x, y) and fx == fy for x, y, fx, fy in zip(t0, t1, f0, f1)]
        frac = float(np.mean(same))
        stops = sum(1 for f in f0 if (f.decode() if isinstance(f, bytes) else f) == "stop")
        results.append((name, frac, 1.0, frac == 1.0, f"{n} prompts, {stops} stop at eos"))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:gpt2", help="HF dir (export_weights.py); random:... is exported")
    ap.add_argument("--workloads-dir", default="/tmp/gpt2job-bench/workloads")
    ap.add_argument("--parts", default="i,ii,iii")
    ap.add_argument("--hf-tokens", help="transformers fp32 W1 tokens, int32 [N, 8] (read, or written when absent)")
    ap.add_argument("--backend", default="cuda", help="our backend under test (numpy: CPU smoke test)")
    ap.add_argument("--logits-backend", default="cuda", choices=("cuda", "reference"),
                    help="(ii) with CudaBackend.last_logits, or the NumPy reference (CPU smoke test)")
    ap.add_argument("--gpus", type=int, default=1, help="(i) GPU workers of the job")
    ap.add_argument("--n-logit-prompts", type=int, default=1024)
    ap.add_argument("--logits-batch", type=int, default=1024)
    ap.add_argument("--bar", type=float, default=0.9995)
    ap.add_argument("--fp16-top1-bar", type=float, default=None)
    ap.add_argument("--results", help="append one JSON line per check here")
    ap.add_argument("--out-dir", default="/tmp/gpt2job-bench/check")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    hf_dir = a.model
    if hf_dir.startswith("random:"):
        import export_weights
        hf_dir = export_weights.export(a.model, os.path.join(a.out_dir, "hf-" + "".join(
            c if c.isalnum() else "_" for c in a.model)))

    rows = []
    if "i" in parts or "ii" in parts:
        run_workloads.ensure_workloads(a.workloads_dir, ["w1"])
        prompts = read_prompt_tokens(os.path.join(a.workloads_dir, WORKLOADS["w1"]["file"]))
        ref = hf_fp32_tokens(hf_dir, prompts, WORKLOADS["w1"]["max_new_tokens"],
                             a.hf_tokens or os.path.join(a.out_dir, "transformers-w1-float32.i32"))
        if "i" in parts:
            rows += check_i(a, hf_dir, prompts, ref)
            print(rows[-2], flush=True)
        if "ii" in parts:
            rows += check_ii(a, hf_dir, prompts, ref)
    if "iii" in parts:
        rows += check_iii(a)
    ok = True
    table = []
    for name, value, bar, passed, note in rows:
        append_jsonl(a.results, base_record(engine="check", check=name, value=value, bar=bar, passed=passed,
                                            note=note, model=hf_dir, backend=a.backend))
        ok &= passed is not False
        v = "-" if value is None else (f"{value:.4g}" if "|logit" in name else f"{value:.4%}")
        table.append([name, v, "-" if bar is None else f">= {bar:.4%}",
                      {True: "PASS", False: "FAIL", None: "info"}[passed], note])
    print()
    print_table(["check", "value", "bar", "result", "note"], table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
