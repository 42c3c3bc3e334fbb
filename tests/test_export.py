"""`python -m gpt2job export OUT out.jsonl`: one JSON object per completed row, prompts included when the input
is still there; refuses to clobber; an unfinished output exports its done rows and says how many are missing."""
import json

import h5py
import pytest

from conftest import ROOT, TINY_HF, TINY_TEXT_MODEL, read_output, run_gpt2job, write_token_input


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_token_prompts(tmp_path):
    inp, out, js = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "out.jsonl"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "3"], check=0)
    p = run_gpt2job(["export", out, js], check=0)
    assert "exported 2 rows" in p.stderr
    got, res = rows_of(js), read_output(out)
    assert [r["row"] for r in got] == [0, 1]
    assert got[0]["prompt_tokens"] == [1, 2, 3] and got[1]["prompt_tokens"] == [4, 5]
    assert [r["completion_tokens"] for r in got] == [t.tolist() for t in res["tokens"]]
    assert [r["finish_reason"] for r in got] == res["finish"]
    p = run_gpt2job(["export", out, js])
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert run_gpt2job(["export", out, js, "--overwrite"]).returncode == 0
    p = run_gpt2job(["export", out, "-"], check=0)   # standard output (it wrote a file named '-')
    assert [json.loads(x) for x in p.stdout.splitlines()] == got and "to standard output" in p.stderr
    assert not (ROOT / "-").exists()   # (run_gpt2job runs in the repository's root)


def test_show_past_the_last_row_and_on_a_folder_say_so(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "3"], check=0)
    p = run_gpt2job(["show", out, "--start", "100"], check=0)
    assert "(--start 100 is past the last row, 1: no row shown)" in p.stdout, p.stdout
    p = run_gpt2job(["show", tmp_path])
    assert p.returncode == 2 and p.stderr.strip() == f"gpt2job: error: {tmp_path}: file: is a folder (fix: give an " \
        "output file written by gpt2job run)", p.stderr


def test_export_text_prompts_and_unfinished_rows(tmp_path, vocab_dir):
    src, inp, out, js = tmp_path / "p.txt", tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "o.jsonl"
    src.write_text("Hello world\nÜber café\n")
    run_gpt2job(["prompts", src, inp, "--vocab-dir", vocab_dir], check=0)
    run_gpt2job(["run", inp, out, "--model", TINY_TEXT_MODEL, "--backend", "numpy", "--max-new-tokens", "4",
                 "--vocab-dir", vocab_dir], check=0)
    run_gpt2job(["export", out, js], check=0)
    got = rows_of(js)
    assert [r["prompt"] for r in got] == ["Hello world", "Über café"]
    res = read_output(out)   # each row's own text and tokens (not, say, row 0's for every row)
    assert [r["completion"] for r in got] == res["text"] and len(set(res["text"])) == 2
    assert [r["text_exact"] for r in got] == [bool(x) for x in res["text_exact"]]
    assert [r["completion_tokens"] for r in got] == [t.tolist() for t in res["tokens"]]
    with h5py.File(out, "r+") as f:          # as if the job had been killed after row 0
        f["done"][1] = 0
        f.attrs["finished"] = 0
    p = run_gpt2job(["export", out, js, "--overwrite"], check=0)
    assert "1 row not done" in p.stderr and len(rows_of(js)) == 1
    src.write_text("Hello world\nÜber cafe\n")   # the input made again with other prompts (as many)
    run_gpt2job(["prompts", src, inp, "--overwrite"], check=0)
    p = run_gpt2job(["export", out, js, "--overwrite"], check=0)
    assert f"the input {inp} holds other prompts than when {out} was made: exporting without the prompts" in p.stderr
    assert "prompt" not in rows_of(js)[0]   # (it paired the new prompts with the old completions)


def test_export_leaves_out_token_prompts_that_changed(tmp_path):
    inp, out, js = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "out.jsonl"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "3"], check=0)
    write_token_input(inp, [[1, 2, 3], [4, 6]])
    p = run_gpt2job(["export", out, js], check=0)
    assert "holds other prompts than when" in p.stderr and "prompt_tokens" not in rows_of(js)[0]


def test_show_and_export_of_an_output_a_process_has_open_for_writing_say_so(tmp_path):
    """A running job holds its output open (HDF5's lock): one line saying so, not 'not a readable HDF5 file
    (... unable to lock file, errno = 11 ...' cut short, with the fix 'give an output file'."""
    import subprocess
    import sys
    from conftest import ROOT, job_env
    from test_inputs import assert_one_clear_line
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "3"], check=0)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\nf = h5py.File(sys.argv[1], 'r+')\n"
                               "print('open', flush=True)\ntime.sleep(60)", str(out)], cwd=ROOT, env=job_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        for args in (["show", out], ["export", out, tmp_path / "x.jsonl"]):
            assert_one_clear_line(run_gpt2job(args), str(out), "open for writing in another process",
                                  "once that job has ended")
    finally:
        holder.kill()
        holder.wait()


def test_show_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`show OUT | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys
    from conftest import ROOT, job_env
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3 + i % 7] for i in range(3000)])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "2"], check=0)
    p = subprocess.run(f"'{sys.executable}' -m gpt2job show '{out}' --limit 3000 | head -1; "
                       "echo \"status ${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash", cwd=ROOT,
                       env=job_env(), capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith(f"{out}: 3,000 of 3,000 rows done, finished"), p.stdout
    assert p.stderr.strip() == "status 141", p.stderr


def test_export_checks_token_prompts_a_block_at_a_time(tmp_path, monkeypatch):
    """export's check reads the input in blocks (bounded memory) and gets PromptSet.fingerprint's digest, for every
    layout of prompt_tokens and across block boundaries."""
    import numpy as np
    import gpt2job.files.prompts as prompts
    from gpt2job.files import export
    from gpt2job.files.read_input import read_prompts
    monkeypatch.setattr(prompts, "BLOCK_ROWS", 7)
    rng = np.random.default_rng(0)
    for kind in ("grid", "grid16", "vlen", "vlen64"):   # (an input of 0 rows is refused: prompts.no_rows)
        path = tmp_path / f"{kind}.h5"
        with h5py.File(path, "w") as f:
            if kind.startswith("grid"):
                f["prompt_tokens"] = rng.integers(0, 50000, (23, 5)).astype(
                    np.uint16 if kind == "grid16" else np.int32)
            else:
                ds = f.create_dataset("prompt_tokens", (23,), dtype=h5py.vlen_dtype(
                    np.int64 if kind == "vlen64" else np.int32))
                for i in range(23):
                    ds[i] = rng.integers(0, 50000, rng.integers(1, 9))
        want = read_prompts(str(path), None, 50257).fingerprint()
        with h5py.File(path) as f:
            assert export.token_fingerprint(f["prompt_tokens"]) == want, kind


def test_a_resume_without_the_tokenizer_is_refused_where_rows_have_text(tmp_path, vocab_dir):
    """The rows kept would lose their text (the file was rebuilt without the column; only `export --vocab-dir`
    would decode it again, outside the output)."""
    from conftest import job_env
    from test_inputs import assert_one_clear_line
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3 + i] for i in range(8)])
    args = ["run", inp, out, "--model", TINY_TEXT_MODEL, "--backend", "numpy", "--max-new-tokens", "3",
            "--chunk-size", "2", "--no-dedup"]
    run_gpt2job([*args, "--vocab-dir", vocab_dir], env=job_env(GPT2JOB_FAULT="0:3:raise"), check=3)
    no_vocab = {k: v for k, v in job_env().items() if k != "GPT2_VOCAB_DIR"}
    assert_one_clear_line(run_gpt2job([*args, "--vocab-dir", tmp_path / "none"], env=no_vocab), str(out),
                          "holds completion text, but the tokenizer was not found")
    run_gpt2job([*args, "--vocab-dir", vocab_dir], check=0)
    res = read_output(out)
    assert res["done"].all() and all(isinstance(t, str) for t in res["text"]), res["text"]


def test_show_export_and_validate_of_a_damaged_output_say_so_in_one_line(tmp_path, capsys):
    """Bytes of a finished output overwritten at one place after another: show, export and validate (either side)
    work or say in one line that the file is damaged (HDF5's errors were tracebacks; export's read errors said
    "cannot write")."""
    from gpt2job.errors import UserError
    from gpt2job.files.export import export
    from gpt2job.files.show import show
    from gpt2job.files.validate import report_validation
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1 + i % 7, 2, 3 + i % 5, 4] for i in range(120)])
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "6"], check=0)
    clean = out.read_bytes()
    said = []
    for at in range(len(clean) // 80, len(clean), len(clean) // 40):   # (a wider sweep found 4 more tracebacks)
        bad = bytearray(clean)
        bad[at:at + 64] = bytes(b ^ 0x5A for b in bad[at:at + 64])
        dmg = tmp_path / "damaged.h5"
        dmg.write_bytes(bad)
        for do in (lambda: show(str(dmg), 0, 120), lambda: export(str(dmg), str(tmp_path / "d.jsonl"), True),
                   lambda: report_validation(str(dmg), str(out), 0.0),
                   lambda: report_validation(str(out), str(dmg), 0.0)):
            try:
                do()
            except UserError as e:
                said.append(str(e))
                assert "\n" not in str(e) and (tmp_path / "d.jsonl.tmp").exists() is False
    capsys.readouterr()
    damaged = [s for s in said if "the file is damaged" in s]
    assert damaged and all(s.startswith(f"{tmp_path / 'damaged.h5'}: file: cannot be read") for s in damaged), \
        [s for s in damaged if not s.startswith(f"{tmp_path / 'damaged.h5'}: file: cannot be read")]
    assert not any("cannot write" in s for s in said), said
    # a damaged input: never blamed on the output (whose fix, --overwrite, would recompute it). An output that recorded
    # the input's fingerprint finds the damage before it exports ("holds other prompts": no prompts exported); one
    # of before fingerprints (none recorded) reads the prompts as it exports them
    with h5py.File(out, "r+") as f:
        del f.attrs["input_fingerprint"]
    good, said = inp.read_bytes(), []
    for at in range(len(good) // 40, len(good), len(good) // 20):
        bad = bytearray(good)
        bad[at:at + 64] = bytes(b ^ 0x5A for b in bad[at:at + 64])
        inp.write_bytes(bad)
        try:
            export(str(out), str(tmp_path / "d.jsonl"), True)
        except UserError as e:
            said.append(str(e))
    capsys.readouterr()
    assert said and all(s.startswith(f"{inp}: input: cannot be read") for s in said), said


def test_a_damaged_row_length_is_found_before_hdf5_allocates_it(tmp_path, capsys):
    """HDF5 allocates what a variable-length row claims before it finds the row's address wrong: one damaged row's
    length (0x5A5A5A5A values) took 6 GB and 6 s a read. The lengths on disk are checked first (h5files.check_vlen_rows),
    in an output and in an input."""
    import time
    from gpt2job.errors import UserError
    from gpt2job.files.export import export
    from gpt2job.files.show import show
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]] * 8)
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "2"], check=0)
    for path, name in ((out, "completion_tokens"), (inp, "prompt_tokens")):
        with h5py.File(path, "r") as f:
            at = f[name].id.get_offset() + 16 * 5       # row 5's length: the first 4 of its 16 bytes
        raw = bytearray(path.read_bytes())
        raw[at:at + 4] = (0x5A5A5A5A).to_bytes(4, "little")
        path.write_bytes(raw)
        t = time.monotonic()
        if path == out:
            with pytest.raises(UserError) as e:
                show(str(out), 0, 8)
            assert "past the end of the file" in str(e.value), e.value
        else:   # export leaves the prompts of a damaged input out; run refuses it in one line
            export(str(out), str(tmp_path / "o.jsonl"), True)
            assert "holds other prompts" in capsys.readouterr().err
        assert time.monotonic() - t < 2
        if path == out:
            raw[at:at + 4] = (2).to_bytes(4, "little")     # its 2 tokens again
            out.write_bytes(raw)
    p = run_gpt2job(["run", inp, tmp_path / "o2.h5", "--model", TINY_HF, "--backend", "numpy"])
    assert p.returncode == 2 and "prompt_tokens: cannot be read" in p.stderr and "past the end" in p.stderr, p.stderr


def test_export_says_how_to_get_a_removed_conversion_back(tmp_path, vocab_dir):
    """A text input's conversion OUT.prompts-HASH.h5 removed after the job: export names it and says that the same
    `run` command makes it again (it named an internal file with no fix); after that rerun the prompts are back."""
    src, out, js = tmp_path / "src.txt", tmp_path / "out.h5", tmp_path / "o.jsonl"
    src.write_text("1 2 3\n4 5\n")
    job = ["run", src, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "2",
           "--vocab-dir", vocab_dir]
    run_gpt2job(job, check=0)
    (conversion,) = tmp_path.glob("out.h5.prompts-*.h5")
    conversion.unlink()
    p = run_gpt2job(["export", out, js], check=0)
    assert (f"gpt2job: the input {conversion} is not there (the conversion of the text or JSONL file the job ran on: "
            "the same `run` command makes it again, then export again): exporting without the prompts") \
        in p.stderr.splitlines(), p.stderr
    run_gpt2job(job, check=0)
    run_gpt2job(["export", out, js, "--overwrite"], check=0)
    assert [r["prompt"] for r in rows_of(js)] == ["1 2 3", "4 5"]


def test_export_never_replaces_a_jobs_journal_or_lock(tmp_path):
    """export --overwrite onto an unfinished job's journal (its only copy of the rows it computed) or lock, or a
    journal under another name: refused in one line, the file unchanged; the job then resumes with its rows."""
    import shutil
    from conftest import crash_after_a_kept_chunk, job_env
    from gpt2job.files.journal import read_journal
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1 + i % 7, 2, 3] for i in range(12)])
    args = ["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "3", "--chunk-size", "2"]
    crash_after_a_kept_chunk(args, out, job_env())
    journal = str(out) + ".journal"
    kept = sum(len(r.rows) for r in read_journal(journal)[1])
    shutil.copy(journal, tmp_path / "copy.bin")
    (tmp_path / "out.h5.lock").touch()
    for target in (journal, str(out) + ".lock", tmp_path / "copy.bin"):
        before = open(target, "rb").read()
        p = run_gpt2job(["export", out, target, "--overwrite"])
        assert p.returncode == 2 and "export never writes one" in p.stderr and "Traceback" not in p.stderr
        assert open(target, "rb").read() == before
    p = run_gpt2job(args, check=0)
    assert json.loads(h5py.File(out, "r").attrs["summary"])["rows_resumed"] >= kept > 0, p.stderr
    for name in ("out.h5.lock", "out.h5.journal"):   # not there now: such a name is still refused (a run removes them)
        p = run_gpt2job(["export", out, tmp_path / name])
        assert p.returncode == 2 and "export never writes one" in p.stderr and not (tmp_path / name).exists()


def test_export_decodes_the_text_of_a_job_run_without_a_tokenizer(tmp_path, vocab_dir, monkeypatch):
    """A token job run without the tokenizer files has no 'completions': `export --vocab-dir` decodes each row as the
    job's writer would have (the same JSON lines as the same job run with them, a stop token left out of the text);
    without a tokenizer export says so and writes the token ids; a folder named that lacks the files is an error."""
    from conftest import job_env
    from gpt2job.files import export as export_mod
    from gpt2job.model.tokenizer import NoTokenizer
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[464 + i, 2068, 7586, 21831] for i in range(6)] + [[40, 1101, 257]])
    args = ["run", inp, None, "--model", TINY_TEXT_MODEL, "--backend", "numpy", "--max-new-tokens", "8"]
    args[2] = tmp_path / "probe.h5"
    run_gpt2job([*args, "--vocab-dir", vocab_dir], check=0)
    stop = int(read_output(args[2])["tokens"][0][3])   # row 0 stops at that token (a stop token id)
    no_vocab = {k: v for k, v in job_env().items() if k != "GPT2_VOCAB_DIR"}
    with_text, without = tmp_path / "text.h5", tmp_path / "ids.h5"
    run_gpt2job([*args[:2], with_text, *args[3:], "--stop-token-ids", str(stop), "--vocab-dir", vocab_dir], check=0)
    p = run_gpt2job([*args[:2], without, *args[3:], "--stop-token-ids", str(stop), "--vocab-dir", tmp_path / "none"],
                    env=no_vocab, check=0)
    assert "no tokenizer, so no 'completions' text is written" in p.stderr and "export --vocab-dir" in p.stderr
    assert "text" not in read_output(without) and read_output(with_text)["finish"][0] == "stop"
    run_gpt2job(["export", with_text, tmp_path / "a.jsonl"], check=0)
    run_gpt2job(["export", without, tmp_path / "b.jsonl", "--vocab-dir", vocab_dir], env=no_vocab, check=0)
    a, b = rows_of(tmp_path / "a.jsonl"), rows_of(tmp_path / "b.jsonl")
    assert a == b and len(a) == 7 and all("completion" in r and "text_exact" in r for r in a)
    assert a[0]["finish_reason"] == "stop" and a[0]["completion_tokens"][-1] == stop
    for flag, env, field in ((["--vocab-dir", tmp_path / "none"], no_vocab, "--vocab-dir"),
                             ([], {**no_vocab, "GPT2_VOCAB_DIR": tmp_path}, "GPT2_VOCAB_DIR")):   # (what was set)
        p = run_gpt2job(["export", without, tmp_path / "c.jsonl", *flag], env=env)
        assert p.returncode == 2 and f"vocab.bpe: {field}: missing" in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "c.jsonl").exists()

    def no_tokenizer(vocab_dir):   # (tiktoken's own download, offline)
        raise NoTokenizer("tiktoken could not load the gpt2 encoding (ConnectionError)", "tokenizer", "--vocab-dir")
    monkeypatch.setattr(export_mod, "load_tokenizer", no_tokenizer)
    said = []
    export_mod.export(str(without), str(tmp_path / "d.jsonl"), stream=type("S", (), {"write": said.append})())
    d = rows_of(tmp_path / "d.jsonl")
    assert len(d) == 7 and "completion" not in d[0] and d[0]["completion_tokens"] == a[0]["completion_tokens"]
    assert any(f"{without} has no completion text (its job ran without a tokenizer) and none loads here (tiktoken "
               "could not load the gpt2 encoding (ConnectionError)): exporting the token ids" in x for x in said), said
