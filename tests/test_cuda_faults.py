"""GPU faults for real (issue 15, section 2), with the CUDA backend on a GPU; skipped without one (the MPI parts also
without mpirun). Each test takes well under a minute on an H200 once the kernel cache is warm (the first test warms
it: a tiny job per GPU slot).

  * Out of memory: another process (tests/gpu_hog.py) holds all but 2.5 GB of the GPU. A GPT-2 124M fp16 job of
    W1-like prompts (16 tokens, 8 new) sizes its buffers to what is left, asks the master for smaller chunks and
    finishes with a clean run's tokens; so does a chunk forced too large for that memory (long prompts, one big
    --chunk-size). An allocation failing in the middle of a chunk (this process takes the GPU's memory while a
    backend computes) is recovered: the chunk is computed in halves, with the same tokens.
  * A CUDA error in the middle of a chunk (GPT2JOB_FAULT=1:2:cuda: a kernel reads an illegal address, and the
    context is lost): in a 2-worker job (2 GPUs, or --share-gpus on one) the worker reports it and is retired, its
    chunks go to the other worker, the output equals a clean run's and the summary says why the worker was retired.
    The same in a worker's first batch of merged chunks (GPT2JOB_FAULT=1:1:cuda, its chunks merged): every chunk
    of the batch goes to the other worker. (The 2-worker jobs otherwise run GPT2JOB_MERGE_CHUNKS=0: one 32-prompt
    chunk a batch, so that the faults land mid-job.)
  * A GPU worker killed (SIGKILL) mid-job: under `mpirun --with-ft ulfm` the job finishes without it; without ULFM
    (Open MPI 4) mpirun ends the job and the same command resumes it. Either way the output equals a clean run's.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import ROOT, cuda_or_skip, have_mpirun, job_env, read_output, run_gpt2job, write_token_input

drv, NGPU = cuda_or_skip()

MODEL = "random:gpt2"
HOG = ROOT / "tests" / "gpu_hog.py"
SEED_WORKLOAD = [ROOT / ".device" / "seed-workload" / "input.bin", ROOT.parent / "shared" / "seed-workload" / "input.bin"]
N_W1 = 16384                     # W1-like: 16-token prompts, 8 new tokens
N_MP = 768                       # the 2-worker job: prompts of 64..256 tokens, 256 new tokens, chunks of 32


def one_gpu_env(**extra):
    return job_env(CUDA_VISIBLE_DEVICES="0", **extra)


def mp_env(**extra):
    return job_env(CUDA_VISIBLE_DEVICES="0,1" if NGPU >= 2 else "0", **{"GPT2JOB_MERGE_CHUNKS": 0, **extra})


MP_SHARE = [] if NGPU >= 2 else ["--share-gpus"]


def cli_args(inp, out, *extra):
    return ["run", inp, out, "--model", MODEL, "--backend", "cuda", "--dtype", "float16", *extra]


def tokens_of(path):
    return [t.tolist() for t in read_output(path)["tokens"]]


def summary_of(path):
    return json.loads(read_output(path)["attrs"]["summary"])


def differences(got, want):
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    return f"{len(bad)} of {len(want)} rows differ; first: " + "; ".join(
        f"row {i}: {got[i]} != {want[i]}" for i in bad[:3])


@contextlib.contextmanager
def hog(leave_mib=2560):
    """Another process holding all but leave_mib MiB of GPU 0."""
    p = subprocess.Popen([sys.executable, str(HOG), "--leave-mib", str(leave_mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_gpu_env())
    line = p.stdout.readline()
    if not line.startswith("hog ready"):
        p.kill()
        raise AssertionError(f"the memory hog did not start: {line!r} {p.stderr.read()}")
    print(line.strip())
    try:
        yield line.strip()
    finally:
        p.stdin.close()
        p.wait(timeout=120)


@pytest.fixture(scope="module", autouse=True)
def warm_kernel_cache(tmp_path_factory):
    """Compile the kernels into the cache of every GPU slot the tests use (a tiny job per slot), so that the tests'
    times are the jobs' own."""
    d = tmp_path_factory.mktemp("warm")
    inp = d / "in.h5"
    write_token_input(inp, [[1, 2, 3, 4]] * 4)
    model = "random:n_layer=1,n_head=2,n_embd=64,vocab_size=50257"
    t = time.monotonic()
    args = ["run", inp, d / "o1.h5", "--model", model, "--backend", "cuda", "--dtype", "float16",
            "--max-new-tokens", 2]
    p = run_gpt2job(args, env=one_gpu_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    if have_mpirun():
        args[2] = d / "o2.h5"
        p = run_gpt2job(args + ["--chunk-size", 1] + MP_SHARE, np_=3, env=mp_env(), timeout=600)
        assert p.returncode == 0, p.stderr
    print(f"kernel caches warm in {time.monotonic() - t:.0f} s")


# ---------------------------------------------------------------- out of memory

@pytest.fixture(scope="module")
def w1(tmp_path_factory):
    """16,384 W1-like prompts (the seed workload's 8,192 where present, then seeded random 16-token prompts) and a
    clean run's tokens (8 new, greedy, 124M fp16)."""
    d = tmp_path_factory.mktemp("w1")
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50257, (N_W1, 16)).astype(np.int32)
    seed = next((p for p in SEED_WORKLOAD if p.is_file()), None)
    if seed is not None:
        toks[:8192] = np.fromfile(seed, dtype="<i4").reshape(-1, 16)[:8192]
    inp = d / "w1.h5"
    import h5py
    with h5py.File(inp, "w") as f:
        f.create_dataset("prompt_tokens", data=toks)
    clean = d / "clean.h5"
    p = run_gpt2job(cli_args(inp, clean, "--max-new-tokens", 8), env=one_gpu_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    return inp, tokens_of(clean), p.stderr


def warning_of(stderr):
    """The worker's memory warnings (buffers reduced, out of memory in a chunk), shortened."""
    lines = [x.split("warning: ", 1)[1] for x in stderr.splitlines() if "gpt2job: warning:" in x and "GPU" in x]
    return " | ".join(x[:200] for x in lines) or "no memory warning"


def chunk_size_line(stderr):
    m = re.search(r"ready: chunks of ([\d,]+) prompt", stderr)
    return int(m.group(1).replace(",", "")) if m else None


def test_out_of_memory_at_start_up_sizes_the_buffers_to_the_memory_left(tmp_path, w1):
    """The issue's case: with all but 2.5 GB of the H200 held by another process, buffers sized for 8,192-row chunks
    did not fit (cuMemAlloc failed at start-up, exit 3). Now the worker reduces them, asks for smaller chunks and
    the job finishes with the clean run's tokens."""
    inp, clean, clean_err = w1
    out = tmp_path / "oom.h5"
    with hog(2560):
        p = run_gpt2job(cli_args(inp, out, "--max-new-tokens", 8), env=one_gpu_env(), timeout=300)
    print(p.stderr[-3000:])
    asked, clean_size = chunk_size_line(p.stderr), chunk_size_line(clean_err)
    print(f"2.5 GB left: exit {p.returncode}; {warning_of(p.stderr)}; chunks of {asked} prompts (clean run: "
          f"{clean_size})")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "buffers reduced" in p.stderr
    assert asked is not None and clean_size is not None and asked < clean_size, (asked, clean_size)
    got = tokens_of(out)
    assert got == clean, differences(got, clean)


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(1)
    inp = d / "long.h5"
    write_token_input(inp, [rng.integers(0, 50257, int(n)) for n in rng.integers(384, 513, 1024)])
    return inp


def test_a_chunk_too_large_for_the_memory_left_finishes_identically(tmp_path, long_prompts):
    """1,024 prompts of 384..512 tokens in one chunk (--chunk-size 1024): about 20 GB of KV cache at once on a GPU
    with room; with 2.5 GB left it runs in many KV groups of a reduced budget, with the same tokens."""
    args = ("--max-new-tokens", 8, "--chunk-size", 1024)
    clean = tmp_path / "clean.h5"
    p = run_gpt2job(cli_args(long_prompts, clean, *args), env=one_gpu_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "oom.h5"
    with hog(2560):
        p = run_gpt2job(cli_args(long_prompts, out, *args), env=one_gpu_env(), timeout=300)
    print(p.stderr[-3000:])
    print(f"2.5 GB left, one chunk of 1,024 long prompts: exit {p.returncode}; {warning_of(p.stderr)}")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "buffers reduced" in p.stderr
    got, want = tokens_of(out), tokens_of(clean)
    assert got == want, differences(got, want)


def test_an_allocation_failing_mid_chunk_is_recovered_in_halves():
    """A real cuMemAlloc failure inside a chunk: the backend (ranks sharing a GPU: the KV cache is allocated by the
    chunk, 7.9 GB for 1,024 prompts of 200 tokens) computes the chunk once with room, then again after this process
    took all but 300 MB of the GPU. The second run frees, shrinks and computes in halves (Runner._in_halves): the
    same tokens."""
    from gpt2job.backends.base import compute
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.chunks import Chunk
    from gpt2job.model.weights import load_params
    from gpt2job.settings import GenerationSettings
    params = load_params(MODEL)
    rng = np.random.default_rng(2)
    B, L = 1024, 200
    chunk = Chunk(0, np.arange(B, dtype=np.int64), np.arange(B + 1, dtype=np.int64) * L,
                  rng.integers(0, 50257, B * L).astype(np.int32))
    be = CudaBackend(params, GenerationSettings(max_new_tokens=8), dtype="float16", share_gpus=True)
    held = []
    try:
        ref = compute(be, chunk)
        assert be.runner.oom_events == 0
        be.device.release()                      # the pool's buffers back to the GPU, then all but 300 MB taken
        for piece in (1 << 30, 1 << 26, 1 << 22):
            while drv.mem_get_info()[0] - (300 << 20) >= piece:
                held.append(drv.mem_alloc(piece))
        print(f"{drv.mem_get_info()[0] >> 20} MiB left")
        got = compute(be, chunk)
        events, sizes = be.runner.oom_events, be.runner.sizes()
    finally:
        for b in held:
            b.free()
        be.close()
    print(f"{events} allocation failures recovered; now {sizes}")
    assert events >= 1
    for f in ("rows", "offsets", "finish"):
        np.testing.assert_array_equal(getattr(got, f), getattr(ref, f))
    g = [got.row_tokens(i).tolist() for i in range(B)]
    w = [ref.row_tokens(i).tolist() for i in range(B)]
    assert g == w, differences(g, w)


# ---------------------------------------------------------------- a CUDA error, a killed worker (2 workers)

@pytest.fixture(scope="module")
def mp_job(tmp_path_factory):
    """The 2-worker job (long enough to kill mid-way: a few seconds of decode) and a clean run's tokens."""
    if not have_mpirun():
        pytest.skip("mpirun not available")
    d = tmp_path_factory.mktemp("mp")
    rng = np.random.default_rng(3)
    inp = d / "mp.h5"
    write_token_input(inp, [rng.integers(0, 50257, int(n)) for n in rng.integers(64, 257, N_MP)])
    extra = ["--max-new-tokens", 256, "--ignore-eos", "--chunk-size", 32, *MP_SHARE]
    clean = d / "clean.h5"
    t = time.monotonic()
    p = run_gpt2job(cli_args(inp, clean, *extra), np_=3, env=mp_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    print(f"clean 2-worker run: {time.monotonic() - t:.1f} s")
    return inp, tokens_of(clean), extra


@pytest.mark.parametrize("fault, merge", [("1:2:cuda", 0), ("1:1:cuda", 1)])
def test_a_cuda_error_mid_chunk_retires_the_worker_and_the_job_finishes(tmp_path, mp_job, fault, merge):
    inp, clean, extra = mp_job
    out = tmp_path / "fault.h5"
    p = run_gpt2job(cli_args(inp, out, *extra), np_=3, env=mp_env(GPT2JOB_FAULT=fault, GPT2JOB_MERGE_CHUNKS=merge),
                    timeout=300)
    print(p.stderr[-3000:])
    assert p.returncode == 0, p.stderr
    assert "worker rank 1 on" in p.stderr and "failed during chunk" in p.stderr
    got = tokens_of(out)
    assert got == clean, differences(got, clean)
    workers = {w["rank"]: w for w in summary_of(out)["workers"]}
    why = workers[1]["retired"] or ""
    print(f"rank 1 retired: {why}")
    assert "error during chunk" in why
    assert any(s in why.lower() for s in ("illegal memory access", "launch failure", "launch failed")), why
    assert workers[2]["retired"] is None
    assert workers[1]["rows"] + workers[2]["rows"] == N_MP


def ulfm_available():
    p = subprocess.run(["mpirun", "--with-ft", "ulfm", "-np", "1", "true"], env=job_env(), capture_output=True,
                       timeout=60)
    return p.returncode == 0


def rank_pids(tag):
    """pid -> MPI rank of this job's processes (started with TESTS_PROCESS_TAG=tag)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"TESTS_PROCESS_TAG={tag}".encode() in env:
            for e in env:
                if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                    out[int(pid)] = int(e.split(b"=")[1])
    return out


def journal_rows(out):
    from gpt2job.files.journal import read_journal
    path = str(out) + ".journal"
    if not os.path.exists(path):
        return 0
    return sum(len(r.rows) for r in read_journal(path)[1])


def test_a_killed_gpu_worker_loses_nothing(tmp_path, mp_job):
    inp, clean, extra = mp_job
    out = tmp_path / "kill.h5"
    ulfm = ulfm_available()
    base = [sys.executable, "-m", "gpt2job"] + [str(a) for a in cli_args(inp, out, *extra)]
    cmd = ["mpirun", *(["--with-ft", "ulfm"] if ulfm else []), "-np", "3", "--oversubscribe", *base]
    if ulfm:
        cmd += ["--chunk-timeout", "5"]        # the dead worker's chunks go to the other one after this
    tag = uuid.uuid4().hex
    p = subprocess.Popen(cmd, env=mp_env(TESTS_PROCESS_TAG=tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, cwd=str(ROOT))
    deadline = time.monotonic() + 120
    while journal_rows(out) < 64 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = next((pid for pid, r in rank_pids(tag).items() if r == 1), None)
    assert victim is not None and p.poll() is None, "the job ended (or never started) before the kill"
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    try:
        _, err = p.communicate(timeout=180 if ulfm else 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    for pid in rank_pids(tag):                 # nothing of the killed job may keep writing
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    print(f"ULFM: {ulfm}; mpirun exit {p.returncode} {time.monotonic() - t_kill:.1f} s after the kill\n{err[-2000:]}")
    if ulfm:
        res = read_output(out)
        assert res["attrs"]["finished"] == 1 and "has not answered in time" in err
    else:
        kept = journal_rows(out)
        assert 0 < kept < N_MP, kept
        t = time.monotonic()
        r = run_gpt2job(cli_args(inp, out, *extra), np_=3, env=mp_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        sm = summary_of(out)
        print(f"resumed in {time.monotonic() - t:.1f} s: {kept} rows kept, {sm['rows_resumed']} resumed")
        assert sm["rows_resumed"] == kept
        assert sum(w["rows"] for w in sm["workers"]) == N_MP - kept
    got = tokens_of(out)
    assert got == clean, differences(got, clean)
