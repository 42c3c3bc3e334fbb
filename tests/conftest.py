import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2job import envs

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = Path(envs.get("GPT2JOB_SHARED") or ROOT.parent / "shared")
VOCAB_DIR = Path(envs.get("GPT2_VOCAB_DIR") or SHARED / "gpt2-vocab")
TINY_HF = FIXTURES / "tiny-hf"
TINY_PUBLISHED = FIXTURES / "tiny-published"
TINY_FP16 = FIXTURES / "tiny-fp16"
# a tiny model with the real vocabulary, for text prompts
TINY_TEXT_MODEL = "random:n_layer=2,n_head=2,n_embd=32,n_positions=64,vocab_size=50257:1"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (README's test command, pytest-xdist): two processes on a machine without a GPU (CI's 2 cores: the
    suite's mpirun jobs mostly wait, ~7 instead of ~11 minutes), at most 4 on a bigger one (the fault tests' deadlines
    assume a machine not flooded with jobs); one where a GPU is visible: the GPU tests measure and fill the GPU's
    free memory, and a second process on the same GPU would change what they measure."""
    from gpt2job.backends import gpu_count
    return 1 if gpu_count() else min(4, max(2, os.cpu_count() or 1))


class Expected:
    def __init__(self, path):
        d = np.load(path, allow_pickle=False)
        self.d = d
        self.prompts = self._split(d["prompt_tokens"], d["prompt_offsets"])
        self.gen = self._split(d["gen_tokens"], d["gen_offsets"])
        self.max_new = int(d["max_new_tokens"])
        self.eos = int(d["eos_token_id"])
        self.logits = self._split(d["logits"], d["logits_offsets"])
        self.fp16_logits = self._split(d["fp16_logits"], d["logits_offsets"])
        self.greedy_ignore_eos = d["greedy_ignore_eos"]

    @staticmethod
    def _split(a, off):
        return [a[off[i]:off[i + 1]] for i in range(len(off) - 1)]


@pytest.fixture(scope="session")
def expected():
    return Expected(FIXTURES / "tiny_expected.npz")


@pytest.fixture
def vocab_dir():
    if not (VOCAB_DIR / "vocab.bpe").is_file():
        pytest.skip("GPT-2 vocabulary files not present (../shared/gpt2-vocab or GPT2_VOCAB_DIR)")
    return str(VOCAB_DIR)


def write_token_input(path, rows):
    import h5py
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=h5py.vlen_dtype(np.int32))
        for i, r in enumerate(rows):
            ds[i] = np.asarray(r, np.int32)


def read_output(path):
    """An output's rows and attributes, in either layout (--layout vlen or flat)."""
    import h5py
    from gpt2job.files.h5flat import has, rows
    with h5py.File(path, "r") as f:
        n = len(f["done"])
        out = {"tokens": [np.asarray(t) for t in rows(f, "completion_tokens", 0, n)],
               "done": f["done"][()], "finish": [x.decode() if isinstance(x, bytes) else x
                                                 for x in f["finish_reason"][()]],
               "attrs": dict(f.attrs)}
        if has(f, "completions"):
            out["text"] = [x.decode() if isinstance(x, bytes) else x for x in rows(f, "completions", 0, n)]
            out["text_exact"] = f["text_exact"][()]
    return out


def job_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# what job_env adds for the suite's own mpirun lines; fresh_env removes them (a machine's own MPI settings stay: a
# container's OMPI_MCA_plm=isolated, without which Open MPI 4 cannot start ranks there)
SUITE_MPI_VARS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "OMPI_MCA_rmaps_base_oversubscribe",
                  "PRTE_MCA_rmaps_default_mapping_policy")


def fresh_env(**extra):
    """job_env without the suite's MPI settings: what a user's shell has when they start run_inference.sh."""
    env = {k: v for k, v in job_env().items() if k not in SUITE_MPI_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def have_mpirun():
    return shutil.which("mpirun") is not None


def cuda_or_skip():
    """(pycuda.driver initialised, the number of GPUs) for a GPU test module, called at its top: the module is
    skipped where pycuda or a GPU is missing (CI's machine has neither)."""
    drv = pytest.importorskip("pycuda.driver")
    try:
        drv.init()
        n = drv.Device.count()
    except Exception:  # pragma: no cover
        n = 0
    if n == 0:
        pytest.skip("no CUDA GPU", allow_module_level=True)
    return drv, n


def require_mpirun():
    """Skip without mpirun, except under CI, which installs Open MPI ('.[test]'): there it is a broken set-up
    that would otherwise skip every MPI and fault test in silence."""
    if not have_mpirun():
        if os.environ.get("CI"):
            pytest.fail("mpirun not found on PATH under CI: the MPI tests would be skipped")
        pytest.skip("mpirun not available")


def gpt2job_cmd(args, np_=None):
    base = [sys.executable, "-m", "gpt2job"] + [str(a) for a in args]
    if np_ is None:
        return base
    return ["mpirun", "-np", str(np_), "--oversubscribe"] + base


def run_gpt2job(args, np_=None, env=None, timeout=300, check=None):
    """Run the CLI (under mpirun with np_ ranks when given); returns CompletedProcess."""
    if np_ is not None:
        require_mpirun()
    for attempt in range(2):
        p = _run_in_own_session(gpt2job_cmd(args, np_), env or job_env(), timeout)
        # Open MPI itself failed to start (seen once in ~10 suite runs, right after a killed job): nothing of
        # ours ran, so start it once more
        if not (np_ is not None and "PMIx server's listener thread failed to start" in p.stderr):
            break
        time.sleep(1)
    if check is not None and p.returncode != check:
        raise AssertionError(f"exit {p.returncode} (expected {check})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def crash_after_a_kept_chunk(args, out, env, timeout=120):
    """Run the CLI (one process) until its journal holds a chunk, then kill it (SIGKILL: a crash). Its worker hangs
    on its 3rd chunk, so the master is alive to journal the first two: a worker that exits instead can take the
    process down before the master journaled anything (seen on a busy CI machine)."""
    import signal
    from gpt2job.files.journal import read_journal
    env = dict(env, GPT2JOB_FAULT="0:3:hang")
    p = subprocess.Popen(gpt2job_cmd(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, cwd=str(ROOT))
    journal, deadline = str(out) + ".journal", time.time() + timeout
    try:
        while not (os.path.exists(journal) and any(len(r.rows) for r in read_journal(journal)[1])):
            if p.poll() is not None:
                raise AssertionError(f"the job ended (exit {p.returncode}) before it journaled a chunk:\n"
                                     f"{p.stderr.read()}")
            if time.time() > deadline:
                raise AssertionError("the job journaled no chunk in time")
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)    # the writer's process too, where it has one
        p.wait(timeout=60)
        p.stderr.close()


def _run_in_own_session(cmd, env, timeout):
    """subprocess.run in a session of its own, all of which is killed on a timeout: killing mpirun alone left a
    rank that hangs (a test's fault plan) running after its test (mpirun puts each rank in a process group of its
    own, in mpirun's session)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(p.pid)
        p.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command's name (state, ppid, pgrp, session, ...); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid):
    """Is process pid there, and neither a zombie nor dead?"""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def kill_session(sid):
    """SIGKILL every process of session sid."""
    import signal
    for pid in filter(str.isdigit, os.listdir("/proc")):
        st = proc_stat(pid)
        if st is not None and int(st[3]) == sid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def as_one_process(monkeypatch):
    """The CLI called in this process (cli.main) runs as one process: no MPI launcher's variables from a test run
    under mpirun."""
    from gpt2job.cluster.devices import MPI_ENV_VARS
    for var in MPI_ENV_VARS:
        monkeypatch.delenv(var, raising=False)

