"""The rough edges a new user hit (issue 13): a failed start leaves nothing behind, float16 without a GPU is
refused, greedy runs say the sampling flags do nothing, usage hints and --version, run_inference.sh shows only
our line and handles Ctrl-C, model errors name the real problem, and the prompts command is as strict as run."""
import json
import os
import select
import signal
import re
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, TINY_HF, fresh_env, job_env, read_output, require_mpirun, run_gpt2job, write_token_input
from test_inputs import assert_one_clear_line

TINY = ["--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "3"]


def leftovers(out):
    return [p for p in (str(out), f"{out}.journal", f"{out}.lock") if os.path.exists(p)]


def nan_model(tmp_path):
    """A folder whose headers are right (the master accepts it) but whose weights fail to load (on the workers)."""
    from gpt2job.model import safetensors_io
    d = tmp_path / "nan-model"
    d.mkdir()
    (d / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    t = safetensors_io.load(TINY_HF / "model.safetensors")
    t["transformer.wpe.weight"] = t["transformer.wpe.weight"].copy()
    t["transformer.wpe.weight"][0, 0] = np.nan
    safetensors_io.save(d / "model.safetensors", t)
    return d


# ---------------------------------------------------------------- 1: a failed start blocks nothing

@pytest.mark.parametrize("np_", [None, 3])
def test_a_failed_start_leaves_no_file_and_the_corrected_rerun_runs(tmp_path, np_):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    # refused by the master before anything is written
    p = run_gpt2job(["run", inp, out, "--model", empty, "--max-new-tokens", "3"], np_=np_, timeout=120)
    assert_one_clear_line(p, str(empty), "--model", "no model.safetensors")
    assert leftovers(out) == []
    # the workers fail to load it after the master made OUT, OUT.journal and OUT.lock: all three go
    p = run_gpt2job(["run", inp, out, "--model", nan_model(tmp_path), "--max-new-tokens", "3"], np_=np_, timeout=120)
    assert_one_clear_line(p, "NaN")
    assert leftovers(out) == []
    run_gpt2job(["run", inp, out, *TINY], np_=np_, timeout=120, check=0)
    assert read_output(out)["done"].all()


def test_an_output_without_completed_rows_never_blocks_other_settings(tmp_path):
    from gpt2job.chunks import FINISH_LENGTH, Completions
    from gpt2job.files.output import OutputStore
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    # an unfinished output of other settings with no row (a killed start): the run starts afresh
    OutputStore(str(out), 2, {"gpt2job_format": 1, "settings": "other"}, np.array([3, 2])).close()
    p = run_gpt2job(["run", inp, out, *TINY], check=0)
    assert "held no completed rows" in p.stderr
    assert read_output(out)["done"].all()
    # one completed row is work to keep: other settings are refused
    out2 = tmp_path / "out2.h5"
    st = OutputStore(str(out2), 2, {"gpt2job_format": 1, "settings": "other"}, np.array([3, 2]))
    st.submit([Completions.from_lists(0, np.array([0]), [[7, 8, 9]], [FINISH_LENGTH])])
    st.collect(block=True)
    st.close(discard_if_empty=True)   # not empty: kept, resumable
    assert leftovers(out2)[:2] == [str(out2), f"{out2}.journal"]
    assert_one_clear_line(run_gpt2job(["run", inp, out2, *TINY]), "different model, input or settings")


def test_a_finished_output_of_invalid_rows_only_never_blocks_other_settings(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[5] * 126])            # tiny-hf has 128 positions: too long for 4 new tokens
    base = ["run", inp, out, "--model", TINY_HF, "--backend", "numpy"]
    run_gpt2job(base + ["--max-new-tokens", "4", "--skip-invalid"], check=0)
    assert read_output(out)["finish"] == ["invalid"]
    p = run_gpt2job(base + ["--max-new-tokens", "2"], check=0)   # now it fits
    assert read_output(out)["finish"] == ["length"]
    assert "held no completed rows" in p.stderr


# ---------------------------------------------------------------- 4: float16 needs the cuda backend

@pytest.mark.parametrize("np_", [None, 3])
def test_float16_where_numpy_would_run_is_refused(tmp_path, np_):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]])
    p = run_gpt2job(["run", inp, out, "--model", TINY_HF, "--dtype", "float16"], np_=np_, timeout=120,
                    env=job_env(CUDA_VISIBLE_DEVICES=""))       # no GPU visible: auto picks numpy
    assert_one_clear_line(p, "--dtype", "float16 runs only on the cuda backend", "--backend auto found no GPU",
                          "--dtype float32")
    assert leftovers(out) == []


def test_numpy_backend_construction_refuses_float16():
    from gpt2job.backends import make_backend
    from gpt2job.errors import UserError
    from gpt2job.model.weights import load_params
    from gpt2job.settings import GenerationSettings
    params = load_params(str(TINY_HF))
    with pytest.raises(UserError, match="float16 runs only on the cuda backend"):
        make_backend("numpy", params, GenerationSettings(), dtype="float16")
    assert make_backend("numpy", params, GenerationSettings(), dtype="float32").name == "numpy"


# ---------------------------------------------------------------- 5: sampling flags at temperature 0

@pytest.mark.parametrize("np_", [None, 3])
def test_greedy_warns_once_about_sampling_flags(tmp_path, np_):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    p = run_gpt2job(["run", inp, tmp_path / "a.h5", *TINY, "--top-p", "0.5", "--top-k", "3", "--seed", "9"],
                    np_=np_, timeout=120, check=0)
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, p.stderr
    assert all(f in warnings[0] for f in ("--top-k 3", "--top-p 0.5", "--seed 9", "--temperature"))
    p = run_gpt2job(["run", inp, tmp_path / "b.h5", *TINY, "--temperature", "0.7", "--top-k", "3"], check=0)
    assert "warning" not in p.stderr
    p = run_gpt2job(["run", inp, tmp_path / "c.h5", *TINY], check=0)
    assert "warning" not in p.stderr


# ---------------------------------------------------------------- 7: usage hints, --version

def test_usage_hints_name_the_right_command_and_version_prints():
    from gpt2job import __version__
    p = run_gpt2job(["bogus"])
    assert_one_clear_line(p, "(see `python -m gpt2job -h`)")
    assert "gpt2job gpt2job" not in p.stderr
    assert_one_clear_line(run_gpt2job(["run"]), "(see `python -m gpt2job run -h`)")
    assert_one_clear_line(run_gpt2job(["prompts", "a.txt", "b.h5", "--bogus"]), "python -m gpt2job prompts -h")
    p = run_gpt2job(["--version"], check=0)
    assert p.stdout.strip() == f"gpt2job {__version__}"


# ---------------------------------------------------------------- 8: run_inference.sh

def assert_every_rank_ended(out):
    """No process of the job on OUT is left (waited for up to 10 s: ranks end after the launcher's line)."""
    ours = ["pgrep", "-f", str(out)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and subprocess.run(ours, capture_output=True).returncode == 0:
        time.sleep(0.2)
    assert subprocess.run(ours, capture_output=True, text=True).stdout == ""


def launcher(args, **kw):
    return subprocess.Popen([str(ROOT / "run_inference.sh"), *[str(a) for a in args]], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_run_inference_help_says_how_it_launches_and_version_works():
    """--help printed `gpt2job run`'s flags only (nothing on NP, HOSTFILE or PYTHON); --version said "required:
    input, output", exit 2."""
    p = launcher(["--help"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith("gpt2job launcher: ./run_inference.sh IN OUT.h5"), out + err
    assert "NP=N" in out and "HOSTFILE" in out and "PYTHON" in out and "usage: gpt2job run" in out, out
    p = launcher(["--version"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith("gpt2job "), out + err


def test_run_inference_shows_only_our_error_line(tmp_path):
    require_mpirun()
    env = fresh_env(NP=3)
    p = launcher([tmp_path / "missing.h5", tmp_path / "out.h5", *TINY], env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert err.splitlines() == [f"gpt2job: error: {tmp_path / 'missing.h5'}: input: no such file (fix: check the path)"]


DASHES = "-" * 74


@pytest.mark.parametrize("banner, line", [
    ([DASHES, "prterun noticed that process rank 2 with PID 25769 on node vm exited on", "signal 9 (Killed).", DASHES],
     "run_inference.sh: mpirun: process rank 2 with PID 25769 on node vm exited on signal 9 (Killed)"),   # Open MPI 5
    ([DASHES, "mpirun noticed that process rank 1 with PID 0 on node gpu-3 exited on signal 9 (Killed).", DASHES],
     "run_inference.sh: mpirun: process rank 1 with PID 0 on node gpu-3 exited on signal 9 (Killed)"),    # 4.1
    ([DASHES, "prterun detected that one or more processes exited with non-zero status,", DASHES], None),
    ([DASHES, "Some other message of mpirun's", DASHES], [DASHES, "Some other message of mpirun's", DASHES]),
    # the master ended hung ranks with MPI_Abort (its own line said so): Open MPI 5's two blocks, then an empty line
    ([DASHES, "MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD", "  Errorcode: 0", "",
      "NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.", DASHES, DASHES,
      "prterun has exited due to process rank 0 with PID 0 on node vm calling",
      '"abort". This may have caused other processes in the application to be', DASHES, ""], None),
])
def test_run_inference_says_mpirun_s_banner_of_a_killed_rank_in_one_line(banner, line):
    """A rank killed (kill -9, the OOM killer) is said by mpirun's banner alone: it was shown whole; now one line. The
    banners after a non-zero exit or the master's MPI_Abort only repeat our own line (dropped); other blocks pass as
    they are."""
    script = f'source <(sed -n "/^without_banner()/,/^}}/p" {ROOT / "run_inference.sh"}); without_banner'
    p = subprocess.run(["bash", "-c", script], input="\n".join(banner + ["after"]) + "\n", capture_output=True,
                       text=True, timeout=30)
    want = [] if line is None else [line] if isinstance(line, str) else line
    assert p.stdout.splitlines() == want + ["after"], p.stdout + p.stderr


@pytest.mark.parametrize("np_", ["abc", "0", "-3"])
def test_run_inference_refuses_a_bad_np_in_one_line(tmp_path, np_):
    env = fresh_env(NP=np_)
    p = launcher([tmp_path / "in.h5", tmp_path / "out.h5", *TINY], env=env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.splitlines() == [
        f"run_inference.sh: error: NP={np_}: must be a number of ranks >= 1 (fix: e.g. NP=3 for the master and 2 "
        "workers, or leave NP unset: one worker per GPU)"], err


def test_run_inference_refuses_a_missing_python_in_one_line(tmp_path):
    """PYTHON naming no interpreter: one line and exit 2 (it was bash's own three lines and 127)."""
    p = launcher([tmp_path / "in.h5", tmp_path / "out.h5", *TINY], env=fresh_env(PYTHON=str(tmp_path / "none")))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.splitlines() == [
        f"run_inference.sh: error: PYTHON={tmp_path / 'none'}: no such interpreter (fix: give a python3 on every "
        "node's PATH or a full path, e.g. PYTHON=$(command -v python3), or leave PYTHON unset for python3)"], err


def test_run_inference_counts_a_hostfile_s_slots_and_refuses_a_missing_hostfile(tmp_path):
    """`slots=4 max_slots=8` on two nodes is 8 ranks (max_slots was read: 16); a HOSTFILE that is not there is one
    line (it ran locally)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text('#!/bin/sh\necho "mpirun $*"\n')
    (fake / "getent").write_text('#!/bin/sh\nexit 0\n')   # (these made-up node names resolve)
    for tool in ("mpirun", "getent"):
        (fake / tool).chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode01 slots=4 max_slots=8\nnode02   slots=4\tmax_slots=8\n")
    env = {k: v for k, v in fresh_env().items() if k != "NP"}
    env["PATH"] = f"{fake}:{env['PATH']}"
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith(f"mpirun -np 8 --hostfile {hosts} "), out + err
    hosts.write_text("node01 slots=4\nnode02\n")   # counted as 4 ranks (at least 2) before: node02 left idle
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.splitlines() == [
        f"run_inference.sh: error: {hosts}: host node02 has no count of ranks, so they cannot be counted (fix: set NP, "
        "or write 'node02 slots=N' (Open MPI; N its GPUs, plus 1 on the master's node))"], err
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts), "NP": "6"})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith(f"mpirun -np 6 --hostfile {hosts} "), out + err
    hosts.write_text("node01:4\nnode02:3\n")   # MPICH's form: counted too (refused by the first form of the check)
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith(f"mpirun -np 7 --hostfile {hosts} "), out + err
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(tmp_path / "none")})
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.startswith(f"run_inference.sh: error: HOSTFILE={tmp_path / 'none'}: no such"), err


def test_run_inference_refuses_a_hostfile_host_whose_name_does_not_resolve(tmp_path):
    """ssh (mpirun's launcher) fails on it after mpirun's 14-line banner, exit 255: now one line, exit 2. A host ssh's
    own config reaches otherwise (an alias to a name that resolves, a ProxyJump) is left to ssh."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text('#!/bin/sh\necho "mpirun $*"\n')
    (fake / "getent").write_text('#!/bin/sh\n[ "$2" = node01 ] || [ "$2" = real01 ]\n')   # only these resolve
    (fake / "ssh").write_text('#!/bin/sh\n[ "$2" = alias01 ] && echo "hostname real01" && exit 0\n'
                              'echo "hostname $2"; [ "$2" = jump01 ] && echo "proxyjump bastion"; exit 0\n')
    for tool in ("mpirun", "getent", "ssh"):
        (fake / tool).chmod(0o755)
    env = {k: v for k, v in fresh_env().items() if k != "NP"}
    env["PATH"] = f"{fake}:{env['PATH']}"
    hosts = tmp_path / "hosts"
    hosts.write_text("node01 slots=2\nnode2 slots=2\n")
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.splitlines() == [
        f"run_inference.sh: error: {hosts}: host node2: no such host (its name does not resolve) (fix: correct the "
        f"host names in {hosts}, or give HOSTFILE=FILE)"], err
    hosts.write_text("node01 slots=2\nalias01 slots=2\njump01 slots=2\n")
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith(f"mpirun -np 6 --hostfile {hosts} "), out + err
    # addresses need no name: getent's reverse lookup of an IP fails where no name is recorded (the check refused
    # them); an IPv6 address keeps its colons (MPICH's HOST:N has one) and its slots are counted
    hosts.write_text("192.0.2.2 slots=2\n192.0.2.3:3\nfd00::2 slots=4\n")
    p = launcher(["in.h5", "out.h5"], env={**env, "HOSTFILE": str(hosts)})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.startswith(f"mpirun -np 9 --hostfile {hosts} "), out + err


def test_run_inference_starts_local_ranks_without_ssh_on_open_mpi_4(tmp_path):
    """Open MPI 4.1's mpirun stopped a one-machine job where no ssh or rsh is installed ("plm_rsh_agent: ssh : rsh
    ... could not be found", exit 243; seen on a container): the launcher picks its isolated launcher there, and
    leaves the choice to mpirun where ssh exists, the user chose, or a batch system runs the job."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for d in ("/usr/bin", "/bin", os.path.dirname(sys.executable)):   # the tools the script uses, no ssh or rsh
        for f in (os.listdir(d) if os.path.isdir(d) else []):
            if f not in ("ssh", "rsh", "mpirun") and not (fake / f).exists():
                (fake / f).symlink_to(os.path.join(d, f))
    (fake / "mpirun").write_text('#!/bin/sh\necho "plm=$OMPI_MCA_plm"\necho "$*" >&2\n')
    (fake / "mpirun").chmod(0o755)
    base = {k: v for k, v in fresh_env(HOSTFILE=ROOT / "hostfile", NP=3).items()
            if k not in ("OMPI_MCA_plm", "OMPI_MCA_plm_rsh_agent", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")}

    def plm(**extra):
        p = launcher(["in.h5", "out.h5"], env={**base, "PATH": str(fake), **extra})
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
        # unbound: Open MPI 4 binds each of 2 ranks to one core, where a cold node's 8 kernel compiles then ran
        assert err.startswith("-np 3 --oversubscribe --bind-to none "), err
        return out.strip()
    assert plm() == "plm=isolated"
    assert plm(OMPI_MCA_plm="rsh") == "plm=rsh"
    assert plm(SLURM_JOB_ID="7") == "plm="
    (fake / "ssh").symlink_to("/bin/true")
    assert plm() == "plm="


def test_run_inference_ctrl_c_says_so_and_exits_130(tmp_path):
    require_mpirun()
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    env = fresh_env(NP=2, GPT2JOB_FAULT="1:1:hang")   # the worker hangs on its chunk
    # its own group, as a terminal's job, with SIGINT as a terminal gives it (not ignored, whatever pytest inherited)
    p = launcher([inp, out, *TINY], env=env, start_new_session=True,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not os.path.exists(f"{out}.journal"):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)   # what Ctrl-C does: SIGINT to the foreground group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    # the worker hung on the job's one chunk: no row was completed (the line said the completed rows were kept)
    assert err.splitlines()[-1] == "run_inference.sh: interrupted before any row was completed: run the same " \
        "command again", err
    assert "prterun" not in err and "mpirun" not in err, err



def test_run_inference_ctrl_c_of_an_overwrite_run_names_what_it_set_aside(tmp_path):
    """--overwrite of a finished output, Ctrl-C once a chunk of the new run is journaled: the lines name OUT.replaced
    and say to resume without --overwrite; flags before IN and OUT are fine (the launcher finds OUT as gpt2job does)."""
    from gpt2job.files.journal import journal_has_records
    require_mpirun()
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5], [6, 7]])
    env = fresh_env(NP=2)
    one = ["--chunk-size", "1"]
    _, err = launcher([inp, out, *TINY, *one], env=env).communicate(timeout=120)
    assert read_output(out)["done"].all(), err
    p = launcher([*one, "--overwrite", inp, out, *TINY], env={**env, "GPT2JOB_FAULT": "1:2:hang"},
                 start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not journal_has_records(str(out)):
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines()[-2:] == [f"run_inference.sh: the output this run replaces stays in {out}.replaced",
                                     "run_inference.sh: interrupted; completed rows are kept: run the same command "
                                     "without --overwrite to resume"], err
    assert os.path.exists(f"{out}.replaced")


@pytest.mark.parametrize("to", ["script", "group"])
def test_run_inference_sigterm_ends_every_rank_and_the_rerun_resumes(tmp_path, to):
    """`timeout` or `kill` signals the script alone: mpirun gets it and ends the ranks (they went on without the
    script before: a hanging worker forever). A batch system may signal the group: mpirun gets it twice."""
    from gpt2job.files.outpaths import holds_rows
    require_mpirun()
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5], [6, 7]])
    env = fresh_env(NP=2)
    over = ["--overwrite"] if to == "group" else []   # then both lines say to resume without it
    one = ["--chunk-size", "1"]   # the worker computes its first chunk, then hangs on its second
    p = launcher([inp, out, *TINY, *one, *over], env={**env, "GPT2JOB_FAULT": "1:2:hang"}, start_new_session=True)
    try:
        seen, deadline = "", time.monotonic() + 90
        while "worker ready" not in seen and time.monotonic() < deadline:
            if select.select([p.stderr], [], [], 0.5)[0]:
                got = os.read(p.stderr.fileno(), 1 << 16).decode()
                if not got:   # the launcher ended (mpirun could not start: its message is in seen)
                    break
                seen += got
        assert "worker ready" in seen, seen   # each line passed on as it comes (mawk held them all to the end)
        while not holds_rows(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM) if to == "script" else os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        err = seen + err
        assert p.returncode == 143, err
        again = "run the same command " + ("without --overwrite" if over else "again") + " to resume"
        assert err.splitlines()[-1] == f"run_inference.sh: terminated (SIGTERM); completed rows are kept: {again}", err
        assert "prterun" not in err and "mpirun" not in err, err   # nothing of mpirun's
        assert all(x.endswith(again) for x in err.splitlines() if "terminated (SIGTERM)" in x), err
        assert_every_rank_ended(out)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(out)])
    q = launcher([inp, out, *TINY, *one], env=env)
    _, err = q.communicate(timeout=120)
    assert q.returncode == 0, err
    assert read_output(out)["done"].all() and json.loads(read_output(out)["attrs"]["summary"])["rows_resumed"] >= 1

# ---------------------------------------------------------------- 9: model errors name the real problem

@pytest.mark.parametrize("kind", ["x.pkl", "pytorch_model.bin", "folder of pytorch_model.bin"])
def test_pickle_models_are_refused_as_pickles(tmp_path, kind):
    import pickle
    import zipfile
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    if kind == "x.pkl":
        model = tmp_path / "x.pkl"
        model.write_bytes(pickle.dumps({"wte": [1.0] * 100}, protocol=4))
    else:
        folder = tmp_path / "m" if kind.startswith("folder") else tmp_path
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as z:   # torch.save's format since 1.6
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        model = folder if kind.startswith("folder") else folder / "pytorch_model.bin"
        if kind.startswith("folder"):
            (folder / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    p = run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", model])
    line = assert_one_clear_line(p, str(model), "--model", "pickle refused",
                                 "model.save_pretrained(dir, safe_serialization=True)")
    assert "truncated" not in line and "flat parameter file" not in line


def test_a_folder_without_weights_is_one_line_naming_the_folder(tmp_path):
    inp, folder = tmp_path / "in.h5", tmp_path / "model"
    write_token_input(inp, [[1, 2]])
    folder.mkdir()
    (folder / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    p = run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", folder])
    line = assert_one_clear_line(p, f"{folder}: --model: no model.safetensors")
    assert "model.safetensors: no model.safetensors" not in line
    assert sum("no model.safetensors" in x for x in p.stderr.splitlines()) == 1, p.stderr


@pytest.mark.parametrize("spec,frags", [
    ("random:n_layers=2", ["unknown config field 'n_layers'", "known: n_layer, n_head", "write n_layer=2"]),
    ("random:n_layer=two", ["n_layer='two' is not an integer"]),
    ("random:gpt7", ["unknown model 'gpt7'", "random:gpt2-medium"]),
])
def test_random_model_spec_errors_name_the_field(tmp_path, spec, frags):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    assert_one_clear_line(run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", spec]), spec, *frags)


# ---------------------------------------------------------------- 10: prompts as strict as run, clear lines

def test_prompts_into_a_missing_folder_is_one_clear_line(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("hello\n")
    p = run_gpt2job(["prompts", src, "/missing/dir/x.h5"])
    line = assert_one_clear_line(p, "/missing/dir/x.h5", "folder does not exist", "create /missing/dir")
    assert ".tmp" not in line and "flags" not in line


def test_prompts_refuses_empty_prompts_and_mixed_kinds_with_the_line(tmp_path):
    for name, text, frags in (
            ("e.jsonl", '"fine"\n\n""\n', ["line 3", "empty text prompt"]),
            ("o.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', ["line 2", "empty text prompt"]),
            ("t.jsonl", '[1, 2]\n[]\n', ["line 2", "empty token prompt"]),
            ("m.jsonl", '"text"\n\n{"tokens": [1, 2]}\n', ["line 3", "a token prompt, but line 1 is a text prompt"]),
            ("n.jsonl", '[5]\n"text"\n', ["line 2", "a text prompt, but line 1 is a token prompt"])):
        src = tmp_path / name
        src.write_text(text)
        assert_one_clear_line(run_gpt2job(["prompts", src, tmp_path / "x.h5"]), str(src), *frags)
        assert not (tmp_path / "x.h5").exists()


def test_singular_and_plural(tmp_path):
    src = tmp_path / "one.jsonl"
    src.write_text("[1, 2]\n")
    p = run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    assert "wrote 1 token prompt ('prompt_tokens')" in p.stdout
    inp = tmp_path / "bad.h5"
    write_token_input(inp, [[1, 2], []])
    assert_one_clear_line(run_gpt2job(["run", inp, tmp_path / "o.h5", *TINY]),
                          "1 of 2 prompts is invalid: 1 empty (row 1)")
    p = run_gpt2job(["run", tmp_path / "in.h5", tmp_path / "out.h5", *TINY, "--max-new-tokens", "2"], check=0)
    assert "1 row (" in p.stdout and "1 chunk," in p.stdout and "2 tokens generated" in p.stdout, p.stdout
    assert "1 rows" not in p.stdout + p.stderr and "1 chunks" not in p.stdout + p.stderr


def test_run_help_lists_exit_codes_and_model_forms():
    p = run_gpt2job(["run", "-h"], check=0)
    for frag in ("exit codes:", "130", "no worker left", "random:n_layer=2,n_head=2,n_embd=32[:SEED]",
                 "random:gpt2[:SEED]"):
        assert frag in p.stdout, frag


def test_a_wrong_dataset_name_lists_the_datasets_the_file_has(tmp_path):
    inp = tmp_path / "in.h5"
    with h5py.File(inp, "w") as f:
        f["prompt"] = np.array([b"hello"])
        f["meta/ids"] = np.arange(3)
    assert_one_clear_line(run_gpt2job(["run", inp, tmp_path / "o.h5", *TINY]),
                          "no 'prompts' or 'prompt_tokens' dataset", "its datasets: meta/ids, prompt")
    assert_one_clear_line(run_gpt2job(["show", inp]), "its datasets: meta/ids, prompt")


def test_every_command_has_a_description_and_every_argument_a_help():
    """`show -h` and `build-kernels -h` had no description, show's OUT and validate's --tolerance no help."""
    import argparse
    from gpt2job.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description, name
        assert not [a.dest for a in parser._actions if not a.help], name
    assert "default 0.0005" in " ".join(run_gpt2job(["validate", "-h"], check=0).stdout.split())   # (wrapped)


@pytest.mark.parametrize("to", ["script", "group"])
def test_run_inference_sigusr1_finishes_the_chunks_out_keeps_their_rows_and_the_rerun_resumes(tmp_path, to):
    """SIGUSR1 (Slurm's --signal=USR1@SECONDS ahead of a time limit, to every task; or to the script alone): no more
    chunks go out, those out are finished and kept, every rank ends, exit 5 and one line; a rerun resumes,
    and the rows equal an uninterrupted run's. (The worker ranks ignore it: its default action would end them.)"""
    from gpt2job.files.journal import journal_has_records
    require_mpirun()
    rng = np.random.default_rng(0)
    inp, out, full = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "full.h5"
    write_token_input(inp, [[int(t) for t in rng.integers(0, 100, 3)] for _ in range(3000)])
    env = fresh_env(NP=3)
    tiny = ["--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy", "--max-new-tokens", "12"]
    p = launcher([inp, out, *tiny, "--chunk-size", "1"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90   # 3,000 chunks of one prompt: seconds of work left when the first is kept
        while not journal_has_records(str(out)) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        assert p.poll() is None, "the job ended before the test saw a row kept: make it longer"
        p.send_signal(signal.SIGUSR1) if to == "script" else os.killpg(p.pid, signal.SIGUSR1)
        _, err = p.communicate(timeout=90)
        assert_every_rank_ended(out)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(out)])
    last = err.splitlines()[-1]
    assert p.returncode == 5, err
    assert re.fullmatch(rf"gpt2job: stopped \(SIGUSR1\) once the chunks handed out were done: ([\d,]+) of 3,000 rows "
                        rf"are complete and kept in {re.escape(str(out))}; run the same command again to resume",
                        last), err
    kept = int(re.search(r"([\d,]+) of 3,000", last).group(1).replace(",", ""))
    assert 0 < kept < 3000 and "prterun" not in err and "mpirun" not in err, err
    q = launcher([inp, out, *tiny], env=env)   # (the default chunks: a row's tokens never depend on them)
    _, err = q.communicate(timeout=180)
    assert q.returncode == 0 and f"resuming {out}: {kept:,} of 3,000 rows already done" in err, err
    run_gpt2job(["run", inp, full, *tiny], check=0)
    assert [t.tolist() for t in read_output(out)["tokens"]] == [t.tolist() for t in read_output(full)["tokens"]]
