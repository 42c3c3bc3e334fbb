"""Plot and tabulate benchmark results (the JSON lines of run_workloads.py, baselines.py and
check_vs_transformers.py).

  python3 benchmarks/plot.py results.jsonl [more.jsonl ...] [--png bench.png] [--no-issue] [--no-png]

PNG, left: W3 throughput vs GPU count (ours, per dtype) with the ideal linear line (1-GPU figure x K).
PNG, right: W1 fp16, W1 fp32, W2 fp16: ours vs transformers vs the compact PyTorch engine (this run's
figures; hatched: the issue's figures, measured by the steering team, for reference).
Then a short table on stdout (last): the latest result of each configuration, speed-ups, checks, scaling.
Warm-up runs are left out. matplotlib is needed only for the PNG.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import fmt_int, fmt_s, print_table, read_jsonl  # noqa: E402

# From the issue, measured by the steering team (GPT-2 124M, one H100).
ISSUE = {("transformers", "w1", "float16"): 94000, ("transformers", "w1", "float32"): 46000,
         ("compact", "w1", "float16"): 263000, ("compact", "w1", "float32"): 57000,
         ("transformers", "w2", "float16"): 7800, ("compact", "w2", "float16"): 99500}
GROUPS = [("w1", "float16"), ("w1", "float32"), ("w2", "float16")]
ENGINES = ["ours", "ours+dedup", "transformers", "compact"]


def latest(recs):
    """{(engine, workload, dtype, gpus): the last successful record} (warm-ups and checks left out). Our runs that
    computed repeated prompts once (duplicate_prompts > 0) count as engine "ours+dedup"; "ours" computed every
    prompt, as the baselines do. Only the newest record's model: a results file appended to by calls with other
    weights compared ours with another model's baselines."""
    out, model = {}, newest_model(recs)
    for r in recs:
        if r.get("warmup") or r.get("engine") in (None, "check") or not r.get("throughput_tok_s"):
            continue
        if model and r.get("model") not in (None, model):
            continue
        engine = "ours+dedup" if r["engine"] == "ours" and r.get("duplicate_prompts") else r["engine"]
        out[(engine, r.get("workload"), r.get("dtype"), int(r.get("gpus") or 1))] = r
    return out


def newest_model(recs):
    return next((r["model"] for r in reversed(recs) if r.get("model")), None)


def checks(recs):
    out = {}
    for r in recs:
        if r.get("engine") == "check":
            out[r["check"]] = r
    return out


def plot(recs, png, issue=True):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    last = latest(recs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    w3 = {}
    for (e, w, d, k), r in last.items():
        if e == "ours" and w == "w3":
            w3.setdefault(d, {})[k] = r["throughput_tok_s"]
    if w3:
        kmax = max(k for v in w3.values() for k in v)
        for d, v in sorted(w3.items()):
            ks = sorted(v)
            line, = ax1.plot(ks, [v[k] for k in ks], "o-", label=f"ours {d}")
            if 1 in v:
                ax1.plot(range(1, kmax + 1), [v[1] * k for k in range(1, kmax + 1)], "--", color=line.get_color(),
                         alpha=0.5, label=f"ideal linear ({d})")
        ax1.set_xticks(range(1, kmax + 1))
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no W3 runs in these results", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("GPUs (workers)")
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("W3 (65,536 x 16 prompts, 8 new): scaling")
    ax1.grid(alpha=0.3)

    nbars = len(ENGINES) + (2 if issue else 0)
    width = 0.8 / nbars
    x0 = range(len(GROUPS))
    colors = {"ours": "tab:red", "ours+dedup": "tab:orange", "transformers": "tab:blue", "compact": "tab:green"}
    i = 0
    for e in ENGINES:
        vals = [(last.get((e, w, d, 1)) or {}).get("throughput_tok_s") or 0 for w, d in GROUPS]
        bars = ax2.bar([x + (i - 0.5 * (nbars - 1)) * width for x in x0], vals, width,
                       color=colors[e], label=f"{e} (this run)")
        for b, v in zip(bars, vals):
            if v:
                ax2.annotate(f"{v / 1e3:,.0f}k" if v >= 1e4 else f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                             fontsize=7)
        i += 1
        if issue and e in ("transformers", "compact"):
            vals = [ISSUE.get((e, w, d), 0) for w, d in GROUPS]
            ax2.bar([x + (i - 0.5 * (nbars - 1)) * width for x in x0], vals, width, color=colors[e],
                    alpha=0.35, hatch="//", label=f"{e} (issue, steering team)")
            i += 1
    ax2.set_xticks(list(x0))
    ax2.set_xticklabels([f"{w.upper()} {d}" for w, d in GROUPS])
    ax2.set_ylabel("generated tokens / s (1 GPU)")
    ax2.set_yscale("log")
    ax2.set_title("ours vs baselines (same weights, same prompts)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    gpus = sorted({r.get("gpu") for r in recs if r.get("gpu")})
    model = os.path.basename(str(newest_model(recs) or "?").rstrip("/"))
    fig.suptitle(f"gpt2job, {model}, greedy -- {', '.join(gpus) or '?'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}", flush=True)


def table(recs, out=sys.stdout):
    last = latest(recs)
    rows = []
    for w, d in GROUPS + [("w2", "float32")]:
        ours = last.get(("ours", w, d, 1))
        dedup = (last.get(("ours+dedup", w, d, 1)) or {}).get("throughput_tok_s")
        base = {e: (last.get((e, w, d, 1)) or {}).get("throughput_tok_s") for e in ("transformers", "compact")}
        if not ours and not dedup and not any(base.values()):
            continue
        o = (ours or {}).get("throughput_tok_s")
        rows.append([f"{w.upper()} {d}", fmt_int(o), fmt_int(dedup), fmt_int(base["transformers"]),
                     fmt_int(base["compact"]),
                     f"{o / base['transformers']:.2f}x" if o and base["transformers"] else "-",
                     f"{o / base['compact']:.2f}x" if o and base["compact"] else "-",
                     fmt_s((ours or {}).get("time_to_ready_s")), fmt_s((ours or {}).get("wall_s"))])
    out.write("\n== throughput, generated tokens/s, 1 GPU (ours: first chunk out -> last completion; ours: every "
              "prompt computed; ours+dedup: repeated prompts computed once, the default) ==\n")
    if rows:
        print_table(["workload", "ours", "ours+dedup", "transformers", "compact", "vs tf", "vs compact", "ready_s",
                     "wall_s"],
                    rows, out)
    else:
        out.write("(none)\n")
    w3 = sorted((k, d, r) for (e, w, d, k), r in last.items() if e == "ours" and w == "w3")
    if w3:
        one = {d: r["throughput_tok_s"] for k, d, r in w3 if k == 1}
        out.write("\n== W3 scaling (ours) ==\n")
        print_table(["dtype", "GPUs", "tok/s", "efficiency", "ready_s", "wall_s"],
                    [[d, k, fmt_int(r["throughput_tok_s"]),
                      f"{r['throughput_tok_s'] / (k * one[d]):.0%}" if d in one else "-",
                      fmt_s(r.get("time_to_ready_s")), fmt_s(r.get("wall_s"))] for k, d, r in sorted(w3, key=lambda t: (t[1], t[0]))],
                    out)
    ch = checks(recs)
    if ch:
        out.write("\n== correctness ==\n")
        trows = []
        for name, r in ch.items():
            v = r.get("value")
            v = "-" if v is None else (f"{v:.4g}" if "|logit" in name else f"{v:.4%}")
            trows.append([name, v, {True: "PASS", False: "FAIL", None: "info"}[r.get("passed")],
                          (r.get("note") or "")[:60]])
        print_table(["check", "value", "result", "note"], trows, out)
    out.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--png", default="bench.png")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--no-issue", action="store_true", help="leave the issue's reference bars out")
    a = ap.parse_args(argv)
    recs = read_jsonl(a.results)
    if not a.no_png:
        try:
            plot(recs, a.png, issue=not a.no_issue)
        except ImportError as e:
            print(f"no PNG ({e})", flush=True)
    table(recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
