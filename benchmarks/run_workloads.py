"""Run our engine on the benchmark workloads through the real pipeline (mpirun, master + K GPU workers) and
report what the job itself measured (the output's 'summary' attribute).

  python3 benchmarks/run_workloads.py --workloads-dir /tmp/gpt2job-bench/workloads \
      [--workload w1,w2] [--dtype float16,float32] [--gpus 1 | --gpus 1,2,3,4] \
      [--model random:gpt2 | HF_DIR] [--results results.jsonl] [--out-dir /tmp/gpt2job-bench/out]

Each run is
  mpirun -np K+1 --bind-to none python -m gpt2job run IN OUT --model M --backend cuda --dtype D \
      --max-new-tokens N [--ignore-eos] --overwrite
with GPT2JOB_LAUNCH_TIME set just before mpirun starts, so the job's time to ready and wall time count from
the launch. Throughput = generated tokens / (last completion at the master - first chunk handed out; never shorter than from "all ranks ready").

Before the measured runs a tiny warm-up job (64 prompts, 2 new tokens, K = the largest GPU count) fills the
per-rank PyCUDA compile cache, so the reported time to ready is the warm one (the warm-up's own, cold time to
ready is reported too). Workload files come from workloads.py (written here when missing).
Results: a table on stdout and one JSON line per run appended to --results (engine "ours").
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (ROOT, WORKLOADS, append_jsonl, base_record, fmt_int, fmt_s, gpu_count,  # noqa: E402
                          print_table, read_output, vocab_dir)


def mpirun_cmd(np_, mpirun_args=None):
    cmd = ["mpirun", "-np", str(np_)]
    if (os.cpu_count() or 1) < np_:
        cmd.append("--oversubscribe")
    cmd += ["--bind-to", "none"] if mpirun_args is None else list(mpirun_args)
    return cmd + ["-x", "GPT2JOB_LAUNCH_TIME", "-x", "PYTHONPATH"]


def run_job(inp, out, model, backend, dtype, gpus, max_new, ignore_eos, log=None, timeout=1800, extra=(),
            mpirun_args=None, env=None, tree=ROOT, ranks=None):
    """One job of the gpt2job in folder `tree` (another commit's `git archive`, for A/B runs); dtype or max_new
    None: the job's default (or what extra says). env: variables added to this process's. ranks: mpirun's -np
    (default gpus + 1: a worker per GPU). Returns a dict with rc, the summary (None on failure), e2e wall time, the
    command and the job's output (stdout and stderr)."""
    job = [sys.executable, "-m", "gpt2job", "run", inp, out, "--model", model, "--backend", backend,
           *(["--dtype", dtype] if dtype else []), *(["--max-new-tokens", str(max_new)] if max_new is not None else []),
           "--overwrite"] + (["--ignore-eos"] if ignore_eos else []) + list(extra)
    cmd = job if gpus == 0 else mpirun_cmd(ranks or gpus + 1, mpirun_args) + job
    tree = os.path.abspath(tree)
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = tree + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    e["PYTHONUNBUFFERED"] = "1"
    if gpus > 0 and backend == "cuda":  # exactly K GPUs: else the master computes on a spare one too
        e["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    if not e.get("GPT2_VOCAB_DIR") and (d := vocab_dir()):   # the tokenizer writes the 'completions' text, as in
        e["GPT2_VOCAB_DIR"] = d                               # production
    t0 = time.time()
    e["GPT2JOB_LAUNCH_TIME"] = repr(t0)
    logf = open(log, "w") if log else None
    try:
        if logf:
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
        p = subprocess.run(cmd, env=e, cwd=tree, stdout=logf or subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        rc, text = p.returncode, (p.stdout or "")
    except subprocess.TimeoutExpired:
        rc, text = 124, ""
    finally:
        if logf:
            logf.close()
    e2e = time.time() - t0
    if log:
        with open(log) as f:
            text = f.read()
    summary = None
    if rc == 0:
        try:
            summary = read_output(out)[0]
        except Exception as ex:  # noqa: BLE001
            text += f"\n(could not read the summary: {ex})"
    return {"rc": rc, "summary": summary, "e2e_wall_s": e2e, "cmd": " ".join(cmd), "log_tail": text[-3000:],
            "output": text}


def record_of(res, workload, dtype, gpus, model, backend, n_prompts, max_new, ignore_eos, log, warmup=False):
    sm = res["summary"] or {}
    workers = sm.get("workers", [])
    return base_record(
        engine="ours", workload=workload, dtype=dtype, gpus=gpus, model=model, backend=backend, warmup=warmup,
        prompts=n_prompts, max_new_tokens=max_new, ignore_eos=ignore_eos, rc=res["rc"],
        throughput_tok_s=sm.get("throughput_tokens_per_s"), generated_tokens=sm.get("generated_tokens"),
        time_to_ready_s=sm.get("time_to_ready_s"), wall_s=sm.get("wall_s"), generation_s=sm.get("generation_s"),
        duplicate_prompts=sm.get("duplicate_prompts", 0),
        prefix_share=(workers[0].get("kernel_options") or {}).get("prefix_share") if workers else None,
        e2e_wall_s=round(res["e2e_wall_s"], 3), command=res["cmd"], log=log,
        workers=[{k: w.get(k) for k in ("rank", "device", "rows", "tokens", "chunks", "compute_s", "init_s")}
                 for w in workers])


def ensure_workloads(wdir, names, seed_workload=None):
    """The workloads `names` in wdir: written where missing, and all of them again where they were made from other
    prompts than the seed workload asked for (kept, they were measured in its place)."""
    import json
    import workloads
    from bench_common import seed_workload_path
    missing = [n for n in names if not os.path.isfile(os.path.join(wdir, WORKLOADS[n]["file"]))]
    if seed_workload:
        try:
            with open(os.path.join(wdir, "workloads.json")) as f:
                made_from = json.load(f).get("seed_workload")
        except (OSError, ValueError):
            made_from = None
        if made_from != seed_workload_path(seed_workload):
            missing = list(names)
    if missing or not os.path.isfile(os.path.join(wdir, "warmup.h5")):
        workloads.make(wdir, sorted(set(missing) | {"w1"}), seed_workload)


def n_rows(path):
    import h5py
    with h5py.File(path, "r") as f:
        return len(f["prompt_tokens"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads-dir", default="/tmp/gpt2job-bench/workloads")
    ap.add_argument("--workload", default="w1", help="comma list of w1,w2,w3")
    ap.add_argument("--dtype", default="float16,float32", help="comma list of float16,float32")
    ap.add_argument("--gpus", default="1", help="comma/space list of GPU counts K (K workers + 1 master)")
    ap.add_argument("--model", default="random:gpt2", help="random:gpt2 or an HF dir (export_weights.py)")
    ap.add_argument("--backend", default="cuda", help="cuda (default); numpy for CPU smoke tests")
    ap.add_argument("--results", help="append one JSON line per run here")
    ap.add_argument("--out-dir", default="/tmp/gpt2job-bench/out", help="output HDF5 files and logs")
    ap.add_argument("--repeat", type=int, default=1, help="measured runs per configuration")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--warmup-only", action="store_true", help="only the warm-up jobs (fill the compile cache)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per job")
    ap.add_argument("--seed-workload", help="the seed workload's input.bin (see workloads.py)")
    ap.add_argument("--mpirun-args", help="replaces the default '--bind-to none' (one string, split on spaces)")
    ap.add_argument("--extra", default="", help="extra flags for 'gpt2job run' (one string, split on spaces)")
    ap.add_argument("--dedup", default="on", help="comma list of on,off: off runs with --no-dedup (every prompt "
                    "computed, even repeats of another); 'on,off' measures both")
    ap.add_argument("--allow-more-gpus", action="store_true",
                    help="run K > visible GPUs anyway (otherwise such K are skipped)")
    a = ap.parse_args(argv)

    names = [w.strip() for w in a.workload.split(",") if w.strip()]
    dtypes = [d.strip() for d in a.dtype.split(",") if d.strip()]
    gpus = [int(g) for g in a.gpus.replace(",", " ").split()]
    mpirun_args = a.mpirun_args.split() if a.mpirun_args is not None else None
    extra = a.extra.split()
    dedups = [d.strip() for d in a.dedup.split(",") if d.strip()]
    if not dedups or set(dedups) - {"on", "off"}:
        ap.error("--dedup: a comma list of on, off")
    if "w3" in names and "on" in dedups:
        print("note: W3 repeats W1 eight times: with --dedup on it computes each distinct prompt once, so its "
              "figures say nothing about scaling (plot.py files them as ours+dedup); use --dedup off", flush=True)
    if a.backend == "cuda" and not a.allow_more_gpus:
        have = gpu_count()
        skipped = [k for k in gpus if k > have]
        if skipped:
            print(f"skipping GPU counts {skipped}: this machine shows {have} GPU(s)", flush=True)
        gpus = [k for k in gpus if k <= have]
    ensure_workloads(a.workloads_dir, names, a.seed_workload)
    os.makedirs(a.out_dir, exist_ok=True)
    rows, failed = [], 0

    if not a.no_warmup and gpus:
        kmax = max(gpus)
        for dt in dtypes:
            log = os.path.join(a.out_dir, f"warmup-{dt}-{kmax}gpu.log")
            res = run_job(os.path.join(a.workloads_dir, "warmup.h5"), os.path.join(a.out_dir, "warmup-out.h5"),
                          a.model, a.backend, dt, kmax, 2, True, log=log, timeout=a.timeout, extra=extra,
                          mpirun_args=mpirun_args)
            sm = res["summary"] or {}
            print(f"warm-up {dt} K={kmax}: rc={res['rc']} time to ready (cold cache) "
                  f"{fmt_s(sm.get('time_to_ready_s'))} s, e2e {res['e2e_wall_s']:.1f} s  [{log}]", flush=True)
            append_jsonl(a.results, record_of(res, "warmup", dt, kmax, a.model, a.backend, 64, 2, True, log,
                                              warmup=True))
            if res["rc"] != 0:
                print(res["log_tail"], flush=True)

    if a.warmup_only:
        return 0
    for name in names:
        spec = WORKLOADS[name]
        inp = os.path.join(a.workloads_dir, spec["file"])
        n = n_rows(inp)
        for dt in dtypes:
            for k, dd, rep in [(k, dd, rep) for k in gpus for dd in dedups for rep in range(a.repeat)]:
                tag = (f"{name}-{dt}-{k}gpu" + ("-nodedup" if dd == "off" else "") +
                       (f"-r{rep}" if a.repeat > 1 else ""))
                out, log = os.path.join(a.out_dir, tag + ".h5"), os.path.join(a.out_dir, tag + ".log")
                res = run_job(inp, out, a.model, a.backend, dt, k, spec["max_new_tokens"], spec["ignore_eos"],
                              log=log, timeout=a.timeout, extra=extra + (["--no-dedup"] if dd == "off" else []),
                              mpirun_args=mpirun_args)
                rec = record_of(res, name, dt, k, a.model, a.backend, n, spec["max_new_tokens"],
                                spec["ignore_eos"], log)
                append_jsonl(a.results, rec)
                if res["rc"] != 0:
                    failed += 1
                    print(f"{tag}: FAILED rc={res['rc']}  [{log}]\n{res['log_tail']}", flush=True)
                else:
                    print(f"{tag}: {fmt_int(rec['throughput_tok_s'])} tok/s, ready {fmt_s(rec['time_to_ready_s'])}"
                          f" s, wall {fmt_s(rec['wall_s'])} s", flush=True)
                rows.append([name, dt, k, n, rec["duplicate_prompts"], fmt_int(rec["generated_tokens"]),
                             fmt_int(rec["throughput_tok_s"]), fmt_s(rec["time_to_ready_s"]),
                             fmt_s(rec["generation_s"]), fmt_s(rec["wall_s"]), fmt_s(rec["e2e_wall_s"]), "ok" if res["rc"] == 0 else f"rc={res['rc']}"])
    print()
    print_table(["workload", "dtype", "GPUs", "prompts", "repeats", "generated", "tok/s", "ready_s", "gen_s", "wall_s",
                 "e2e_s", "status"], rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
