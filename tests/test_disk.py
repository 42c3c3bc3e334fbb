"""A full disk (here: a file-size limit) or an unwritable output: one clear message, nothing completed
is lost, and the same command resumes once there is room."""
import errno
import os
import resource
import subprocess

import numpy as np
import pytest

from conftest import TINY_HF, as_one_process, gpt2job_cmd, job_env, read_output, run_gpt2job, write_token_input

N = 300


def args(inp, out):
    return ["run", inp, out, "--model", TINY_HF, "--max-new-tokens", 8, "--chunk-size", 5, "--backend", "numpy",
            "--ignore-eos"]


def test_disk_full_midway_then_resume(tmp_path):
    rng = np.random.default_rng(0)
    inp, out, clean = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "clean.h5"
    write_token_input(inp, [rng.integers(0, 1000, rng.integers(1, 9)) for _ in range(N)])
    run_gpt2job(args(inp, clean), check=0)
    limit = 32 * 1024   # bytes any one file may reach: the output (38 KB when finished) outgrows it partway through

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run(gpt2job_cmd(args(inp, out)), env=job_env(), capture_output=True, text=True, timeout=120,
                       preexec_fn=small_disk)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("gpt2job: error:")]
    assert len(errors) == 1 and "completed rows are kept" in errors[0] and "free disk space" in errors[0]
    run_gpt2job(args(inp, out), check=0)
    res, want = read_output(out), read_output(clean)
    assert [t.tolist() for t in res["tokens"]] == [t.tolist() for t in want["tokens"]]


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path whose parent is a file instead
        inp = tmp_path / "in.h5"
        write_token_input(inp, [[1, 2]])
        (tmp_path / "afile").write_text("x")
        p = run_gpt2job(args(inp, tmp_path / "afile" / "out.h5"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        inp = tmp_path / "in.h5"
        write_token_input(inp, [[1, 2]])
        p = run_gpt2job(args(inp, ro / "out.h5"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "gpt2job: error:" in p.stderr


def test_a_second_run_on_the_same_output_waits_then_refuses(tmp_path):
    import fcntl
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]])
    fd = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX)      # another writer: this test process
    try:
        p = subprocess.run(gpt2job_cmd(args(inp, out)), env=job_env(GPT2JOB_LOCK_WAIT=1), capture_output=True,
                           text=True, timeout=60)
    finally:
        os.close(fd)
    assert p.returncode == 2 and "another gpt2job run is writing this output" in p.stderr
    run_gpt2job(args(inp, out), check=0)
    assert not os.path.exists(str(out) + ".lock")


def test_a_resume_whose_writer_fails_while_the_journal_is_replayed_is_one_line(tmp_path, monkeypatch, capsys):
    """The writer fails (here: as on a full disk) while the resumed job hands it the journal's rows: one line, exit 2
    (it was a traceback, exit 1, where the failure came before the replay ended: journals over one block)."""
    import errno

    from gpt2job.cli import main
    from gpt2job.files import output
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[i + 1, i + 2] for i in range(40)])
    p = run_gpt2job(args(inp, out), env=job_env(GPT2JOB_FAULT="0:3:raise"))
    assert p.returncode == 3 and os.path.exists(str(out) + ".journal"), p.stderr

    class FullDisk(output.WriterThread):
        def put(self, comps, blob=None):
            raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(output, "WriterThread", FullDisk)
    as_one_process(monkeypatch)
    monkeypatch.delenv("GPT2JOB_FAULT", raising=False)
    assert main([str(a) for a in args(inp, out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gpt2job: error:")]
    assert len(err) == 1 and "File too large" in err[0] and "completed rows are kept" in err[0], err


def test_an_unfinished_output_without_journal_whose_rows_cannot_be_read_is_one_line(tmp_path):
    """The journal is gone and the output's rows are damaged (its attributes still read): one line naming the fix,
    exit 2, and no half-made journal left to block the corrected rerun."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[i + 1, i + 2] for i in range(40)])
    assert run_gpt2job(args(inp, out), env=job_env(GPT2JOB_FAULT="0:3:raise")).returncode == 3
    os.remove(str(out) + ".journal")
    data = bytearray(out.read_bytes())
    at = data.rfind(b"GCOL")           # the last global heap collection (the variable-length rows' data)
    assert at > 0
    data[at:at + 4] = b"XXXX"
    out.write_bytes(bytes(data))
    p = run_gpt2job(args(inp, out))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("gpt2job: error:")]
    assert len(errors) == 1 and "its rows cannot be read" in errors[0] and "--overwrite" in errors[0], p.stderr
    assert not os.path.exists(str(out) + ".journal.tmp")
    assert run_gpt2job(args(inp, out) + ["--overwrite"]).returncode == 0


def test_writeback_starts_the_files_writing_and_lets_go_of_it(tmp_path):
    from gpt2job.files.writer_process import Writeback
    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        f.write(b"x" * (4 << 20))       # dirty pages, not synced
        f.flush()
        wb = Writeback(str(path))
        wb.start()
        wb.close()
    assert wb.rc == 0 and wb.fd is None
    wb.start()                          # after close: nothing
    assert wb.thread is not None and not wb.thread.is_alive()


def test_an_output_whose_folder_cannot_be_written_is_one_line_that_loses_nothing(tmp_path, monkeypatch):
    """The lock file, the job's first write, cannot be made (a read-only mount: EROFS): the line says so and what to
    do; it said "completed rows are kept" before any row was computed."""
    import errno

    import pytest

    from gpt2job.errors import UserError
    from gpt2job.files.outpaths import LOCK_SUFFIX, OutputPaths
    out = str(tmp_path / "o.h5")
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(LOCK_SUFFIX):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError) as e:
        OutputPaths(out).lock()
    assert str(e.value) == (f"{out}: output: cannot create its lock file o.h5.lock (Read-only file system) (fix: write "
                            "the output to a folder you can write to (with free space))")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_made_read_only_before_the_end_leaves_a_complete_output_and_a_warning(tmp_path, monkeypatch, capsys,
                                                                                     overwrite):
    """OUT is finished, but its journal (and what --overwrite set aside) cannot be removed: it was a traceback and exit
    1; now a warning naming the file, exit 0, and the output is complete."""
    from gpt2job.cli import main
    inp, out, clean = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "clean.h5"
    write_token_input(inp, [[i + 1, i + 2] for i in range(40)])
    run_gpt2job(args(inp, clean), check=0)
    if overwrite:
        run_gpt2job(args(inp, out), check=0)
    real_remove = os.remove

    def read_only_folder(p, *a, **kw):
        if str(p).startswith(str(out) + ".") and os.path.exists(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_remove(p, *a, **kw)

    monkeypatch.setattr(os, "remove", read_only_folder)
    as_one_process(monkeypatch)
    assert main([str(a) for a in args(inp, out)] + (["--overwrite"] if overwrite else [])) == 0
    left = [f"{out}.journal"] + ([f"{out}.replaced"] if overwrite else [])   # (the earlier output, set aside)
    warning = f"gpt2job: warning: {out} is complete, but {' and '.join(left)} could not be removed (Permission " \
        f"denied): remove {'them' if overwrite else 'it'} once the folder is writable again"
    err = capsys.readouterr().err
    assert warning in err.splitlines() and "Traceback" not in err and "set aside by an earlier" not in err, err
    assert all(os.path.exists(p) for p in left)
    res, want = read_output(out), read_output(clean)
    assert res["attrs"]["finished"] == 1 and [t.tolist() for t in res["tokens"]] == [t.tolist() for t in want["tokens"]]
