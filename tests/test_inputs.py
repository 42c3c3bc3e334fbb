"""Every user mistake: one line naming the file, the field and the fix; exit code 2; no traceback."""
import json
import os
import h5py
import numpy as np
import pytest

from conftest import TINY_HF, job_env, read_output, run_gpt2job, write_token_input


def assert_one_clear_line(p, *fragments):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("gpt2job: error: ")]
    assert len(errors) == 1, p.stderr
    first = errors[0]
    for frag in fragments:
        assert frag in first, first
    return first


def run(args, np_=None):
    return run_gpt2job(["run"] + [str(a) for a in args] + ["--model", str(TINY_HF), "--max-new-tokens", "4"],
                       np_=np_)


def test_invalid_prompts_are_refused_with_count_and_rows(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    rows = [[1, 2, 3], [], [5] * 126, [7, 1000], [-1, 4], [9, 9], [2 ** 31 - 1]]
    write_token_input(inp, rows)
    assert_one_clear_line(run([inp, out]), str(inp), "prompt_tokens", "5 of 7 prompts are invalid",
                                 "1 empty (row 1)", "longer than 125 tokens", "(row 2)",
                                 "outside 0..999 (rows 3, 4, 6)", "lower --max-new-tokens", "--skip-invalid")
    assert not out.exists()
    write_token_input(inp, [r for r in rows if len(r) < 100])   # none too long: fewer new tokens would mend none
    p = run([inp, out])
    assert_one_clear_line(p, "4 of 6 prompts are invalid", "(fix: fix those prompts, or run with --skip-invalid")
    assert "max-new-tokens" not in p.stderr


def test_the_longest_prompt_that_fits_runs(tmp_path):
    """n_positions 128, 4 new tokens: a 125-token prompt uses positions 0..127 (the last new token is never fed
    back), the limit every check shares (settings.max_prompt_length)."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[5] * 125])
    assert run([inp, out, "--ignore-eos", "--backend", "numpy"]).returncode == 0
    assert len(read_output(out)["tokens"][0]) == 4


def test_invalid_prompts_under_mpirun_stop_every_rank(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2], []])
    p = run([inp, out], np_=3)
    assert p.returncode == 2
    assert p.stderr.count("gpt2job: error:") == 1 and "1 of 2 prompts is invalid: 1 empty (row 1)" in p.stderr


def test_skip_invalid_runs_the_rest(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [], [4, 5], [1000]])
    p = run([inp, out, "--skip-invalid"], np_=2)
    assert p.returncode == 0, p.stderr
    assert f"{inp}: 2 of 4 prompts are invalid: " in p.stderr and "marked 'invalid' (--skip-invalid)" in p.stderr
    res = read_output(out)
    assert res["finish"][1] == res["finish"][3] == "invalid"
    assert len(res["tokens"][1]) == 0 and len(res["tokens"][0]) == 4
    assert res["done"].all()


@pytest.mark.parametrize("case", ["missing", "not_hdf5", "no_dataset", "float_tokens", "3d_tokens", "group",
                                  "bad_utf8", "int_text", "empty_file"])
def test_bad_input_files(tmp_path, case):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    frag = {"missing": "no such file", "not_hdf5": "not a readable HDF5 file",
            "no_dataset": "no 'prompts' or 'prompt_tokens'", "float_tokens": "must be integer token ids",
            "3d_tokens": "must be integer token ids", "group": "is a group", "bad_utf8": "not valid UTF-8",
            "int_text": "must be a 1-D dataset of strings", "empty_file": "not a readable HDF5 file"}[case]
    if case == "not_hdf5":
        inp.write_text("hello, I am a CSV file\n1,2,3\n")
    elif case == "empty_file":
        inp.write_bytes(b"")
    elif case != "missing":
        with h5py.File(inp, "w") as f:
            if case == "no_dataset":
                f["something_else"] = [1, 2]
            elif case == "float_tokens":
                f["prompt_tokens"] = np.ones((3, 4), np.float32)
            elif case == "3d_tokens":
                f["prompt_tokens"] = np.ones((3, 4, 2), np.int32)
            elif case == "group":
                f.create_group("prompts")
            elif case == "bad_utf8":
                f.create_dataset("prompts", data=np.array([b"ok", b"\xff\xfe bad"], dtype=object),
                                 dtype=h5py.string_dtype("ascii"))
            elif case == "int_text":
                f["prompts"] = np.ones((2, 2), np.int32)
    assert_one_clear_line(run([inp, out]), str(inp), frag)


@pytest.mark.parametrize("flags,frag", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be in"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--top-k", "x"], "--top-k must be an integer"),
    (["--top-k", str(2 ** 31), "--temperature", "1"], "--top-k must be <= 2147483647"),   # int32 (a worker's crash)
    (["--seed", str(2 ** 64)], "--seed must be <= 9223372036854775807"),   # (wrapped to --seed 0 before)
    (["--chunk-size", str(10 ** 20)], "--chunk-size must be <= 2147483647"),   # (an h5py TypeError, exit 1)
    (["--backend", "tpu"], "invalid choice"),
    (["--backend", "numpy", "--dtype", "float16"], "float16 runs only on the cuda backend"),
    (["--model", "/nonexistent/model"], "no such file or directory"),
    (["--model", "random:gpt7"], "unknown model"),
])
def test_bad_flags(tmp_path, flags, frag):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    p = run_gpt2job(["run", inp, tmp_path / "o.h5"] + flags)
    assert_one_clear_line(p, frag)


def test_a_temperature_below_the_least_is_greedy(tmp_path):
    """As vLLM: --temperature below 1e-5 is greedy (1 / T times a logit overflows float32 at 1e-39: every worker
    failed; the flag was refused after that), the same tokens as --temperature 0."""
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2], [3]])
    tiny = ["--model", "random:n_layer=1,n_head=2,n_embd=16", "--backend", "numpy", "--max-new-tokens", "4"]
    for t in ("0", "1e-39", "9e-6"):
        run_gpt2job(["run", inp, tmp_path / f"o{t}.h5", *tiny, "--temperature", t, "--top-k", "3"], check=0)
    outs = [[t.tolist() for t in read_output(tmp_path / f"o{t}.h5")["tokens"]] for t in ("0", "1e-39", "9e-6")]
    assert outs[1] == outs[0] and outs[2] == outs[0] and all(len(t) == 4 for t in outs[0])


def test_output_folder_missing(tmp_path):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    assert_one_clear_line(run([inp, tmp_path / "no" / "such" / "out.h5"]), "folder does not exist")


def test_foreign_output_file_is_never_clobbered(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "precious.h5"
    write_token_input(inp, [[1, 2]])
    out.write_bytes(b"my thesis data")
    assert_one_clear_line(run([inp, out]), "is not a gpt2job output", "remove the file yourself")
    assert out.read_bytes() == b"my thesis data"   # (the line said to pass --overwrite, which then refused the file)
    assert_one_clear_line(run([inp, out, "--overwrite"]), "--overwrite replaces only gpt2job outputs")
    assert out.read_bytes() == b"my thesis data"


def test_finished_output_needs_overwrite_and_other_settings_are_refused(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2], [3, 4, 5]])
    assert run([inp, out]).returncode == 0
    again = run([inp, out])          # a resubmitted job with nothing left to do succeeds
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr
    assert not os.path.exists(str(out) + ".lock")
    assert_one_clear_line(run([inp, out, "--ignore-eos"]), "different model, input or settings",
                          "(--ignore-eos: was False, now True)", "--overwrite")
    assert_one_clear_line(run([inp, out, "--temperature", "0.7"]), "(--temperature: was 0.0, now 0.7)")   # alone
    os.rename(out, tmp_path / "out.json")   # an output made under a text format's name still resumes
    again = run([inp, tmp_path / "out.json"])
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr
    os.rename(tmp_path / "out.json", out)
    assert_one_clear_line(run([inp, out, "--backend", "synthetic"]), "different model, input or settings",
                          "(--backend synthetic: was no, now yes)")   # made-up tokens never join a model's
    assert not os.path.exists(str(out) + ".lock")
    p = run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--max-new-tokens", "5", "--overwrite"])
    assert p.returncode == 0
    assert len(read_output(out)["tokens"][0]) == 5


def test_prompts_command_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('"fine"\n{not json}\n')
    p = run_gpt2job(["prompts", bad, tmp_path / "x.h5"])
    assert_one_clear_line(p, "line 2: not JSON")
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('"text"\n{"tokens": [1, 2]}\n')
    assert_one_clear_line(run_gpt2job(["prompts", mixed, tmp_path / "x.h5"]), "mixes text prompts and token")
    toks = tmp_path / "t.jsonl"
    toks.write_text('{"tokens": [1, 2]}\n[3, 4, 5]\n')
    assert run_gpt2job(["prompts", toks, tmp_path / "t.h5"]).returncode == 0
    with h5py.File(tmp_path / "t.h5") as f:
        assert [r.tolist() for r in f["prompt_tokens"][()]] == [[1, 2], [3, 4, 5]]
    nul = tmp_path / "n.txt"
    nul.write_bytes(b"a\x00b\n")
    assert_one_clear_line(run_gpt2job(["prompts", nul, tmp_path / "n.h5"]), "NUL")


def test_raw_int32_prompt_file(tmp_path):
    raw = tmp_path / "input.bin"
    np.arange(48, dtype="<i4").reshape(3, 16).tofile(raw)
    run_gpt2job(["prompts", raw, tmp_path / "in.h5", "--tokens-per-row", 16], check=0)
    with h5py.File(tmp_path / "in.h5") as f:
        np.testing.assert_array_equal(f["prompt_tokens"][()], np.arange(48).reshape(3, 16))
    assert_one_clear_line(run_gpt2job(["prompts", raw, tmp_path / "x.h5", "--tokens-per-row", 5]),
                          "not a whole number of rows")


def test_overwrite_never_replaces_a_foreign_file_or_the_input(tmp_path):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    foreign = tmp_path / "data.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    assert_one_clear_line(run([inp, foreign, "--overwrite"]), "not a gpt2job output")
    with h5py.File(foreign) as f:
        assert f["x"][()].tolist() == [1, 2, 3]
    assert_one_clear_line(run([inp, inp, "--overwrite"]), "both the input and the output")
    txt = tmp_path / "p.txt"     # a text input named as the output too: the same line (it said "not a gpt2job output")
    txt.write_text("1 2 3\n")
    assert_one_clear_line(run([txt, txt]), "both the input and the output")
    assert txt.read_text() == "1 2 3\n" and not list(tmp_path.glob("p.txt.*"))
    p = run_gpt2job(["run", inp, tmp_path / "o.h5", "--model", str(TINY_HF), "--max-new-tokens", "200"])
    assert_one_clear_line(p, "--max-new-tokens", "leaves no room")
    n_pos = json.loads((TINY_HF / "config.json").read_text())["n_positions"]   # the fix's value works
    assert f"use at most {n_pos - 1} (the longest prompt that can fit has 2 tokens)" in p.stderr, p.stderr
    v = run_gpt2job(["validate", inp, "--model", str(TINY_HF), "--max-new-tokens", "200"])   # the same check and line
    assert_one_clear_line(v, "--max-new-tokens", "leaves no room")
    assert v.stderr == p.stderr
    run_gpt2job(["run", inp, tmp_path / "o.h5", "--model", str(TINY_HF), "--max-new-tokens", n_pos - 1], check=0)


def test_overwrite_keeps_the_old_output_until_the_new_one_finishes(tmp_path):
    """--overwrite sets the finished output aside (OUT.replaced): a run that completes no row (here its one worker
    fails at start-up) puts it back untouched; a run that finishes removes it; one that stops part-way leaves it, and
    no later run touches it (the resume that finishes says it is there; another --overwrite is refused): which
    output to keep is the user's choice."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5], [6], [7, 8]])
    base = ["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "4", "--chunk-size", "1"]
    run_gpt2job(base, check=0)
    before = out.read_bytes()
    replaced = tmp_path / "out.h5.replaced"
    p = run_gpt2job(base + ["--overwrite", "--seed", "1"], env=job_env(GPT2JOB_FAULT="0:0:raise"))
    assert p.returncode != 0 and out.read_bytes() == before and "is put back as it was" in p.stderr, p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["in.h5", "out.h5"]
    run_gpt2job(base + ["--overwrite", "--ignore-eos"], check=0)   # finished: the old output is gone
    assert sorted(f.name for f in tmp_path.iterdir()) == ["in.h5", "out.h5"]
    finished = out.read_bytes()
    p = run_gpt2job(base + ["--overwrite"], env=job_env(GPT2JOB_FAULT="0:3:raise"))
    assert p.returncode != 0 and replaced.read_bytes() == finished, p.stderr
    assert f"stays in {replaced} (the same command without --overwrite resumes this run; remove it once" in p.stderr
    assert_one_clear_line(run_gpt2job(base + ["--overwrite", "--ignore-eos"]), "out.h5.replaced exists")
    fix = assert_one_clear_line(run_gpt2job(base + ["--ignore-eos"]), "was started with a different")   # (not
    assert f"({replaced} is what an --overwrite run set aside: to go back to it, remove" in fix   # --overwrite)
    assert "--overwrite to start over" not in fix
    assert replaced.read_bytes() == finished and not read_output(out)["done"].all()
    p = run_gpt2job(base, check=0)   # the same command without --overwrite resumes the replacing run
    assert read_output(out)["done"].all() and replaced.read_bytes() == finished and "is left as it is" in p.stderr


@pytest.mark.parametrize("journal", ["with rows", "without rows"])
def test_a_journal_of_other_settings_never_replaces_a_finished_output(tmp_path, journal):
    """A finished output put back beside the journal of an --overwrite run that stopped (or a journal of a failed
    start that completed nothing): the journal's run resumed and rebuilt OUT from itself, or removed OUT as holding
    no rows, and the finished rows were gone. Refused now, naming both; moving the journal away keeps the output."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5], [6], [7, 8]])
    base = ["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "4", "--chunk-size", "1"]
    run_gpt2job(base, check=0)
    finished = out.read_bytes()
    fault = "0:3:raise" if journal == "with rows" else "0:1:kill"   # (a kill: no cleanup)
    run_gpt2job(base + ["--overwrite", "--ignore-eos"], env=job_env(GPT2JOB_FAULT=fault))
    (tmp_path / "out.h5.replaced").replace(out)   # the user puts the finished output back
    assert (tmp_path / "out.h5.journal").exists()
    for flags in (["--ignore-eos"], []):   # the journal's settings, then the output's own
        p = run_gpt2job(base + flags)
        assert_one_clear_line(p, "out.h5: output: is a finished output of other settings than the journal beside it",
                              "--ignore-eos: the output False, the journal True", "move ", "out.h5.journal away to keep")
        assert out.read_bytes() == finished
    (tmp_path / "out.h5.journal").rename(tmp_path / "elsewhere.journal")
    p = run_gpt2job(base, check=0)
    assert "already complete" in (p.stdout + p.stderr).lower() and out.read_bytes() == finished, p.stdout + p.stderr


def test_runs_never_touch_a_replaced_file_they_did_not_make(tmp_path):
    inp, out, other = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "out.h5.replaced"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    other.write_text("my notes\n")
    base = ["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "2"]
    p = run_gpt2job(base, env=job_env(GPT2JOB_FAULT="0:0:raise"))
    assert p.returncode != 0 and not out.exists() and other.read_text() == "my notes\n"
    p = run_gpt2job(base, check=0)
    assert other.read_text() == "my notes\n" and "is left as it is" in p.stderr
    assert_one_clear_line(run_gpt2job(base + ["--overwrite"]), "out.h5.replaced exists")
    assert other.read_text() == "my notes\n" and read_output(out)["done"].all()


def test_export_and_prompts_never_replace_an_hdf5_output(tmp_path):
    inp, out, txt = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "p.txt"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "2"], check=0)
    txt.write_text("hello\n")
    before = {p: p.read_bytes() for p in (inp, out)}
    for args, frag in ((["export", out, out, "--overwrite"], "is an HDF5 file"),
                       (["export", out, inp, "--overwrite"], "is an HDF5 file"),
                       (["export", out, tmp_path], "is a folder"),
                       (["prompts", txt, out, "--overwrite"], "is a gpt2job output"),
                       (["prompts", txt, txt, "--overwrite"], "is the source file itself")):
        assert_one_clear_line(run_gpt2job(args), frag)
    assert {p: p.read_bytes() for p in (inp, out)} == before and txt.read_text() == "hello\n"
    notes = tmp_path / "notes.txt"   # someone's text file: `prompts --overwrite` wrote HDF5 into it
    notes.write_text("my notes\n")
    assert_one_clear_line(run_gpt2job(["prompts", txt, notes, "--overwrite"]), "is not an HDF5 prompts file")
    assert notes.read_text() == "my notes\n"
    data = tmp_path / "data.h5"   # an HDF5 file of other data: not a prompts file either
    with h5py.File(data, "w") as f:
        f["measurements"] = np.arange(3)
    assert_one_clear_line(run_gpt2job(["prompts", txt, data, "--overwrite"]), "is not an HDF5 prompts file")
    with h5py.File(data, "r") as f:
        assert f["measurements"][()].tolist() == [0, 1, 2]
    assert run_gpt2job(["prompts", txt, tmp_path / "p.h5"]).returncode == 0   # a prompts file is replaced
    assert run_gpt2job(["prompts", txt, tmp_path / "p.h5", "--overwrite"]).returncode == 0
    blank = tmp_path / "blank.txt"   # `prompts` wrote 0 prompts where `run` refuses the file
    blank.write_text("\n  \n")
    assert_one_clear_line(run_gpt2job(["prompts", blank, tmp_path / "b.h5"]), "holds no prompt")
    assert not (tmp_path / "b.h5").exists()


def test_export_never_replaces_the_job_s_own_text_input_and_finds_a_moved_conversion(tmp_path, vocab_dir):
    """`export OUT src.txt --overwrite` replaced the text file the job was run on (a rerun then saw another input);
    an output moved with its conversion OUT.prompts-HASH.h5 was exported without its prompts ("is not there")."""
    src, out = tmp_path / "src.txt", tmp_path / "out.h5"
    src.write_text("1 2 3\n4 5\n")
    run_gpt2job(["run", src, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "2",
                 "--vocab-dir", vocab_dir], check=0)
    assert_one_clear_line(run_gpt2job(["export", out, src, "--overwrite"]), "is the input of", "export never replaces")
    assert src.read_text() == "1 2 3\n4 5\n"
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("out.h5*"):
        f.rename(moved / f.name)
    p = run_gpt2job(["export", moved / "out.h5", tmp_path / "o.jsonl"], check=0)
    assert "without the prompts" not in p.stderr, p.stderr
    assert '"prompt": "1 2 3"' in (tmp_path / "o.jsonl").read_text()
    src.rename(moved / "src.txt")   # the source moved with them is the job's input still
    p = run_gpt2job(["export", moved / "out.h5", moved / "src.txt", "--overwrite"])
    assert_one_clear_line(p, "is the input of", "export never replaces")
    assert (moved / "src.txt").read_text() == "1 2 3\n4 5\n"


def test_environment_variables_are_checked_when_a_command_starts(tmp_path):
    """Also those the command would never read (the numpy backend reads no kernel switch): a bad value is one line
    naming the variable; a GPT2JOB_ name that is not declared is a warning."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]])
    for name, value, frag in (("GPT2JOB_PREFIX_SHARE", "2", "not a valid bool"),
                              ("GPT2JOB_WRITER", "thred", "not one of thread, process, auto"),
                              ("GPT2JOB_LOCK_WAIT", "-5", "below 0"),
                              ("GPT2JOB_LAUNCH_TIME", "nan", "not a valid float"),   # (time to ready: nan s)
                              ("GPT2JOB_TRACE", "2", "not a valid bool")):   # (read on import: was a traceback)
        p = run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy"], env=job_env(**{name: value}))
        assert_one_clear_line(p, name, frag)
        assert not out.exists()
    p = run_gpt2job(["show", tmp_path / "missing.h5"], env=job_env(GPT2JOB_PREFIXSHARE="0"))
    assert "warning: GPT2JOB_PREFIXSHARE (GPT2JOB_PREFIX_SHARE?): not a gpt2job variable" in p.stderr
    assert_one_clear_line(p, "missing.h5")
    for value in ("-5", "1e12"):   # no launch time of this job: time to ready was 1.8e9 s, the wall time negative
        p = run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--overwrite"],
                        env=job_env(GPT2JOB_LAUNCH_TIME=value), check=0)
        assert p.stderr.count(f"warning: GPT2JOB_LAUNCH_TIME={float(value):g} is not this job's launch time") == 1
        summary = json.loads(read_output(out)["attrs"]["summary"])
        assert 0 <= summary["time_to_ready_s"] < 600 and 0 <= summary["wall_s"] < 600, summary


def test_a_flag_mistake_under_mpirun_is_the_masters_one_line(tmp_path):
    """Every rank finds it; the worker ranks wait (cli.RANK_ERROR_GRACE_S) so that the master's line is not lost
    when mpirun ends the job at the first rank's exit."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]])
    for _ in range(3):
        p = run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--max-new-tokens", "0"], np_=3)
        assert_one_clear_line(p, "--max-new-tokens")
        assert "(rank " not in p.stderr


def test_the_output_and_validate_paths_are_checked_before_any_work(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]])
    assert_one_clear_line(run([inp, tmp_path, "--backend", "numpy"]), "is a folder")
    p = run([inp, out, "--backend", "numpy", "--validate", tmp_path / "nope.bin"])
    assert_one_clear_line(p, "nope.bin", "--validate", "no such file")
    assert "starting" not in p.stderr and not out.exists()
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)   # not rows of int32: refused before the job, not after it
    p = run([inp, out, "--backend", "numpy", "--validate", tmp_path / "short.bin"])
    assert_one_clear_line(p, "short.bin", "--validate", "10 bytes is not 1 rows of int32")
    assert not out.exists()


def test_stop_strings_without_a_tokenizer_are_one_line(tmp_path):
    """No vocabulary files (an empty --vocab-dir) and no download: --stop cannot match; the note that the output
    would have no text is not printed before that error."""
    inp, out, empty = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "empty"
    write_token_input(inp, [[1, 2, 3]])
    empty.mkdir()
    p = run([inp, out, "--backend", "numpy", "--stop", "foo", "--vocab-dir", empty])
    assert_one_clear_line(p, "--stop", "stop strings need the tokenizer")
    assert "no tokenizer" not in p.stderr and not out.exists()


def test_a_worker_rank_waits_before_its_user_error_line(monkeypatch, capsys):
    """The mechanism behind the test above, in process (its race lost the master's line in 1-2 of 8-10 runs): a rank
    other than 0 sleeps cli.RANK_ERROR_GRACE_S before it prints, and its line names it; rank 0 prints at once."""
    from gpt2job import cli
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    assert cli.main(["run", "in.h5", "out.h5", "--max-new-tokens", "0"]) == 2
    assert slept == [cli.RANK_ERROR_GRACE_S] and "gpt2job: error (rank 2): " in capsys.readouterr().err
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert cli.main(["run", "in.h5", "out.h5", "--max-new-tokens", "0"]) == 2
    assert slept == [cli.RANK_ERROR_GRACE_S] and "gpt2job: error: " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["out.jsonl", "out.TXT", "out.json"])
def test_an_output_named_as_text_is_refused(tmp_path, name):
    """`run IN out.jsonl` wrote an HDF5 file named .jsonl; export makes JSON lines."""
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2], [3, 4, 5]])
    assert_one_clear_line(run([inp, tmp_path / name]), str(tmp_path / name), "this command writes an HDF5 file",
                          "export OUT.h5 out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]


@pytest.mark.parametrize("command, dataset", [("run", "prompts"), ("run", "prompt_tokens"), ("run", "grid"),
                                              ("score", "prompts"), ("score", "context"), ("score", "context_tokens")])
def test_an_input_of_no_rows_is_refused_as_an_empty_text_file_is(tmp_path, command, dataset):
    """Before: `done. 0 rows`, exit 0, a finished output of nothing. One line, exit 2, nothing left behind. (A path
    with "prompts" in it stays whole in score's pair lines: they once renamed every "prompts" of the line.)"""
    inp, out = tmp_path / "prompts-empty.h5", tmp_path / "out.h5"
    with h5py.File(inp, "w") as f:
        text, tokens = h5py.string_dtype(), h5py.vlen_dtype(np.int32)
        if dataset == "grid":
            f.create_dataset("prompt_tokens", (0, 4), np.int32)
        else:   # (a score input's pair: both datasets)
            for name in [dataset] + ([dataset.replace("context", "continuation")] if "context" in dataset else []):
                f.create_dataset(name, (0,), tokens if name.endswith("_tokens") else text)
    field = "prompt_tokens" if dataset == "grid" else dataset
    more = ["--max-new-tokens", "4"] if command == "run" else []
    p = run_gpt2job([command, inp, out, "--model", str(TINY_HF), "--backend", "numpy", *more])
    assert_one_clear_line(p, f"{inp}: {field}: has 0 rows")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prompts-empty.h5"]
    if command == "run":
        assert_one_clear_line(run_gpt2job(["validate", inp, "--model", str(TINY_HF)]), f"{inp}: {field}: has 0 rows")
