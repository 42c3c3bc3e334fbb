"""The GPU fault runs of `python benchmarks/reliability.py --gpu` (issue 15, section 2), on a GPU machine with 2 GPUs
(or 1: the 2-worker job then shares it with --share-gpus). Each scenario is compared with a clean run of the same
command: 'identical' means the same tokens, finish reasons and done flags, and a finished output.

  oom-start    GPT-2 124M fp16, W1 (the seed workload's 8,192 x 16 tokens, else seeded random ones; 8 new), with
               another process (tests/gpu_hog.py) holding all but 2.5 GB of GPU 0: the worker sizes its buffers to
               what is left (a 'buffers reduced' warning) and asks for smaller chunks
  oom-chunk    1,024 prompts of 384..512 tokens in one chunk (--chunk-size 1024, ~20 GB of KV cache with room), with
               the same 2.5 GB left
  cuda-error   the 2-worker job with GPT2JOB_FAULT=1:2:cuda (a kernel reads an illegal address mid-chunk; the context
               is lost): the worker is retired with that reason in the summary, its chunks go to the other
  kill-worker  kill -9 of a worker rank of the 2-worker job at a random moment, then the same command again until it
               exits 0 (reliability.one_kill: also no row computed twice, nothing left behind)
  kill-master  the same with the master rank
The 2-worker job: mpirun -np 3, GPT-2 124M fp16, 1,024 prompts of 64..256 tokens, 256 new tokens, --ignore-eos,
--chunk-size 32: a few seconds of decode after a few seconds of start-up. Kill moments are drawn from
U(3/4 of the clean run's time to first work, the clean run's wall time), so that most land mid-job.
'max resume' is the longest rerun (start-up included). The kills stop once --gpu-budget seconds have passed.
"""
import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import reliability as R                      # the CPU kill logic: one_kill, read_result, same, job_env
from bench_common import append_jsonl, base_record, load_seed_prompts

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:gpt2"
BACKEND = ["--backend", "cuda", "--dtype", "float16"]
N_W1 = 8192                             # oom-start
N_LONG, LONG_LENS = 1024, (384, 512)    # oom-chunk, in one chunk
N_MP, MP_LENS, MP_NEW = 1024, (64, 256), 256   # the 2-worker job (chunks of 32)


def write_2d(path, toks):
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("prompt_tokens", data=np.ascontiguousarray(toks, np.int32))


def write_vlen(path, rows):
    import h5py
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=h5py.vlen_dtype(np.int32))
        for i, r in enumerate(rows):
            ds[i] = np.asarray(r, np.int32)


def single_cmd(*extra):
    def cmd(inp, out):
        return [sys.executable, "-m", "gpt2job", "run", str(inp), str(out), "--model", MODEL, *BACKEND,
                *map(str, extra)]
    return cmd


def mp_cmd(share):
    def cmd(inp, out):
        return ["mpirun", "-np", "3", "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "gpt2job", "run",
                str(inp), str(out), "--model", MODEL, *BACKEND, "--max-new-tokens", str(MP_NEW), "--ignore-eos",
                "--chunk-size", "32", *share]
    return cmd


def env(**extra):
    e = R.job_env()
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_job(cmd, e, log):
    t = time.monotonic()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, cwd=str(ROOT), timeout=400)
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    return p.returncode, time.monotonic() - t, p.stderr


@contextlib.contextmanager
def hog(leave_mib=2560):
    """Another process holding all but leave_mib MiB of GPU 0 (tests/gpu_hog.py)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gpu_hog.py"), "--leave-mib", str(leave_mib)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env(CUDA_VISIBLE_DEVICES=0))
    line = p.stdout.readline().strip()
    if not line.startswith("hog ready"):
        p.kill()
        raise RuntimeError(f"the memory hog did not start: {line!r} {p.stderr.read()[-500:]}")
    try:
        yield line
    finally:
        p.stdin.close()
        p.wait(timeout=120)


def compare(out, clean):
    try:
        res = R.read_result(out)
    except Exception as e:
        return False, f"cannot read the output ({type(e).__name__}: {e})", None
    if not res["finished"]:
        return False, "output not finished", res
    if not R.same(res, clean):
        bad = sum(1 for a, b in zip(res["tokens"], clean["tokens"]) if a != b)
        return False, f"{bad} of {len(clean['tokens'])} rows differ from the clean run", res
    return True, "", res


def chunks_line(stderr):
    import re
    m = re.search(r"ready: chunks of ([\d,]+) prompt", stderr)
    return m.group(1) if m else "?"


def oom_scenario(name, d, inp, cmd):
    """A clean run of cmd on GPU 0, then the same with all but 2.5 GB of it held by another process."""
    e = env(CUDA_VISIBLE_DEVICES=0)
    rc, wall, err = run_job(cmd(inp, d / f"{name}-clean.h5"), e, d / f"{name}-clean.log")
    if rc != 0:
        return {"scenario": name, "runs": 1, "identical": 0, "note": f"clean run failed (exit {rc})"}
    clean = R.read_result(d / f"{name}-clean.h5")
    with hog() as h:
        rc, wall2, err2 = run_job(cmd(inp, d / f"{name}.h5"), e, d / f"{name}.log")
    ok, why, _ = compare(d / f"{name}.h5", clean) if rc == 0 else (False, f"exit {rc}: {err2.strip()[-300:]}", None)
    reduced = "buffers reduced" in err2
    note = (f"{h.split(':')[1].split(',')[0].strip()}; {'buffers reduced' if reduced else 'buffers NOT reduced'}; "
            f"chunks of {chunks_line(err2)} (clean {chunks_line(err)}); {wall2:.1f} s (clean {wall:.1f} s)")
    if "Traceback" in err2:
        ok, why = False, why + " traceback on stderr"
    if not reduced:                 # the memory left did not make the worker reduce anything: nothing was tested
        ok = False
    return {"scenario": name, "runs": 1, "identical": int(ok), "note": note + (f"; {why}" if why else "")}


def cuda_error_scenario(d, inp, cmd, clean):
    out = d / "cuda-error.h5"
    rc, wall, err = run_job(cmd(inp, out), env(GPT2JOB_FAULT="1:2:cuda"), d / "cuda-error.log")
    ok, why, res = compare(out, clean) if rc == 0 else (False, f"exit {rc}: {err.strip()[-300:]}", None)
    retired = ""
    if res is not None and res.get("summary"):
        retired = next((w.get("retired") or "" for w in res["summary"]["workers"] if w["rank"] == 1), "")
        if "error during chunk" not in retired:
            ok, why = False, why + " rank 1 not retired for its error"
    return {"scenario": "cuda-error", "runs": 1, "identical": int(ok),
            "note": f"rank 1 retired: {retired[:120] or '-'}" + (f"; {why}" if why else "")}


def run(a, workdir):
    """The scenarios; returns (all identical, the table)."""
    from gpt2job.backends import gpu_count, pycuda_available
    t0 = time.monotonic()
    d = Path(workdir) / "gpu"
    d.mkdir(parents=True, exist_ok=True)
    ngpu = gpu_count()
    if ngpu == 0 or not pycuda_available():
        return False, f"--gpu: no GPU ({ngpu}) or no pycuda here"
    share = [] if ngpu >= 2 else ["--share-gpus"]
    rng = np.random.default_rng(0)
    w1, source = load_seed_prompts(n=N_W1)
    write_2d(d / "w1.h5", w1)
    write_vlen(d / "long.h5", [rng.integers(0, 50257, int(n)) for n in rng.integers(LONG_LENS[0], LONG_LENS[1] + 1,
                                                                                     N_LONG)])
    write_vlen(d / "mp.h5", [rng.integers(0, 50257, int(n)) for n in rng.integers(MP_LENS[0], MP_LENS[1] + 1, N_MP)])
    print(f"gpu: {ngpu} GPU(s); W1 prompts from {source}; work folder {d}", flush=True)
    rows = []
    # the 2-worker job, clean: the first run also fills the kernel cache of both GPU slots
    mp = mp_cmd(share)
    walls, clean = [], None
    for k in range(2):
        rc, wall, err = run_job(mp(d / "mp.h5", d / f"mp-clean{k}.h5"), env(), d / f"mp-clean{k}.log")
        if rc != 0:
            return False, f"--gpu: the clean 2-worker run failed (exit {rc}):\n{err[-2000:]}"
        res = R.read_result(d / f"mp-clean{k}.h5")
        if clean is not None and not R.same(res, clean):
            rows.append({"scenario": "clean-repeat", "runs": 2, "identical": 0, "note": "two clean runs differ"})
        clean, walls = res, walls + [wall]
        print(f"  clean 2-worker run {k}: {wall:.1f} s, first work at {res['summary']['time_to_first_work_s']:.1f} s",
              flush=True)
    window, t_min = walls[-1], 0.75 * clean["summary"]["time_to_first_work_s"]
    for name, inp, cmd in (("oom-start", d / "w1.h5", single_cmd("--max-new-tokens", 8)),
                           ("oom-chunk", d / "long.h5", single_cmd("--max-new-tokens", 8, "--chunk-size", N_LONG))):
        rows.append(oom_scenario(name, d, inp, cmd))
        print(f"  {rows[-1]}", flush=True)
    rows.append(cuda_error_scenario(d, d / "mp.h5", mp, clean))
    print(f"  {rows[-1]}", flush=True)
    # kill -9 at random moments, each followed by the same command until it exits 0
    prng = random.Random(a.seed)
    infos = {"worker": [], "master": []}
    for i in range(2 * a.gpu_kills):
        if time.monotonic() - t0 > a.gpu_budget:
            print(f"  kills stopped after {i}: --gpu-budget {a.gpu_budget:.0f} s spent", flush=True)
            break
        victim = ("worker", "master")[i % 2]
        info = R.one_kill(i, victim, window, d / "mp.h5", d, clean, prng, cmd=mp, n_prompts=N_MP, t_min=t_min)
        infos[victim].append(info)
        print(f"  {'ok  ' if not info['problems'] else 'FAIL'} kill {i:2d}: {victim:<6} at {info['t_kill']:5.2f} s, "
              f"{info['phase']:<28} reruns {info['reruns']} resume {info.get('resume_s', '-')} s"
              + ("" if not info["problems"] else "  <- " + "; ".join(info["problems"])), flush=True)
    for victim, xs in infos.items():
        phases = {}
        for x in xs:
            key = x["phase"].split(" (")[0]
            phases[key] = phases.get(key, 0) + 1
        rows.append({"scenario": f"kill-{victim}", "runs": len(xs), "identical": sum(not x["problems"] for x in xs),
                     "max_resume_s": max((x.get("resume_s", 0) for x in xs), default=None),
                     "note": ", ".join(f"{k}: {v}" for k, v in sorted(phases.items())), "trials": xs})
    for r in rows:
        append_jsonl(a.results, base_record(engine="reliability-gpu", gpus=ngpu, model=MODEL, **r))
    lines = [f"GPU reliability ({ngpu} GPU(s), {MODEL} {' '.join(BACKEND)}; {time.monotonic() - t0:.0f} s)",
             f"{'scenario':<12} {'runs':>4} {'identical':>9} {'max resume (s)':>14}  note"]
    for r in rows:
        mr = r.get("max_resume_s")
        lines.append(f"{r['scenario']:<12} {r['runs']:>4} {r['identical']:>5}/{r['runs']:<3} "
                     f"{mr if mr is not None else '-':>14}  {r['note']}")
    ok = all(r["identical"] == r["runs"] for r in rows) and all(infos.values())
    print(json.dumps({"gpu_reliability_ok": ok}))
    return ok, "\n".join(lines)
