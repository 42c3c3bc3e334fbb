"""Ten-million-row jobs on the CPU (issue 15 §3): `python benchmarks/reliability.py --kills 0 --fuzz 0 --scale N`.

With the synthetic backend (tokens without a model) through the real pipeline (mpirun: a master and --scale-ranks - 1
worker ranks), on a W1-like input (N prompts of 16 random tokens, 8% repeats of earlier rows; 8 new tokens; chunks of
the default size, 8,192 prompts for this backend; --chunk-size 546, what each of 15 workers gets for W1, is
benchmarks/master_scale.py's case):
  clean   a run from scratch: its wall, time to ready, generation span, rows/s; the master's and the output writer's
          peak RSS (VmHWM from /proc, sampled every 0.2 s, and the job's own summary); output and journal sizes
  kill    the same job, SIGKILL to every process of the job once its progress passes 50%, then the same command:
          the resume's time to ready (launch to every rank ready: journal and input read, dedup, output reopened),
          rows resumed (= rows in the journal at the kill), and the output identical to the clean run's
  disk    the same job with a file-size limit (RLIMIT_FSIZE, as tests/test_disk.py) of half the clean output: one
          'gpt2job: error:' line, exit 2, the journal holds every row counted; then the same command without the
          limit finishes, identical, resuming exactly the journal's rows
Outputs are compared by a digest of every dataset (read a block of rows at a time). Big files live under --dir
(default /tmp) and are removed afterwards.
"""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from master_scale import write_input  # noqa: E402  (W1-like: 16 random tokens, 8% repeats)

BLOCK = 1 << 20


def job_cmd(inp, out, ranks, vocab_dir, extra=()):
    cmd = [sys.executable, "-m", "gpt2job", "run", str(inp), str(out), "--backend", "synthetic", "--model",
           "random:gpt2", "--max-new-tokens", "8", "--progress-interval", "1"] + list(extra)
    if vocab_dir:
        cmd += ["--vocab-dir", str(vocab_dir)]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"] + cmd
    return cmd


def session(sid):
    """pid -> (role, VmHWM kB) of the live processes of session sid: master (rank 0, or the one process), writer
    (files/writer_process.py), text (files/text_process.py), worker, other (mpirun, prted)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            if int(stat[stat.rindex(")") + 2:].split()[3]) != sid:
                continue
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            hwm = re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{pid}/status").read())
        except (OSError, ValueError, IndexError):
            continue
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")), None)
        role = ("writer" if b"gpt2job.files.writer_process" in cmd else "text" if b"gpt2job.files.text_process" in cmd else
                "other" if b"gpt2job" not in cmd or b"run" not in cmd else
                "master" if rank in (None, 0) else "worker")
        out[int(pid)] = (role, int(hwm.group(1)) if hwm else 0)
    return out


def kill_session(sid):
    for _ in range(3):
        for pid in session(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def run(cmd, n, kill_at=None, fsize=None, timeout=1800):
    """Run a job in a session of its own; watch its processes' peak memory and its progress lines; kill it all once
    its progress passes kill_at rows. -> dict."""
    def limit():
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    t0 = time.monotonic()
    from reliability import job_env   # the environment every benchmark job runs with (imports this lazily)
    p = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, cwd=str(ROOT), preexec_fn=limit)
    peak, lines, progress = {}, [], [0]

    def read_err():
        for line in p.stderr:
            lines.append(line.rstrip())
            m = re.match(r"progress: (\d+)/", line)
            if m:
                progress[0] = int(m.group(1))
    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    killed = None
    while p.poll() is None and time.monotonic() - t0 < timeout:
        for pid, (role, hwm) in session(p.pid).items():
            peak[role] = max(peak.get(role, 0), hwm)
        if kill_at is not None and progress[0] >= kill_at and killed is None:
            killed = progress[0]
            kill_session(p.pid)
        time.sleep(0.2)
    if p.poll() is None:
        kill_session(p.pid)
    out = p.communicate()[0]
    reader.join(timeout=10)
    kill_session(p.pid)       # nothing of it may outlive it (a rerun would wait for its lock)
    return {"rc": p.returncode, "wall_s": round(time.monotonic() - t0, 2), "killed_at_rows": killed,
            "peak_rss_mb": {k: round(v / 1024) for k, v in peak.items()}, "stderr": lines, "stdout": out}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(ROOT)).stdout.strip() or None
    except OSError:
        return None


def _r(x):
    return None if x is None else round(x, 2)


def summary(out):
    import h5py
    with h5py.File(out, "r") as f:
        return json.loads(f.attrs["summary"]) if "summary" in f.attrs else None


def digest(path):
    """sha256 of every per-row dataset, a block of rows at a time."""
    import h5py
    from gpt2job.files import h5flat
    h = {}
    with h5py.File(path, "r") as f:
        flat = h5flat.dataset_names(f)     # --layout flat: its rows' values, not the order they were written in
        names = [k for k in f if isinstance(f[k], h5py.Dataset) and k not in flat]
        names += [k for k in h5flat.TOKEN_COLUMNS + (h5flat.TEXT,) if k not in f and h5flat.has(f, k)]
        n = len(f["done"])
        for k in names:
            d = hashlib.sha256()
            for a in range(0, n, BLOCK):
                if k not in f:       # a flat column: its rows' lengths and values (in row order)
                    counts, vals = h5flat.values(f, k, a, a + BLOCK)
                    d.update(counts.tobytes())
                    d.update(vals.tobytes())
                    continue
                x = f[k][a:a + BLOCK]
                if x.dtype == object:
                    if len(x) and isinstance(x[0], np.ndarray):
                        d.update(np.array([len(r) for r in x], np.int64).tobytes())
                        d.update(np.concatenate(list(x)).astype("<i4").tobytes() if len(x) else b"")
                    else:
                        d.update(b"\0".join(bytes(r) if isinstance(r, bytes) else r.encode() for r in x))
                else:
                    d.update(np.ascontiguousarray(x).tobytes())
            h[k] = d.hexdigest()[:16]
    return h


def journal_rows(out):
    from gpt2job.files.journal import JournalReader
    j = JournalReader(str(out) + ".journal")
    return sum(len(c.all_rows) for comps, _ in j.blocks() for c in comps)


def to_file_rate(n, r, sm):
    """Rows a second from every rank ready to the output file complete (r: run()'s result, sm: the job's summary)."""
    return round(n / (r["wall_s"] - sm["time_to_ready_s"]))


def scale_experiment(n, workdir, ranks=3, vocab_dir=None, keep=False, chunk_size=0, layout="vlen", clean_runs=1,
                     only_clean=False):
    """clean_runs: the clean run that many times (its figures: the first run's, the rows/s of every run and their
    median); then kill and disk once (only_clean: not)."""
    d = Path(workdir) / "scale"
    d.mkdir(parents=True, exist_ok=True)
    inp = d / "in.h5"
    t = time.monotonic()
    write_input(str(inp), n)
    print(f"scale: {n:,} W1-like prompts written in {time.monotonic() - t:.1f} s ({inp.stat().st_size / 2**20:.0f} MB)",
          flush=True)
    extra = (["--chunk-size", str(chunk_size)] if chunk_size else []) + ["--layout", layout]
    res = {"rows": n, "ranks": ranks, "chunk_size": chunk_size or "default", "layout": layout, "commit": _commit(),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB",
           "load_before": round(os.getloadavg()[0], 2)}
    try:
        clean = d / "clean.h5"
        r = run(job_cmd(inp, clean, ranks, vocab_dir, extra), n)
        if r["rc"] != 0:
            print("scale: the clean run failed:\n" + "\n".join(r["stderr"][-20:]))
            return None
        sm = summary(clean)
        res["clean"] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "summary_master_peak_rss_mb":
                        sm.get("master_peak_rss_mb"), "writer": sm.get("output_writer"),
                        "time_to_ready_s": _r(sm["time_to_ready_s"]), "generation_s": round(sm["generation_s"], 2),
                        "rows_per_s": round(n / sm["generation_s"]), "master_prepare_s": sm.get("master_prepare_s"),
                        "rows_per_s_to_file_complete": to_file_rate(n, r, sm),
                        "output_mb": round(clean.stat().st_size / 2**20)}
        runs = [res["clean"]["rows_per_s_to_file_complete"]]
        for i in range(1, clean_runs):     # the same job again, from scratch
            again = d / f"clean{i}.h5"
            ri = run(job_cmd(inp, again, ranks, vocab_dir, extra), n)
            if ri["rc"] == 0:
                runs.append(to_file_rate(n, ri, summary(again)))
            again.unlink(missing_ok=True)
        if clean_runs > 1:
            res["clean"]["runs_rows_per_s_to_file_complete"] = runs
            res["clean"]["median_rows_per_s_to_file_complete"] = round(float(np.median(runs)))
        print(f"scale clean: {json.dumps(res['clean'])}", flush=True)
        if only_clean:
            res["ok"] = True
            return res
        want = digest(clean)
        # kill at 50%, then the same command
        out = d / "kill.h5"
        k = run(job_cmd(inp, out, ranks, vocab_dir, extra), n, kill_at=n // 2)
        kept = journal_rows(out) if os.path.exists(str(out) + ".journal") else 0
        r2 = run(job_cmd(inp, out, ranks, vocab_dir, extra), n)
        sm2 = summary(out) if r2["rc"] == 0 else {}
        res["kill"] = {"killed_at_rows": k["killed_at_rows"], "journal_rows": kept, "resume_rc": r2["rc"],
                       "resume_wall_s": r2["wall_s"], "resume_time_to_ready_s": _r(sm2.get("time_to_ready_s")),
                       "rows_resumed": sm2.get("rows_resumed"), "master_prepare_s": sm2.get("master_prepare_s"),
                       "resume_peak_rss_mb": r2["peak_rss_mb"], "identical": r2["rc"] == 0 and digest(out) == want}
        print(f"scale kill: {json.dumps(res['kill'])}", flush=True)
        if r2["rc"] != 0:
            print("\n".join(r2["stderr"][-15:]))
        # full disk midway, then the same command with room
        out = d / "disk.h5"
        fsize = clean.stat().st_size // 2
        f1 = run(job_cmd(inp, out, ranks, vocab_dir, extra), n, fsize=fsize)
        errors = [x for x in f1["stderr"] if x.startswith("gpt2job: error:")]
        kept = journal_rows(out) if os.path.exists(str(out) + ".journal") else 0
        r3 = run(job_cmd(inp, out, ranks, vocab_dir, extra), n)
        sm3 = summary(out) if r3["rc"] == 0 else {}
        res["disk"] = {"limit_mb": round(fsize / 2**20), "rc": f1["rc"], "error_lines": errors[:2],
                       "traceback": any("Traceback" in x for x in f1["stderr"]), "journal_rows": kept,
                       "resume_rc": r3["rc"], "rows_resumed": sm3.get("rows_resumed"),
                       "identical": r3["rc"] == 0 and digest(out) == want}
        print(f"scale disk: {json.dumps(res['disk'])}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = (res["kill"]["identical"] and res["kill"]["rows_resumed"] == res["kill"]["journal_rows"]
          and res["disk"]["rc"] == 2 and len(res["disk"]["error_lines"]) == 1 and not res["disk"]["traceback"]
          and res["disk"]["identical"] and res["disk"]["rows_resumed"] == res["disk"]["journal_rows"])
    res["ok"] = bool(ok)
    print(f"scale: {'all guarantees held' if ok else 'FAILED'}")
    return res
