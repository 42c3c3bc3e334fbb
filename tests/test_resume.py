"""Nothing completed is lost: kill a run midway (mpirun, the master or a worker), run the same command
again, and the output equals an uninterrupted run's, with no row computed twice."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import ROOT, alive, gpt2job_cmd, require_mpirun, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.files.journal import journal_has_records, read_journal

MODEL = "random:n_layer=4,n_head=4,n_embd=256,n_positions=64,vocab_size=50257:3"
N = 40


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    inp = d / "in.h5"
    write_token_input(inp, [rng.integers(0, 50257, rng.integers(2, 12)) for _ in range(N)])
    clean = d / "clean.h5"
    run_gpt2job(job_args(inp, clean), check=0)
    return inp, read_output(clean)


def job_args(inp, out, chunk=1):
    return ["run", inp, out, "--model", MODEL, "--max-new-tokens", 24, "--ignore-eos", "--chunk-size", chunk,
            "--backend", "numpy", "--temperature", 0.8, "--seed", 9]


def rank_pids(tag):
    """pid -> MPI rank of the python processes started with TESTS_PROCESS_TAG=tag (only this test's)."""
    out = {}
    mark = f"TESTS_PROCESS_TAG={tag}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"gpt2job" not in cmd or mark not in env:
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(pid)] = int(e.split(b"=")[1])
    return out


def journal_rows(path):
    header, records, _ = read_journal(str(path) + ".journal")
    return sum(len(r.rows) for r in records)


def kill_midway(cmd, out, victim, chunk=1, min_rows=4, sig=signal.SIGKILL):
    """Run cmd until its journal holds min_rows rows, then send sig (SIGKILL) to the victim (mpirun or the one
    process, the master or a worker). Every worker hangs on the chunk after those that hold min_rows, so that the job
    cannot end before the kill however slowly the test process polls. Returns the job's stderr."""
    tag = uuid.uuid4().hex
    k = -(-min_rows // chunk) + 1
    fault = ",".join(f"{r}:{k}:hang" for r in range(3))     # rank 0 alone, or the master and two workers
    p = subprocess.Popen(cmd, env=job_env(TESTS_PROCESS_TAG=tag, GPT2JOB_FAULT=fault), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(str(out) + ".journal") and journal_rows(out) >= min_rows:
            break
        time.sleep(0.05)
    else:
        p.kill()
        raise AssertionError("the job made no progress")
    if victim == "mpirun" or victim == "process":
        os.kill(p.pid, sig)
    else:
        ranks = rank_pids(tag)
        pid = next(pid for pid, r in ranks.items() if (r == 0) == (victim == "master"))
        os.kill(pid, sig)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    time.sleep(0.2)
    # mpirun is gone; make sure no orphaned rank keeps writing, and that they are gone before the journal is read
    orphans = list(rank_pids(tag))
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 30
    while any(alive(pid) for pid in orphans) and time.time() < deadline:
        time.sleep(0.05)
    return err.decode(errors="replace")


TERM_LINE = "gpt2job: terminated (SIGTERM); completed rows are kept: run the same command again to resume"


def test_sigterm_before_any_row_is_completed_says_so(tmp_path):
    """SIGTERM while no row is complete yet (a text input's conversion, the model loading, the first chunk): the
    line said the rows already written were kept; there were none. An output and a journal made at the start, with
    no record past the journal's header, are no rows either. And after the last row, the output complete: the line
    said to run the same command to resume (that run said 'already complete')."""
    from gpt2job.chunks import Completions
    from gpt2job.files.journal import Journal
    code = ("import os, signal, sys; from gpt2job.cluster.job import say_on_sigterm; "
            "say_on_sigterm(sys.argv[1], sys.argv[2] == '1'); os.kill(os.getpid(), signal.SIGTERM)")
    none = "gpt2job: terminated (SIGTERM) before any row was completed: run the same command again"
    # an --overwrite run that set the old output aside: that one's rows are kept, the rerun resumes it
    for i, (made, rows, overwrite, line) in enumerate((
            (False, 0, 0, none), (True, 0, 0, none), (True, 1, 0, TERM_LINE), ("journal gone", 0, 0, TERM_LINE),
            ("replaced", 0, 1, "gpt2job: terminated (SIGTERM); completed rows are kept: run the same command "
                               "without --overwrite to resume"), ("finished", 0, 0, None),
            ("finished before", 0, 0, TERM_LINE))):
        out = tmp_path / f"out{i}.h5"
        launched = time.time()
        if made in ("finished", "finished before"):   # a stop landing after the job's last row (it said the rows were
            write_token_input(tmp_path / "in.h5", [[1, 2, 3]])   # kept: resume); an older finished OUT is another run's
            run_gpt2job(["run", tmp_path / "in.h5", out, "--model", "random:n_layer=1,n_head=2,n_embd=16",
                         "--backend", "numpy", "--max-new-tokens", "2"], check=0)
            if made == "finished":
                line = f"gpt2job: terminated (SIGTERM) after the job had finished: {out} is complete"
            else:   # (a run stopped before --overwrite set it aside, or one with other settings)
                time.sleep(0.05)
                launched = time.time()
        elif made:
            out.write_bytes(b"")
        if made in (True, "replaced"):   # (an unfinished OUT whose journal is gone: resumed from its rows)
            j = Journal(str(out) + ".journal", header={"k": 1})
            if rows:
                j.append(Completions.from_lists(0, [0], [[5, 6]], [0]))
            j.close()
        if made == "replaced":
            (tmp_path / f"out{i}.h5.replaced").write_bytes(b"")
        p = subprocess.run([sys.executable, "-c", code, str(out), str(overwrite)], capture_output=True, text=True,
                           timeout=60, env=job_env(GPT2JOB_LAUNCH_TIME=repr(launched)), cwd=ROOT)
        assert p.returncode == -signal.SIGTERM and p.stderr.splitlines() == [line], (i, p.stderr)


def test_sigterm_of_an_overwrite_run_with_no_row_yet_puts_the_old_output_back(tmp_path):
    """SIGTERM (a batch system's time limit) while an --overwrite run has completed no row: the output it set aside
    goes back, as after Ctrl-C, and the original command finds it complete (it stayed in OUT.replaced, and the
    original command computed every row again)."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    base = ["run", inp, out, "--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy",
            "--max-new-tokens", "2"]
    run_gpt2job(base, check=0)
    before = out.read_bytes()
    p = subprocess.Popen(gpt2job_cmd(base + ["--max-new-tokens", "3", "--overwrite"]),
                         env=job_env(GPT2JOB_FAULT="0:1:hang"), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60   # (its first chunk hangs: set aside, started, no row)
    while time.monotonic() < deadline and not (os.path.exists(f"{out}.replaced") and os.path.exists(f"{out}.journal")):
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM and err.splitlines()[-1] == f"gpt2job: terminated (SIGTERM) before any " \
        f"row was completed: {out} is as it was before this run; run the same command again", err
    assert out.read_bytes() == before and not os.path.exists(f"{out}.replaced")
    assert "already complete" in run_gpt2job(base, check=0).stderr


def test_sigterm_of_an_overwrite_run_part_way_names_the_output_it_set_aside(tmp_path):
    """As after Ctrl-C or an error, a line names OUT.replaced, which stays; the rerun without --overwrite resumes."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    base = ["run", inp, out, "--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy",
            "--max-new-tokens", "2", "--chunk-size", "1"]
    run_gpt2job(base, check=0)
    again = base[:-4] + ["--max-new-tokens", "3", "--chunk-size", "1"]
    p = subprocess.Popen(gpt2job_cmd(again + ["--overwrite"]), env=job_env(GPT2JOB_FAULT="0:2:hang"),
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60   # (its first chunk done, its second hangs)
    while time.monotonic() < deadline and not journal_has_records(str(out)):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM and err.splitlines()[-2:] == [
        f"gpt2job: the output this run replaces stays in {out}.replaced (the same command without --overwrite "
        "resumes this run; remove it once it is not needed)",
        "gpt2job: terminated (SIGTERM); completed rows are kept: run the same command without --overwrite to resume"
    ], err
    assert os.path.exists(f"{out}.replaced")
    assert "resuming" in run_gpt2job(again, check=0).stderr


def test_the_sigterm_put_back_waits_for_the_new_output_and_never_runs_while_finishing(tmp_path):
    """put_back_unstarted runs in a signal handler, at any moment of the run: it puts back only where its run set
    files aside, its journal is there and empty, and its own OUT is made. Before that the writer may still move its
    new OUT over the one put back (OUT.tmp); once the journal is gone the run is finishing: OUT is the finished
    new output, which the put-back removed."""
    from gpt2job.files.journal import Journal
    from gpt2job.files.outpaths import OutputPaths, put_back_unstarted
    out = str(tmp_path / "out.h5")
    for name, text in (("out.h5", "old"), ("out.h5.journal", "old journal")):
        (tmp_path / name).write_text(text)
    files = OutputPaths(out)
    files.lock()
    try:
        files.set_aside()
        assert put_back_unstarted(out) is None                     # no journal yet
        Journal(out + ".journal", header={"k": 1}).close()
        (tmp_path / "out.h5.tmp").write_text("being made")
        assert put_back_unstarted(out) is None                     # the writer still making OUT
        os.replace(tmp_path / "out.h5.tmp", out)
        os.rename(out + ".journal", tmp_path / "j")                # finishing: the journal removed first
        assert put_back_unstarted(out) is None and (tmp_path / "out.h5.replaced").exists()
        os.rename(tmp_path / "j", out + ".journal")
        assert put_back_unstarted(out) == out                      # made, empty journal: put back
        assert (tmp_path / "out.h5").read_text() == "old" and (tmp_path / "out.h5.journal").read_text() == "old journal"
        assert not files.aside and put_back_unstarted(out) is None
    finally:
        files.unlock(remove=True)
    assert put_back_unstarted(out) is None                         # (no run of this process holds OUT)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigusr1_in_a_one_process_job_finishes_the_chunk_out_and_the_rerun_resumes(tmp_path, writer):
    """SIGUSR1 to `python -m gpt2job run` (no MPI): the master's own worker finishes the chunks it holds, their rows
    are kept, exit 5 and one line; the rerun resumes to the uninterrupted run's rows. Slurm's --signal reaches every
    process of the job step: the output writer's processes too (they ended with it, and the job with exit 2)."""
    rng = np.random.default_rng(1)
    inp, out, full = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "full.h5"
    write_token_input(inp, [[int(t) for t in rng.integers(0, 100, 3)] for _ in range(3000)])
    args = ["--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy", "--max-new-tokens", "12"]
    p = subprocess.Popen(gpt2job_cmd(["run", inp, out, *args, "--chunk-size", "1"]), env=job_env(GPT2JOB_WRITER=writer),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60   # 3,000 chunks of one prompt: seconds of work left when the first is kept
    while not journal_has_records(str(out)) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "the job ended before the test saw a row kept: make it longer"
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert bool(children) == (writer == "process"), children   # the writer (and its text processes, with a tokenizer)
    for pid in [p.pid, *map(int, children)]:
        os.kill(pid, signal.SIGUSR1)
    summary, err = p.communicate(timeout=60)
    assert p.returncode == 5, err
    summary = summary.splitlines()   # what the worker did until the stop (no "done." line: the stop's line says it)
    assert summary[0].startswith("gpt2job: throughput ") and summary[1].startswith("gpt2job:   rank 0 on ") and \
        " s computing" in summary[1] and len(summary) == 2 and not any("done." in x for x in summary), summary
    lines = err.splitlines()
    assert "gpt2job: SIGUSR1: no more chunks are handed out; the job stops once the chunks out are done, their rows " \
        "kept" in lines, err
    assert lines[-1].startswith("gpt2job: stopped (SIGUSR1) once the chunks handed out were done: ") and \
        lines[-1].endswith(f" of 3,000 rows are complete and kept in {out}; run the same command again to resume"), err
    assert 0 < read_output(out)["done"].sum() < 3000
    run_gpt2job(["run", inp, out, *args], check=0)   # (the default chunks: a row's tokens never depend on them)
    run_gpt2job(["run", inp, full, *args], check=0)
    assert [t.tolist() for t in read_output(out)["tokens"]] == [t.tolist() for t in read_output(full)["tokens"]]


def test_sigusr1_before_any_row_says_so():
    from gpt2job.cluster.ending import Ending
    from gpt2job.errors import Stopped, exit_code
    import types
    e = Ending.stopped_early(types.SimpleNamespace(completed=0, done=np.zeros(3, bool)), "o.h5", False)
    assert isinstance(e, Stopped) and exit_code(e) == 5
    assert str(e) == "stopped (SIGUSR1) before any row was completed: run the same command again"


def test_ctrl_c_before_any_row_is_completed_leaves_no_file_and_says_so(tmp_path):
    """Ctrl-C (SIGINT) while the first chunk computes: the job removes the files it made and its line says no row
    was completed (it said the completed rows were kept)."""
    from gpt2job.files.outpaths import holds_rows
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    p = subprocess.Popen(gpt2job_cmd(["run", inp, out, "--model", "random:n_layer=1,n_head=2,n_embd=16",
                                      "--backend", "numpy", "--max-new-tokens", "2"]),
                         env=job_env(GPT2JOB_FAULT="0:1:hang"), stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not os.path.exists(f"{out}.journal"):
        time.sleep(0.05)
    time.sleep(0.5)
    assert not holds_rows(str(out))
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines()[-1] == "gpt2job: interrupted before any row was completed: run the same command again"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.h5"], err


def test_ctrl_c_after_a_completed_chunk_says_the_rows_are_kept(tmp_path):
    """Ctrl-C once a chunk is journaled (the worker hangs on its second): the line says the rows are kept and the
    same command resumes them."""
    from gpt2job.files.outpaths import holds_rows
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5], [6, 7]])
    args = ["run", inp, out, "--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy",
            "--max-new-tokens", "2", "--chunk-size", "1"]
    p = subprocess.Popen(gpt2job_cmd(args), env=job_env(GPT2JOB_FAULT="0:2:hang"), stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not holds_rows(str(out)):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines()[-1] == "gpt2job: interrupted; completed rows are kept: run the same command again to " \
        "resume", err
    run_gpt2job(args, check=0)
    assert json.loads(read_output(out)["attrs"]["summary"])["rows_resumed"] >= 1


def test_ctrl_c_to_every_rank_ends_the_job_soon_with_one_line(tmp_path):
    """Ctrl-C as srun and MPICH's launcher pass it on, to every rank at once: the workers ignore it and the master
    ends the job (they finish the batch they hold). One line, exit 130, no traceback, long before --chunk-timeout
    (it waited that long for workers already gone, printed a traceback and ended by MPI_Abort(1))."""
    require_mpirun()
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[i // 50 + 1, i % 50 + 1, 3] for i in range(3000)])
    tag = uuid.uuid4().hex
    p = subprocess.Popen(gpt2job_cmd(["run", inp, out, "--model", "random:n_layer=2,n_head=2,n_embd=64", "--backend",
                                      "numpy", "--max-new-tokens", 32, "--ignore-eos", "--chunk-size", 4], 3),
                         env=job_env(TESTS_PROCESS_TAG=tag), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(f"{out}.journal") and journal_rows(out) >= 8):
        time.sleep(0.05)
    ranks = rank_pids(tag)
    assert sorted(ranks.values()) == [0, 1, 2] and p.poll() is None, ranks
    t = time.monotonic()
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=90)
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    assert time.monotonic() - t < 60 and p.returncode == 130, err
    assert err.count("interrupted") == 1 and "Traceback" not in err and "MPI_Abort" not in err, err
    assert "gpt2job: interrupted; completed rows are kept: run the same command again to resume" in err, err
    assert 0 < journal_rows(out) < 3000


def test_a_journal_holds_records_only_past_a_whole_first_record(tmp_path):
    """journal_has_records (the SIGTERM line's test): a header alone, a first record cut short by a kill (the reader
    drops it: no row kept), no journal or a torn header: none; a whole record: some."""
    from gpt2job.chunks import Completions
    from gpt2job.files.journal import Journal, journal_has_records
    out = str(tmp_path / "o.h5")
    assert not journal_has_records(out)
    Journal(out + ".journal", header={"k": 1}).close()
    assert not journal_has_records(out)
    header = os.path.getsize(out + ".journal")
    j = Journal(out + ".journal", truncate_at=header)
    j.append(Completions.from_lists(0, [0, 1], [[5, 6], [7]], [0, 0]))
    j.close()
    assert journal_has_records(out)
    whole = os.path.getsize(out + ".journal")
    for cut in (whole - 1, header + 16, header + 5):   # (each shorter than the one before: a cut, not zeros)
        with open(out + ".journal", "r+b") as f:
            f.truncate(cut)
        assert not journal_has_records(out), cut
    with open(out + ".journal", "r+b") as f:
        f.truncate(7)
    assert not journal_has_records(out)


@pytest.mark.parametrize("victim,np_,chunk,sig", [("process", None, 1, "KILL"), ("process", None, 4, "KILL"),
                                                  ("mpirun", 3, 3, "KILL"), ("master", 3, 1, "KILL"),
                                                  ("master", 3, 5, "KILL"), ("worker", 3, 2, "KILL"),
                                                  ("process", None, 2, "TERM"), ("master", 3, 2, "TERM")])
def test_kill_and_resume_gives_identical_output(tmp_path, workload, victim, np_, chunk, sig):
    """A job killed part-way (SIGKILL; or SIGTERM, as a batch system's time limit sends it, which the master says in
    one line) resumes to the clean run's output, no row computed twice."""
    if np_:
        require_mpirun()
    inp, clean = workload
    out = tmp_path / "out.h5"
    err = kill_midway(gpt2job_cmd(job_args(inp, out, chunk), np_), out, victim, chunk,
                      sig=getattr(signal, "SIG" + sig))
    assert sig == "KILL" or TERM_LINE in err.splitlines(), err   # (mpirun ends a dead worker's job with SIGTERM too)
    kept = journal_rows(out)
    assert 0 < kept < N, kept
    run_gpt2job(job_args(inp, out, chunk), np_=np_, check=0)
    res = read_output(out)
    assert [t.tolist() for t in res["tokens"]] == [t.tolist() for t in clean["tokens"]]
    assert res["finish"] == clean["finish"]
    summary = json.loads(res["attrs"]["summary"])
    assert summary["rows_resumed"] == kept
    assert sum(w["rows"] for w in summary["workers"]) == N - kept   # no row computed twice
    assert not os.path.exists(str(out) + ".journal")


def test_sigterm_with_stderr_gone_still_ends_by_the_signal(tmp_path, workload):
    """SIGTERM when nobody reads stderr any more (its pipe closed): the master's line cannot be written, and the
    signal still ends the process (status -15, as before the line existed; it was 1)."""
    inp, _ = workload
    out = tmp_path / "out.h5"
    p = subprocess.Popen(gpt2job_cmd(job_args(inp, out)), env=job_env(GPT2JOB_FAULT="0:6:hang"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(str(out) + ".journal") and journal_rows(out) >= 4):
            assert time.time() < deadline and p.poll() is None, "the job made no progress"
            time.sleep(0.05)
        p.stderr.close()
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=60) == -signal.SIGTERM
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None


def test_journal_records_of_many_rows_read_back_whole(tmp_path):
    """Every row of every record comes back, in records of 1, 3 and 5 rows, after reopening for appends."""
    from gpt2job.chunks import Completions
    from gpt2job.files.journal import Journal
    path = str(tmp_path / "j")
    sent, row = [], 0
    j = Journal(path, header={"k": 1})
    for i, n in enumerate([1, 3, 5]):
        c = Completions.from_lists(i, np.arange(row, row + n), [[row + k] * (k + 1) for k in range(n)], [0] * n)
        row += n
        j.append(c)
        sent.append(c)
    j.close()
    header, records, end = read_journal(path)
    j = Journal(path, truncate_at=end)
    extra = Completions.from_lists(9, [row, row + 1], [[1], [2, 3]], [1, 0])
    j.append(extra)
    j.close()
    header, records, _ = read_journal(path)
    assert header == {"k": 1}
    for got, want in zip(records, sent + [extra]):
        assert got.rows.tolist() == want.rows.tolist() and got.tokens.tolist() == want.tokens.tolist()
        assert got.offsets.tolist() == want.offsets.tolist() and got.finish.tolist() == want.finish.tolist()
    assert len(records) == 4


def test_torn_journal_tail_and_damaged_hdf5_are_recovered(tmp_path, workload):
    inp, clean = workload
    out = tmp_path / "out.h5"
    kill_midway(gpt2job_cmd(job_args(inp, out)), out, "process", min_rows=6)
    kept = journal_rows(out)
    with open(str(out) + ".journal", "ab") as f:        # a record cut short by the kill
        f.write(b"GJR1\x40\x00\x00\x00\x00\x00\x00\x00garbage")
    with open(out, "r+b") as f:                         # and an HDF5 file left half-written
        f.truncate(300)
    run_gpt2job(job_args(inp, out), check=0)
    res = read_output(out)
    assert [t.tolist() for t in res["tokens"]] == [t.tolist() for t in clean["tokens"]]
    assert json.loads(res["attrs"]["summary"])["rows_resumed"] == kept


def test_resume_with_other_settings_is_refused(tmp_path, workload):
    inp, _ = workload
    out = tmp_path / "out.h5"
    kill_midway(gpt2job_cmd(job_args(inp, out)), out, "process")
    args = job_args(inp, out)
    args[args.index("--seed") + 1] = 10
    p = run_gpt2job(args)
    assert p.returncode == 2 and "different model, input or settings" in p.stderr and "seed" in p.stderr
    assert os.path.exists(str(out) + ".journal")          # kept for a resume with the right settings
    run_gpt2job(job_args(inp, out), check=0)


def test_show_and_export_count_the_rows_only_the_journal_holds(tmp_path, workload):
    """A job killed before its writer caught up: the journal holds rows the file does not (made here by clearing
    `done` of journaled rows). show and export say how many; the rerun adds them without computing them again."""
    import h5py
    inp, _ = workload
    out = tmp_path / "out.h5"
    kill_midway(gpt2job_cmd(job_args(inp, out)), out, "process")
    _, records, _ = read_journal(str(out) + ".journal")
    journaled = sorted({int(r) for rec in records for r in rec.rows})
    with h5py.File(out, "r+") as f:
        f["done"][journaled[:3]] = 0    # the writer had not reached them
        in_file = int(f["done"][()].sum())
    shown = run_gpt2job(["show", out, "--limit", "0"], check=0).stdout.splitlines()[0]
    assert shown == (f"{out}: {in_file} of {N} rows done, unfinished (run the same command to resume); "
                     f"{len(journaled) - in_file} more are complete in its journal (the next run adds them)"), shown
    p = run_gpt2job(["export", out, tmp_path / "x.jsonl"], check=0)
    assert (f"({N - in_file} rows not done, {len(journaled) - in_file} of them complete in its journal: run the same "
            "command again to add them and finish the rest)") in p.stderr, p.stderr
    p = run_gpt2job(job_args(inp, out), check=0)
    assert json.loads(read_output(out)["attrs"]["summary"])["rows_resumed"] == len(journaled)
    shown = run_gpt2job(["show", out, "--limit", "0"], check=0).stdout.splitlines()   # the summary: the last run's
    assert shown[2].startswith(f"  the last run, which resumed {len(journaled)} rows kept before, generated "), shown


def test_show_of_an_output_only_its_journal_holds_says_so(tmp_path, workload):
    """A job stopped before its writer made OUT (its journal alone holds the completed rows): show says how many
    rows the journal holds and how to get the file, not "no such file"; the rerun resumes them."""
    inp, _ = workload
    out = tmp_path / "out.h5"
    kill_midway(gpt2job_cmd(job_args(inp, out)), out, "process")
    _, records, _ = read_journal(str(out) + ".journal")
    journaled = {int(r) for rec in records for r in rec.rows}
    os.remove(out)
    p = run_gpt2job(["show", out], check=0)
    assert p.stdout.splitlines() == [f"{out}: not written yet; its journal holds {len(journaled)} completed rows: "
                                     "run the same command again to resume (the file is written then)"], p.stdout
    run_gpt2job(job_args(inp, out), check=0)
    assert json.loads(read_output(out)["attrs"]["summary"])["rows_resumed"] == len(journaled)


def test_a_journal_is_made_with_a_header_or_reopened_at_an_end_never_neither(tmp_path):
    """Journal(path) with neither truncated the file to nothing before failing (no caller did; now refused first)."""
    from gpt2job.files.journal import Journal
    path = tmp_path / "j"
    Journal(str(path), header={"k": 1}).close()
    size = path.stat().st_size
    for kw in ({}, {"header": {"k": 1}, "truncate_at": size}):
        with pytest.raises(ValueError, match="a header or truncate_at"):
            Journal(str(path), **kw)
    assert path.stat().st_size == size


def test_rows_the_writer_has_no_room_for_wait_in_the_journal_not_the_master(tmp_path, monkeypatch):
    """A writer with no room (a resume's rebuild, a slow disk) never holds the master up: what it cannot take stays in
    the journal (OutputStore.lag) and reaches it, in journal order, as it has room (pump), all of it before the job
    ends; a resume whose rebuild does not fit gets its journal's rows the same way. (5M rows, 2.5M kept: the
    resumed job's generation span 16.8 -> 4.2 s, RESULTS.md session 63.)"""
    from gpt2job.chunks import FINISH_LENGTH, Completions
    from gpt2job.files import output, writer
    room = [True]
    monkeypatch.setattr(writer.WriterThread, "has_room", lambda self: room[0])
    monkeypatch.setattr(output, "PUMP_BYTES", 200)     # a record or two a turn
    n, key = 40, {"gpt2job_format": 2, "k": 1}

    def chunk(i, rows):
        return Completions.from_lists(i, np.array(rows), [[r % 50, r + 1] for r in rows], [FINISH_LENGTH] * len(rows))

    def want(out):
        got = read_output(out)
        assert got["done"].all() and [t.tolist() for t in got["tokens"]] == [[r % 50, r + 1] for r in range(n)]

    path = str(tmp_path / "out.h5")
    st = output.OutputStore(path, n, key, np.full(n, 3))
    st.add_many([chunk(0, range(0, 5))])
    assert st.lag is None
    room[0] = False
    for i, a in enumerate(range(5, 25, 5), 1):
        assert st.add_many([chunk(i, range(a, a + 5))]) == [(5, 10, 10)]    # durable and counted: no waiting
    start, stop = st.lag
    assert stop == os.path.getsize(path + ".journal") and st.done[:25].all()
    st.pump()
    assert st.lag == (start, stop)                     # still no room: nothing moves
    room[0] = True
    st.pump()
    assert start < st.lag[0] < stop                    # one turn: a piece of it
    st.add_many([chunk(9, range(25, 30))])             # behind the lag, in journal order
    assert st.lag[1] == os.path.getsize(path + ".journal")
    st.close()                                         # stopped: the journal holds every row; then a resume
    room[0] = False
    st = output.OutputStore(path, n, key, np.full(n, 3))
    assert st.resumed_rows == 30 and st.lag is not None
    st.add_many([chunk(10, range(30, 40))])
    room[0] = True
    st.finish({"k": 1})                                # the rest of the lag first, then the file is finished
    want(path)


def test_ctrl_c_in_the_masters_loop_is_raised_between_its_turns():
    """The master's loop takes Ctrl-C between two turns (ending.CtrlC): raised anywhere, it could drop a result taken
    off the channel and not yet handled, and the job's end then waited --chunk-timeout for it (the test above hung about
    1 run in 20 on a loaded machine; 0 in 100 since). A second Ctrl-C raises at once; an ignored SIGINT stays so."""
    from gpt2job.cluster.ending import CtrlC
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with CtrlC() as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                  # (the handler has run: nothing raised in the middle of a turn)
            with pytest.raises(KeyboardInterrupt):
                ctrl_c.check()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with CtrlC() as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            ctrl_c.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
