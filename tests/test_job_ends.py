"""Every path that ends a job releases every rank: run under mpirun with a deadline, each must exit."""
import os

import h5py
import numpy as np
import pytest

from conftest import TINY_HF, VOCAB_DIR, as_one_process, read_output, run_gpt2job, write_token_input

TINY = ["--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "3"]
DEADLINE = 90   # seconds: a hang fails the test instead of the suite


def run(args, np_=3, **kw):
    return run_gpt2job(["run", *[str(a) for a in args], *TINY], np_=np_, timeout=DEADLINE, **kw)


def test_every_prompt_invalid_and_skipped(tmp_path):
    inp, out = tmp_path / "allbad.h5", tmp_path / "o.h5"
    with h5py.File(inp, "w") as f:
        f.create_dataset("prompt_tokens", data=np.array([[1, 2, 999999], [3, 4, 999999]], np.int64))
    p = run([inp, out, "--skip-invalid"], check=0)
    assert "2 invalid" in p.stdout
    res = read_output(out)
    assert res["attrs"]["finished"] == 1 and res["finish"] == ["invalid", "invalid"]
    assert not os.path.exists(str(out) + ".lock") and not os.path.exists(str(out) + ".journal")


def test_every_row_done_but_not_marked_finished(tmp_path):
    """A kill between the last stored row and the final write: the rerun only finishes the file."""
    inp, out = tmp_path / "in.h5", tmp_path / "o.h5"
    write_token_input(inp, [[1, 2], [3, 4, 5], [6]])
    run([inp, out], np_=None, check=0)
    before = read_output(out)["tokens"]
    with h5py.File(out, "r+") as f:
        f.attrs["finished"] = 0
    p = run([inp, out], check=0)
    assert "3 of 3 rows already done" in p.stderr
    res = read_output(out)
    assert res["attrs"]["finished"] == 1
    assert [t.tolist() for t in res["tokens"]] == [t.tolist() for t in before]


def test_already_complete_exits_0_under_mpirun(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "o.h5"
    write_token_input(inp, [[1, 2], [3]])
    run([inp, out], np_=None, check=0)
    p = run([inp, out], check=0)
    assert "already complete" in p.stderr
    assert not os.path.exists(str(out) + ".lock")


@pytest.mark.parametrize("mistake", ["bad model", "bad input"])
def test_a_refused_start_releases_every_rank(tmp_path, mistake):
    inp, out = tmp_path / "in.h5", tmp_path / "o.h5"
    write_token_input(inp, [[1, 2]])
    if mistake == "bad input":
        inp = tmp_path / "missing.h5"
        p = run([inp, out])
    else:
        p = run_gpt2job(["run", inp, out, "--backend", "numpy", "--model", tmp_path / "nope"], np_=3,
                        timeout=DEADLINE)
    assert p.returncode == 2, p.stderr
    assert not os.path.exists(str(out) + ".lock")


def test_a_job_never_finishes_with_a_row_missing(tmp_path, monkeypatch, capsys):
    """A scheduler bug that loses a row (here: the first chunk drops its last row) must not end in an output
    marked finished: the master checks every row before it writes `finished`, and says so (exit 3)."""
    from gpt2job.cli import main
    from gpt2job.cluster.scheduler import Scheduler
    inp, out = tmp_path / "in.h5", tmp_path / "o.h5"
    write_token_input(inp, [[1, 2], [3, 4, 5], [6], [7, 8]])
    make = Scheduler.make_chunk
    lost = []

    def losing(self, rows):
        if not lost:
            lost.append(int(rows[-1]))
            rows = rows[:-1]
        return make(self, rows)

    monkeypatch.setattr(Scheduler, "make_chunk", losing)
    as_one_process(monkeypatch)
    code = main(["run", str(inp), str(out), *TINY, "--chunk-size", "2", "--no-dedup"])
    err = capsys.readouterr().err
    assert code == 3 and "ended with 1 row not done" in err, err
    assert lost and read_output(out)["attrs"]["finished"] == 0
    assert read_output(out)["done"][lost[0]] == 0


@pytest.mark.parametrize("layout", ["vlen", "flat"])
def test_a_job_of_a_million_rows_with_the_default_layout_says_flat_writes_it_faster(tmp_path, monkeypatch, capsys,
                                                                                     layout):
    """From BIG_JOB_ROWS rows (here lowered to 3) a job with text says once, as it opens its output, that --layout flat
    writes it faster, unless it uses it."""
    from gpt2job.cli import main
    from gpt2job.files import output
    if not (VOCAB_DIR / "vocab.bpe").is_file():
        pytest.skip("no GPT-2 vocabulary files (../shared/gpt2-vocab): no text, no note")
    monkeypatch.setattr(output, "BIG_JOB_ROWS", 3)
    as_one_process(monkeypatch)
    inp, out = tmp_path / "in.h5", tmp_path / "o.h5"
    write_token_input(inp, [[1, 2], [3, 4, 5], [6], [7, 8]])
    assert main(["run", str(inp), str(out), *TINY, "--layout", layout, "--vocab-dir", str(VOCAB_DIR)]) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if "--layout flat" in x]
    assert notes == ([] if layout == "flat" else
                     ['gpt2job: note: for 4 rows, --layout flat writes the output about twice as fast on nodes of '
                      'many cores (README, "The flat layout")'])
