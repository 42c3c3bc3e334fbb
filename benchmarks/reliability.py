"""Reliability figures for gpt2job on CPU (no GPU needed): kill-and-resume, and input fuzzing.

    python benchmarks/reliability.py [--kills 20] [--fuzz 300] [--seed 1] [--keep DIR]
    python benchmarks/reliability.py --gpu [--gpu-kills 10] [--results FILE]   # on a GPU machine (1 or 2 GPUs)

(a) Kills: a 3-rank CPU job under mpirun (40 prompts, --chunk-size 1, --ignore-eos, sampling with a
    seed, like tests/test_resume.py) is killed with SIGKILL at a moment drawn uniformly over a clean
    run's duration (start-up and final write included). The victim rotates: the master rank, a worker
    rank, mpirun itself. Whatever of the job survives the kill is then killed too (as a batch system
    would), and the same command is run again until it exits 0. The result must equal a clean run's
    (tokens, finish_reason, done), and the resumed run must not recompute a row that was complete:
    rows in the journal after the kill == summary["rows_resumed"], and the workers' rows add up to the
    rest. A kill that lands after the output was finished must leave it complete and equal (the rerun
    then says "already complete", exit 0).
(b) Fuzz: mutated input HDF5 files and model files (benchmarks/fuzz_inputs.py), each run through
    `gpt2job run IN OUT --model M --max-new-tokens 2 --backend numpy` in a forked copy of this process
    (gpt2job.cli.main). Counted: clear errors (exit 2, one 'gpt2job: error:' line naming the file),
    successes, tracebacks, hangs (> --hang-timeout s), other exits.

(c) --scale N: ten-million-row jobs (benchmarks/scale_run.py): the synthetic backend through mpirun on N W1-like rows,
    clean (time, peak memory of the master and of the output writer), killed at 50% and resumed (time to ready,
    identical), a full disk midway (exit 2, one line, nothing lost) and resumed.

Takes about 3 minutes for the kills and 1-2 minutes for 300 fuzz cases on 2 cores.

--gpu runs the GPU fault runs instead (benchmarks/reliability_gpu.py: out of memory with another process holding
the GPU, a CUDA error mid-chunk, kill -9 of a GPU worker and of the master of a 2-GPU job, each resumed): a table
(scenario, runs, identical, max resume time) last, one JSON line per scenario appended to --results. About 7
minutes on a 2 x H200 machine with a warm kernel cache.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before numpy: forked fuzz cases, 3 ranks on 2 cores

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import fuzz_inputs as mutations  # noqa: E402  (benchmarks/fuzz_inputs.py, beside this script)

MODEL = "random:n_layer=4,n_head=4,n_embd=256,n_positions=64,vocab_size=50257:3"
N_PROMPTS = 40
NP = 3


# ---------------------------------------------------------------- (a) kill at random moments

def job_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    return env


def job_cmd(inp, out):
    cmd = ["mpirun", "-np", str(NP), "--oversubscribe", sys.executable, "-m", "gpt2job", "run", str(inp), str(out),
           "--model", MODEL, "--max-new-tokens", "24", "--ignore-eos", "--chunk-size", "1", "--backend", "numpy",
           "--temperature", "0.8", "--seed", "9"]
    if (mutations.VOCAB_DIR / "vocab.bpe").is_file():
        cmd += ["--vocab-dir", str(mutations.VOCAB_DIR)]
    return cmd


def read_result(path):
    import h5py
    with h5py.File(path, "r") as f:
        return {"tokens": [t.tolist() for t in f["completion_tokens"][()]],
                "finish": [x.decode() if isinstance(x, bytes) else x for x in f["finish_reason"][()]],
                "done": f["done"][()].tolist(), "finished": int(f.attrs.get("finished", 0)),
                "summary": json.loads(f.attrs["summary"]) if "summary" in f.attrs else None}


def same(a, b):
    return a["tokens"] == b["tokens"] and a["finish"] == b["finish"] and a["done"] == b["done"]


def session_pids(sid, marker=None):
    """pid -> environ of every live process in session sid (the job started with start_new_session=True: mpirun
    and its ranks) or, given marker (b"NAME=value"), with it in its environment (the master's output writer and
    text processes, which run in sessions of their own)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
            ours = int(fields[3]) == sid
            if fields[0] == "Z" or not ours and marker is None:   # (others' environments read only for a marker)
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if not ours and marker not in env:
                continue
        except (OSError, ValueError, IndexError):
            continue
        out[int(pid)] = env
    return out


def rank_of(env):
    for e in env:
        if e.startswith(b"OMPI_COMM_WORLD_RANK="):
            return int(e.split(b"=")[1])
    return None


def journal_rows(out):
    from gpt2job.files.journal import read_journal
    j = str(out) + ".journal"
    if not os.path.exists(j):
        return None
    _, records, _ = read_journal(j)
    return sum(len(r.rows) for r in records)


def kill_all(sid, marker=None):
    for pid in session_pids(sid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def one_kill(i, victim, window, inp, d, clean, rng, cmd=None, n_prompts=N_PROMPTS, t_min=0.0):
    """Kill the victim at a moment drawn from U(t_min, window) of a run of cmd(inp, out) (default job_cmd), kill
    what is left, rerun until done; check against clean (info['problems']). info['resume_s']: the rerun's time."""
    cmd = cmd or job_cmd
    out = d / f"kill{i:02d}.h5"
    t_kill = rng.uniform(t_min, window)
    info = {"i": i, "victim": victim, "t_planned": round(t_kill, 2)}
    log = open(d / f"kill{i:02d}.log", "w")
    tag = f"{os.getpid()}.{i}"                       # in the environment of every process of this run
    marker = f"RELIABILITY_JOB={tag}".encode()
    p = subprocess.Popen(cmd(inp, out), env=dict(job_env(), RELIABILITY_JOB=tag), stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, cwd=str(ROOT))
    t0 = time.monotonic()
    while time.monotonic() - t0 < t_kill and p.poll() is None:
        time.sleep(0.002)
    killed = None
    while p.poll() is None and killed is None:
        if victim == "mpirun":
            killed = p.pid
        else:
            ranks = {rank_of(env): pid for pid, env in session_pids(p.pid).items() if rank_of(env) is not None}
            want = 0 if victim == "master" else rng.choice([1, 2])
            if want in ranks:
                killed = ranks[want]
            else:
                time.sleep(0.002)      # still starting: the rank does not exist yet
                continue
        try:
            os.kill(killed, signal.SIGKILL)
        except OSError:
            killed = None
    info["t_kill"] = round(time.monotonic() - t0, 2)
    if killed is None:
        info["phase"] = "finished before the kill"
    deadline = time.monotonic() + 2.0
    try:
        p.wait(timeout=2.0)         # mpirun notices a dead rank and ends the job itself
    except subprocess.TimeoutExpired:
        pass
    while session_pids(p.pid, marker) and time.monotonic() < deadline:   # (mpirun killed: its ranks end by themselves)
        time.sleep(0.05)
    survivors = [pid for pid in session_pids(p.pid, marker)]
    info["survivors"] = len(survivors)   # processes still running 2 s after the kill, the writer's too (killed now)
    kill_all(p.pid, marker)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    time.sleep(0.1)
    kill_all(p.pid, marker)
    log.close()
    kept = journal_rows(out)
    info["journal_rows"] = kept
    if killed is not None:
        status = read_status(out)
        info["phase"] = ("before the journal" if kept is None and status is None else
                         "after finishing" if status == "finished" else
                         f"mid-run ({kept} rows journaled)" if kept is not None else f"output {status}, no journal")
    # rerun until it exits 0 (or says the output is already complete)
    runs = []
    for attempt in range(4):
        t_rerun = time.monotonic()
        r = subprocess.run(cmd(inp, out), env=job_env(), capture_output=True, text=True, cwd=str(ROOT),
                           timeout=300)
        info["resume_s"] = round(time.monotonic() - t_rerun, 2)
        runs.append(r.returncode)
        said_complete = "already complete" in r.stderr
        if r.returncode == 0:
            break
        info.setdefault("rerun_errors", []).append(r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"])
    info["reruns"] = runs
    problems = []
    try:
        res = read_result(out)
    except Exception as e:
        problems.append(f"cannot read the output ({type(e).__name__}: {e})")
        res = None
    if res is not None:
        if not res["finished"]:
            problems.append("output not finished")
        if not same(res, clean):
            diff = [k for k in ("tokens", "finish", "done") if res[k] != clean[k]]
            problems.append(f"differs from the clean run in {diff}")
        if said_complete and killed is not None and status != "finished":
            problems.append("rerun said 'already complete' though the killed run had not finished")
        if runs[0] == 0:
            sm = res["summary"] or {}
            expect = kept if kept is not None else 0
            if sm.get("rows_resumed") != expect:
                problems.append(f"rows_resumed {sm.get('rows_resumed')} != rows journaled at kill {expect}")
            worked = sum(w["rows"] for w in sm.get("workers", []))
            if worked != n_prompts - sm.get("rows_resumed", 0):
                problems.append(f"workers computed {worked} rows, expected {n_prompts - sm.get('rows_resumed', 0)}"
                                " (a completed row was recomputed or one was lost)")
            info["rows_resumed"] = sm.get("rows_resumed")
    if os.path.exists(str(out) + ".journal"):
        problems.append("journal left behind after a finished run")
    info["problems"] = problems
    return info


def read_status(out):
    if not os.path.exists(out):
        return None
    try:
        import h5py
        with h5py.File(out, "r") as f:
            return "finished" if int(f.attrs.get("finished", 0)) == 1 else "unfinished"
    except Exception:
        return "damaged"


def kill_experiment(n_kills, seed, workdir):
    if shutil.which("mpirun") is None:
        print("kills: skipped (mpirun not found; pip install -e '.[test]')")
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_token_input
    d = Path(workdir) / "kills"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    inp = d / "in.h5"
    write_token_input(inp, [rng.integers(0, 50257, rng.integers(2, 12)) for _ in range(N_PROMPTS)])
    walls = []
    clean = None
    for k in range(2):
        out = d / f"clean{k}.h5"
        t = time.monotonic()
        r = subprocess.run(job_cmd(inp, out), env=job_env(), capture_output=True, text=True, cwd=str(ROOT))
        walls.append(time.monotonic() - t)
        if r.returncode != 0:
            print(f"kills: the clean run failed (exit {r.returncode}):\n{r.stderr}")
            return None
        res = read_result(out)
        if clean is not None and not same(res, clean):
            print("kills: two clean runs differ!")
        clean = res
    window = min(walls)   # the machine may be busy: the quicker clean run, so most kills land inside a run
    print(f"kills: clean 3-rank run takes {min(walls):.1f}-{max(walls):.1f} s; kill moments drawn from U(0, {window:.1f} s)")
    victims = ["master", "worker", "mpirun"]
    prng = random.Random(seed)
    infos = []
    for i in range(n_kills):
        info = one_kill(i, victims[i % 3], window, inp, d, clean, prng)
        infos.append(info)
        mark = "ok  " if not info["problems"] else "FAIL"
        print(f"  {mark} kill {i:2d}: {info['victim']:<6} at {info['t_kill']:5.2f} s, {info['phase']:<28} "
              f"reruns {info['reruns']} resumed {info.get('rows_resumed', '-')}"
              f"{', survivors ' + str(info['survivors']) if info['survivors'] else ''}"
              + ("" if not info["problems"] else "  <- " + "; ".join(info["problems"])), flush=True)
    ok = sum(1 for x in infos if not x["problems"])
    print(f"kills: {n_kills}, identical: {ok}/{n_kills}")
    by = {}
    for x in infos:
        key = x["phase"].split(" (")[0]
        by[key] = by.get(key, 0) + 1
    print("  by moment: " + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    surv = [x for x in infos if x["survivors"]]
    if surv:
        print(f"  {len(surv)} kill(s) left processes running 2 s later (killed by this script before the rerun): "
              + ", ".join(f"#{x['i']} {x['victim']} ({x['survivors']})" for x in surv))
    multi = [x for x in infos if len(x["reruns"]) > 1]
    if multi:
        print(f"  {len(multi)} needed more than one rerun: " + "; ".join(
            f"#{x['i']}: exits {x['reruns']} {x.get('rerun_errors')}" for x in multi))
    for x in infos:
        if x["problems"]:
            print(f"  FAILURE #{x['i']}: {json.dumps(x)}")
    return ok, n_kills


# ---------------------------------------------------------------- (b) fuzz

def _signature(tb):
    frames = re.findall(r'File "([^"]*gpt2job/[^"]+)", line (\d+), in (\w+)', tb)
    last = tb.strip().splitlines()[-1] if tb.strip() else "?"
    where = f"{os.path.relpath(frames[-1][0], ROOT)}:{frames[-1][1]} {frames[-1][2]}" if frames else "?"
    return where, last.split(":")[0]


def fuzz_experiment(n, seed, workdir, hang_timeout, jobs):
    d = Path(workdir) / "fuzz"
    t = time.monotonic()
    done = [0]

    def progress(res):
        done[0] += 1
        if done[0] % 50 == 0:
            print(f"  fuzz: {done[0]}/{n} cases", flush=True)

    results = mutations.run_cases(range(n), seed, d, timeout=hang_timeout, jobs=jobs, progress=progress)
    table, counts = mutations.summary_table(results)
    print(f"fuzz: {n} cases in {time.monotonic() - t:.0f} s (seed {seed}; failing cases kept in {d})")
    print(table)
    bad = [r for r in results if r.outcome in ("traceback", "hang", "crash", "other_exit", "unclear",
                                                "bad_success", "build_error")]
    groups = {}
    for r in bad:
        key = (r.outcome,) + (_signature(r.traceback) if r.outcome == "traceback" else
                              (str(r.exit_code), (r.stderr.strip().splitlines() or [""])[-1][:90]))
        groups.setdefault(key, []).append(r)
    if groups:
        print(f"\n{len(bad)} cases that are not a clear error or a success, in {len(groups)} kinds:")
    for key, rs in groups.items():
        r = rs[0]
        print(f"\n[{r.outcome}] x{len(rs)}: {key[1]}  {key[2]}")
        print(f"  first: case {r.index} ({r.mutator}: {r.description}); files {r.files}")
        if r.outcome == "traceback":
            print("  " + "\n  ".join(r.traceback.strip().splitlines()[-6:]))
        elif r.outcome != "hang":
            print("  stderr: " + "\n  ".join(r.stderr.strip().splitlines()[-3:]))
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kill-and-resume trials (0 to skip)")
    ap.add_argument("--fuzz", type=int, default=300, help="fuzz cases (0 to skip)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the kill moments and of the fuzz cases")
    ap.add_argument("--hang-timeout", type=float, default=60.0, help="seconds before a fuzz case counts as hung")
    ap.add_argument("--jobs", type=int, default=2, help="fuzz cases run at once")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder, "
                                                   "removed unless something failed)")
    ap.add_argument("--gpu", action="store_true", help="the GPU fault runs (benchmarks/reliability_gpu.py) instead")
    ap.add_argument("--gpu-kills", type=int, default=10, help="--gpu: kills of a worker, and of the master, each")
    ap.add_argument("--gpu-budget", type=float, default=450.0,
                    help="--gpu: seconds after which no further kill starts (the table reports the runs made)")
    ap.add_argument("--results", help="append one JSON line per scenario here")
    ap.add_argument("--scale", type=int, default=0, metavar="N",
                    help="the large-job figures (benchmarks/scale_run.py): N W1-like rows with the synthetic backend, "
                         "clean, killed at 50%% and resumed, full disk midway and resumed (0 to skip; 10000000 for "
                         "RESULTS.md)")
    ap.add_argument("--scale-ranks", type=int, default=3, help="--scale: mpirun ranks (1: one process)")
    ap.add_argument("--scale-dir", default="/tmp", help="--scale: where its big files go (removed afterwards)")
    ap.add_argument("--scale-chunk-size", type=int, default=0, help="--scale: --chunk-size of its jobs (0: default)")
    ap.add_argument("--scale-layout", choices=("vlen", "flat"), default="vlen", help="--scale: --layout of its jobs")
    ap.add_argument("--scale-clean-runs", type=int, default=1, help="--scale: the clean run this many times (median)")
    ap.add_argument("--scale-only-clean", action="store_true", help="--scale: the clean runs only (A/B of speed)")
    a = ap.parse_args()
    workdir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gpt2job-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = False
    t0 = time.monotonic()
    if a.gpu:
        import reliability_gpu
        ok, table = reliability_gpu.run(a, workdir)
        if not a.keep:
            if ok:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"(work folder kept for inspection: {workdir})")
        print(f"\ntotal {time.monotonic() - t0:.0f} s\n\n{table}")
        return 0 if ok else 1
    if a.kills:
        r = kill_experiment(a.kills, a.seed, workdir)
        failed |= r is None or r[0] != r[1]
        print()
    if a.fuzz:
        c = fuzz_experiment(a.fuzz, a.seed, workdir, a.hang_timeout, a.jobs)
        failed |= any(c.get(k, 0) for k in ("traceback", "hang", "crash", "bad_success"))
    if a.scale:
        import scale_run
        res = scale_run.scale_experiment(a.scale, tempfile.mkdtemp(prefix="gpt2job-scale-", dir=a.scale_dir),
                                         a.scale_ranks, mutations.VOCAB_DIR if (mutations.VOCAB_DIR / "vocab.bpe").is_file()
                                         else None, keep=bool(a.keep), chunk_size=a.scale_chunk_size,
                                         layout=a.scale_layout, clean_runs=a.scale_clean_runs,
                                         only_clean=a.scale_only_clean)
        failed |= not (res and res["ok"])
        if a.results and res:
            with open(a.results, "a") as f:
                f.write(json.dumps({"scenario": "scale", **res}) + "\n")
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if not a.keep:
        if failed:
            print(f"(work folder kept for inspection: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
