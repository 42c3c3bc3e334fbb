"""`run` on a text or JSONL prompt file (feature 9): converted on the fly by the master, with the `prompts` command's
rules and errors, into OUT.prompts-HASH.h5 next to the output; the same result as converting first; a rerun resumes;
a changed file is refused as a changed input; a bad file is one line, exit 2, and leaves nothing behind."""
import json
import os
import re
import subprocess

import h5py
import numpy as np
import pytest

from conftest import ROOT, TINY_HF, job_env, read_output, run_gpt2job
from test_inputs import assert_one_clear_line

MODEL = "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257"
TEXT = "The capital of France is\nOnce upon a time\n\nWater boils at\nThe best way to learn is\nHello, world\n"


def args(inp, out, vocab_dir, *more):
    return ["run", inp, out, "--backend", "numpy", "--model", MODEL, "--max-new-tokens", 6, "--vocab-dir", vocab_dir,
            "--chunk-size", 2, *more]


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def conversions(out):
    return sorted(p.name for p in out.parent.glob(out.name + ".prompts-*.h5"))


def same_result(a, b):
    ra, rb = read_output(a), read_output(b)
    assert ra["done"].all() and rb["done"].all()
    assert [t.tolist() for t in ra["tokens"]] == [t.tolist() for t in rb["tokens"]]
    assert ra["text"] == rb["text"] and ra["finish"] == rb["finish"]
    assert ra["attrs"]["input_fingerprint"] == rb["attrs"]["input_fingerprint"]


@pytest.mark.parametrize("np_", [None, 3])
def test_a_text_file_runs_as_if_converted_first(tmp_path, vocab_dir, np_):
    src = tmp_path / "p.txt"
    src.write_text(TEXT, encoding="utf-8")
    run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    run_gpt2job(args(tmp_path / "in.h5", tmp_path / "first.h5", vocab_dir), check=0)
    out = tmp_path / "out.h5"
    p = run_gpt2job(args(src, out, vocab_dir), np_=np_, check=0)
    assert "5 text prompts of" in p.stderr and "converted to" in p.stderr, p.stderr
    assert f" of 5 in {src}; " in p.stderr, p.stderr    # the starting line names the user's file, not its conversion
    same_result(out, tmp_path / "first.h5")
    assert len(read_output(out)["tokens"]) == 5
    (conv,) = conversions(out)
    assert read_output(out)["attrs"]["input"] == str(tmp_path / conv)   # `export` finds the prompts there
    with h5py.File(tmp_path / conv) as f:
        assert f.attrs["source"] == str(src)
    assert not [n for n in files(tmp_path) if n.endswith((".tmp", ".lock", ".journal"))]
    exported = tmp_path / "out.jsonl"
    run_gpt2job(["export", out, exported], check=0)
    assert '"prompt": "Water boils at"' in exported.read_text()


def test_a_jsonl_file_of_text_and_one_of_tokens(tmp_path, vocab_dir):
    src = tmp_path / "p.jsonl"
    src.write_text('"The capital of France is"\n{"prompt": "Once upon a time"}\n{"text": "Hello"}\n')
    run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    run_gpt2job(args(tmp_path / "in.h5", tmp_path / "first.h5", vocab_dir), check=0)
    run_gpt2job(args(src, tmp_path / "out.h5", vocab_dir), check=0)
    same_result(tmp_path / "out.h5", tmp_path / "first.h5")
    toks = tmp_path / "t.jsonl"
    toks.write_text('{"tokens": [464, 3139, 286]}\n[15496, 11]\n')
    p = run_gpt2job(args(toks, tmp_path / "t.h5", vocab_dir), check=0)
    assert "2 token prompts of" in p.stderr
    with h5py.File(tmp_path / conversions(tmp_path / "t.h5")[0]) as f:
        assert [r.tolist() for r in f["prompt_tokens"][()]] == [[464, 3139, 286], [15496, 11]]


def test_a_rerun_resumes_and_a_changed_file_is_refused(tmp_path, vocab_dir):
    src, out = tmp_path / "p.txt", tmp_path / "out.h5"
    src.write_text(TEXT, encoding="utf-8")
    clean = tmp_path / "clean.h5"
    run_gpt2job(args(src, clean, vocab_dir), check=0)
    # the master's own worker fails on its 3rd chunk: 2 chunks (4 rows) are kept, exit 3
    p = run_gpt2job(args(src, out, vocab_dir), env=job_env(GPT2JOB_FAULT="0:3:raise"))
    assert p.returncode == 3, p.stderr
    (conv,) = conversions(out)
    # a changed text file: refused as a changed input; the output and its own conversion are kept as they were
    src.write_text(TEXT.replace("Hello, world", "Goodbye, world"), encoding="utf-8")
    assert_one_clear_line(run_gpt2job(args(src, out, vocab_dir)), str(out), "different model, input or settings",
                          "(the input holds other prompts than it was started with)")   # (two sha256 digests before)
    assert conversions(out) == [conv] and os.path.exists(str(out) + ".journal")
    # the same file again: the same conversion, resumed, equal to a clean run
    src.write_text(TEXT, encoding="utf-8")
    p = run_gpt2job(args(src, out, vocab_dir), check=0)
    assert "unchanged, read from" in p.stderr and "resuming" in p.stderr and "4 of 5 rows already done" in p.stderr
    same_result(out, clean)
    assert conversions(out) == [conv]
    # finished: the same command says so; the changed file with --overwrite starts over and drops the old conversion
    assert "already complete" in run_gpt2job(args(src, out, vocab_dir), check=0).stderr
    src.write_text(TEXT.replace("Hello, world", "Goodbye, world"), encoding="utf-8")
    run_gpt2job(args(src, out, vocab_dir, "--overwrite"), check=0)
    assert len(conversions(out)) == 1 and conversions(out) != [conv]
    assert read_output(out)["done"].all()


@pytest.mark.parametrize("np_", [None, 3])
@pytest.mark.parametrize("name,content,frag", [
    ("empty.jsonl", '"fine"\n""\n', "line 2: empty text prompt"),
    ("mixed.jsonl", '"text"\n{"tokens": [1, 2]}\n', "mixes text prompts and token prompts"),
    ("typed.jsonl", '{"tokens": "1 2 3"}\n', "line 1: 'tokens' is not a list of token ids"),   # (not a text)
    ("two.jsonl", '"a"\n{"prompt": "b", "text": "c"}\n', "line 2: gives 'prompt' and 'text': two prompts"),
    ("notjson.jsonl", '"fine"\n{not json}\n', "line 2: not JSON"),
    ("nul.txt", "a\x00b\n", "NUL"),
    ("blank.txt", "\n  \n", "holds no prompt"),
    ("table.csv", "a,b\n1,2\n", "is not an HDF5 file, and its extension (.csv) is not .txt or .jsonl"),
    ("big.jsonl", '{"tokens": [464, 99999999999]}\n', "line 1: token id 99999999999 is out of range"),
])
def test_a_bad_prompt_file_is_one_line_exit_2_and_leaves_nothing(tmp_path, name, content, frag, np_):
    src = tmp_path / name
    src.write_text(content)
    before = files(tmp_path)
    p = run_gpt2job(["run", src, tmp_path / "out.h5", "--backend", "numpy", "--model", MODEL], np_=np_, timeout=120)
    assert_one_clear_line(p, str(src), frag)
    assert files(tmp_path) == before
    if name.endswith((".jsonl", ".txt")) and name != "blank.txt":   # word for word the `prompts` command's line
        q = run_gpt2job(["prompts", src, tmp_path / "x.h5"])
        assert [x for x in q.stderr.splitlines() if x.startswith("gpt2job: error")] == \
            [x for x in p.stderr.splitlines() if x.startswith("gpt2job: error")]


def test_a_failed_start_after_the_conversion_leaves_nothing_and_the_corrected_rerun_runs(tmp_path, vocab_dir):
    src, out = tmp_path / "p.txt", tmp_path / "out.h5"
    src.write_text(TEXT)
    p = run_gpt2job(args(src, out, vocab_dir, "--max-new-tokens", 100000))    # refused once the model is known
    assert_one_clear_line(p, "--max-new-tokens")
    assert files(tmp_path) == ["p.txt"]
    run_gpt2job(args(src, out, vocab_dir), check=0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_not_a_gpt2job_output_is_refused_before_the_conversion(tmp_path, vocab_dir, overwrite):
    src, out = tmp_path / "p.txt", tmp_path / "notes.h5"
    src.write_text(TEXT)
    out.write_text("my notes\n")
    p = run_gpt2job(args(src, out, vocab_dir, *(["--overwrite"] if overwrite else [])))
    assert_one_clear_line(p, "exists and is not a gpt2job output")
    assert "converted" not in p.stderr and files(tmp_path) == ["notes.h5", "p.txt"]
    assert out.read_text() == "my notes\n"
    (tmp_path / "folder").mkdir()   # a folder: that line, not "not a gpt2job output"
    assert_one_clear_line(run_gpt2job(args(src, tmp_path / "folder", vocab_dir)), "is a folder")


def test_a_run_refused_beside_another_run_of_the_same_command_leaves_that_run_its_conversion(tmp_path, vocab_dir):
    """Two runs of one text file into one output, started at once: both convert it (the same file, written
    atomically); the second is refused at the output's lock, and removed the conversion the first was reading (its
    output then named an input that was gone: export lost the prompts). The first run is this test holding the lock."""
    import fcntl
    src, out = tmp_path / "p.txt", tmp_path / "out.h5"
    src.write_text(TEXT)
    with open(f"{out}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_gpt2job(args(src, out, vocab_dir), env=job_env(GPT2JOB_LOCK_WAIT=0))
        assert_one_clear_line(p, "another gpt2job run is writing this output")
        assert len(list(tmp_path.glob("out.h5.prompts-*.h5"))) == 1, files(tmp_path)
    run_gpt2job(args(src, out, vocab_dir), check=0)
    assert sorted(files(tmp_path)) == sorted(["p.txt", "out.h5", list(tmp_path.glob("out.h5.prompts-*.h5"))[0].name])


def test_a_raw_token_file_and_an_hdf5_file_of_any_name(tmp_path, vocab_dir):
    raw = tmp_path / "input.bin"
    np.arange(32, dtype="<i4").tofile(raw)
    assert_one_clear_line(run_gpt2job(["run", raw, tmp_path / "o.h5", "--model", MODEL]), str(raw),
                          "python -m gpt2job prompts")
    src = tmp_path / "p.txt"
    src.write_text(TEXT)
    run_gpt2job(["prompts", src, tmp_path / "prompts.data"], check=0)      # HDF5 by its content, not its name
    run_gpt2job(args(tmp_path / "prompts.data", tmp_path / "o.h5", vocab_dir), check=0)
    assert not conversions(tmp_path / "o.h5")


def test_run_inference_sh_takes_the_example_text_file(tmp_path, vocab_dir):
    from conftest import require_mpirun
    require_mpirun()
    assert (ROOT / "jobs" / "example_prompts.txt").is_file()
    out = tmp_path / "out.h5"
    p = subprocess.run([str(ROOT / "run_inference.sh"), "jobs/example_prompts.txt", str(out), "--model", MODEL,
                        "--max-new-tokens", "4", "--vocab-dir", vocab_dir], cwd=ROOT, env=job_env(NP=3),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert read_output(out)["done"].all() and "converted to" in p.stderr


def test_run_help_says_it_takes_text_files():
    out = run_gpt2job(["run", "-h"], check=0).stdout
    assert ".txt" in out and ".jsonl" in out and ".prompts-" in out


def test_prompt_files_split_lines_at_newlines_only_and_know_jsonl_in_any_case(tmp_path):
    """A line is what ends at "\n" ("\r\n" too): a JSON string may hold U+2028, a text line a form feed (str.splitlines
    split both); a .JSONL file is JSON lines like a .jsonl one."""
    from gpt2job.files.jsonl_settings import JsonlRows
    from gpt2job.files.prompt_files import prompt_blocks
    src = tmp_path / "UP.JSONL"
    src.write_text('{"prompt": "a\u2028b"}\r\n"c\u0085d"\n', encoding="utf-8")
    assert list(prompt_blocks(str(src), JsonlRows())) == [("text", ["a\u2028b", "c\u0085d"])]
    txt = tmp_path / "pages.txt"
    txt.write_text("page one\x0cpage two\r\nthird\n", encoding="utf-8")
    assert list(prompt_blocks(str(txt), JsonlRows())) == [("text", ["page one\x0cpage two", "third"])]



def test_invalid_prompts_of_a_text_file_name_that_file(tmp_path, vocab_dir):
    """GPT-2's token ids do not fit a model of 1,000 tokens: the error names the user's file, not its conversion."""
    from conftest import TINY_HF
    inp, out = tmp_path / "p.txt", tmp_path / "out.h5"
    inp.write_text(TEXT)
    p = run_gpt2job(["run", inp, out, "--backend", "numpy", "--model", str(TINY_HF), "--vocab-dir", vocab_dir])
    line = assert_one_clear_line(p, f"{inp}: prompts: ", "outside 0..999")
    assert ".prompts-" not in line and files(tmp_path) == ["p.txt"]


def test_a_conversion_killed_mid_write_leaves_nothing_after_the_next_run(tmp_path, vocab_dir):
    """SIGKILL (or SIGTERM) mid-conversion leaves the temporary file; the rerun's conversion removes it, and a job that
    ends well removes those of other versions of the source. A live writer's file stays."""
    import hashlib
    import signal
    import sys
    import time
    from gpt2job.files.prompt_files import _writer
    src, out = tmp_path / "p.txt", tmp_path / "out.h5"
    src.write_text(TEXT, encoding="utf-8")
    target = f"{out}.prompts-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}.h5"
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom gpt2job.files.prompt_files import "
                               "write_atomically\nwrite_atomically(sys.argv[1], lambda f: time.sleep(60), {})", target],
                              cwd=ROOT, env=job_env())
    tag = _writer()[0]   # host and pid namespace
    left = f"{target}.{tag}.{writer.pid}.tmp"
    for _ in range(600):
        if os.path.exists(left) or writer.poll() is not None:
            break
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert os.path.exists(left)
    sleeper = subprocess.Popen(["sleep", "60"])   # a live process's write, and an older source version's dead one
    live = f"{out}.prompts-0123456789ab.h5.{tag}.{sleeper.pid}.tmp"
    other = f"{out}.prompts-0123456789ab.h5.{tag}.{writer.pid}.tmp"
    elsewhere = f"{out}.prompts-0123456789ab.h5.{tag}9.{writer.pid}.tmp"   # another container's: not checked
    for path in (live, other, elsewhere):
        open(path, "wb").close()
    try:
        run_gpt2job(args(src, out, vocab_dir), check=0)
        assert read_output(out)["done"].all()
        assert not os.path.exists(left) and not os.path.exists(other)
        assert os.path.exists(live) and os.path.exists(elsewhere)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("name, content", [("p.txt", "Hello\nWorld\n"), ("p.jsonl", '"Hello"\n{"prompt": "World"}\n')])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, name, content):
    from gpt2job.files.jsonl_settings import JsonlRows
    from gpt2job.files.prompt_files import prompt_blocks
    src = tmp_path / name
    src.write_bytes(b"\xef\xbb\xbf" + content.encode())   # as some editors save UTF-8
    assert list(prompt_blocks(str(src), JsonlRows())) == [("text", ["Hello", "World"])]


def test_a_jsonl_file_gives_each_row_its_own_settings(tmp_path, vocab_dir):
    """The per-row datasets' fields on a JSONL line apply to that row (they were ignored, silently); a line without
    one takes the flag."""
    src, out = tmp_path / "p.jsonl", tmp_path / "out.h5"
    src.write_text('{"tokens": [1, 2, 3], "max_new_tokens": 3, "temperature": 0}\n'
                   '{"tokens": [4, 5], "top_k": 5, "seed": 7, "stop": ["x", "yz"]}\n'
                   '{"tokens": [6, 7, 8], "stop": "q", "repetition_penalty": 1.5}\n[9, 10]\n')
    run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    with h5py.File(tmp_path / "in.h5") as f:
        assert f["max_new_tokens"][()].tolist() == [3, -1, -1, -1]
        assert f["temperature"][()][0] == 0 and np.isnan(f["temperature"][()][1:]).all()
        assert f["seed"][()].tolist() == [-1, 7, -1, -1] and f["top_k"][()].tolist() == [-1, 5, -1, -1]
        assert [[x.decode() for x in r] for r in f["stop"][()]] == [["", ""], ["x", "yz"], ["q", ""], ["", ""]]
    run_gpt2job(["run", src, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 6,
                 "--ignore-eos", "--vocab-dir", vocab_dir], check=0)
    got = read_output(out)
    assert [len(t) for t in got["tokens"]][::3] == [3, 6]   # (rows 1 and 2 may meet their stop strings)
    assert json.loads(got["attrs"]["resume_key"])["row_settings"]["datasets"] == [
        "max_new_tokens", "temperature", "top_k", "seed", "repetition_penalty", "stop"]


@pytest.mark.parametrize("line, frag", [
    ('{"prompt": "a", "max_new_tokens": 0}', "p.jsonl: line 2: max_new_tokens is 0: it must be an integer in 1..2^31"),
    ('{"prompt": "a", "max_new_tokens": 2.5}', "line 2: max_new_tokens is 2.5"),
    ('{"prompt": "a", "temperature": "hot"}', "line 2: temperature is 'hot'"),
    ('{"prompt": "a", "top_p": 1.5}', "line 2: top_p is 1.5: it must be a number in (0, 1]"),
    ('{"prompt": "a", "temperature": 1' + "0" * 400 + '}', "line 2: temperature is 1000"),
    ('{"prompt": "a", "seed": 18446744073709551616}', "line 2: seed is 18446744073709551616"),
    ('{"prompt": "a", "stop": [1]}', "line 2: stop must be a string or a list of strings"),
    ('{"prompt": "a", "stop": ""}', "(not empty, without NUL; for the --stop strings leave the field out or give [])"),
    # a field named almost like a setting ran the row with the flag's value (16 greedy tokens), silently
    ('{"prompt": "a", "temprature": 0.9}', "line 2: field 'temprature' is not a gpt2job setting (did you mean "
                                           "'temperature'?) (fix: name it 'temperature'"),
    ('{"prompt": "a", "max_tokens": 2, "id": 7}', "line 2: field 'max_tokens' is not a gpt2job setting (did you mean "
                                                  "'max_new_tokens'?)"),
    ('{"prompt": "a", "topP": 0.9}', "did you mean 'top_p'?"),
    # a job-wide flag's name: the row went without it, silently
    ('{"prompt": "a", "stop_token_ids": [66]}', "line 2: field 'stop_token_ids' is a setting of the whole job "
                                                "(--stop-token-ids), not of a row (fix: give --stop-token-ids on the "
                                                "command line, or rename it if it is your own data)"),
    ('{"prompt": "a", "ignore_eos": true}', "field 'ignore_eos' is a setting of the whole job (--ignore-eos)"),
])
def test_a_bad_setting_on_a_jsonl_line_is_one_line_naming_it(tmp_path, line, frag):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert_one_clear_line(run_gpt2job(["prompts", src, tmp_path / "in.h5"]), str(src), frag)
    assert files(tmp_path) == ["p.jsonl"]


def test_a_jsonl_empty_stop_list_is_the_flag_s_strings_as_a_missing_field(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a", "stop": []}\n{"prompt": "b"}\n{"prompt": "c", "stop": "."}\n')
    run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    with h5py.File(tmp_path / "in.h5", "r") as f:
        assert [x.decode() for x in f["stop"][()]] == ["", "", "."]   # "": the --stop strings (README)


def test_a_jsonl_field_that_only_resembles_a_setting_is_warned_of_once(tmp_path):
    """'step' (a user's own field, perhaps) resembles 'stop': a warning, once; the file is converted (refusing it, as
    a first form of the check did, broke files that worked)."""
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a", "step": 3, "id": 1}\n{"prompt": "b", "step": 4, "id": 2}\n')
    p = run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    assert p.stderr.count("warning") == 1 and "field 'step' is not a gpt2job setting: ignored (a per-row setting " \
        "is named 'stop')" in p.stderr, p.stderr
    src.write_text('{"prompt": "a", "presence_penalty": 0.5}\n{"prompt": "b", "presence_penalty": 0.5}\n')   # vLLM's
    p = run_gpt2job(["prompts", src, tmp_path / "in.h5", "--overwrite"], check=0)
    assert p.stderr.count("warning") == 1 and "line 1: field 'presence_penalty' is not a gpt2job setting (vLLM's): " \
        "ignored" in p.stderr, p.stderr


def test_validate_takes_a_jsonl_file_as_run_does(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"tokens": [1, 2, 3], "max_new_tokens": 200}\n[4, 5]\n')   # the tiny model: 128 positions
    assert_one_clear_line(run_gpt2job(["validate", src, "--model", TINY_HF]), str(src), "(row 0)",
                          "lower the input's max_new_tokens")
    src.write_text('{"tokens": [1, 2, 3], "max_new_tokens": 20}\n[4, 5]\n')
    p = run_gpt2job(["validate", src, "--model", TINY_HF], check=0)
    assert "2 prompts ('prompt_tokens'), per-row max_new_tokens from the input: valid" in p.stdout
    assert files(tmp_path) == ["p.jsonl"]


def test_text_prompts_tokenize_as_tiktoken_s_encode_batch(vocab_dir):
    """encode_texts (a plain loop: encode_batch's thread pool made reading 1M prompts ~7x slower) gives
    encode_batch's ids, <|endoftext|> written in a prompt included."""
    from gpt2job.model.tokenizer import EOT, encode_texts, load_tokenizer
    enc = load_tokenizer(vocab_dir)
    texts = ["Hello world", "", " spaces  and\ttabs\n", "naïve café ☕", f"a{EOT}b", "1234567890" * 30, "don't"]
    assert encode_texts(enc, texts) == enc.encode_batch(texts, allowed_special={EOT})
    assert 50256 in encode_texts(enc, [f"a{EOT}b"])[0]


def test_a_prompt_file_is_read_a_line_at_a_time_with_the_rules_of_the_whole_file(tmp_path):
    """file_lines: split at \\n only (a \\r before it dropped), a leading byte-order mark dropped, a bad UTF-8 byte
    named by its offset in the file, NUL refused."""
    from gpt2job.errors import UserError
    from gpt2job.files.prompt_files import file_lines
    src = tmp_path / "p.txt"
    src.write_bytes(b"\xef\xbb\xbf" + "one\r\ntwo\u2028\nthree".encode())
    assert list(file_lines(str(src))) == [(1, "one"), (2, "two\u2028"), (3, "three")]
    for data, frag in ((b"ok\n\xffno\n", "not valid UTF-8 (byte 3)"), (b"\xef\xbb\xbfok\n\xff", "(byte 6)"),
                       (b"a\nb\x00\n", "contains NUL characters")):
        src.write_bytes(data)
        with pytest.raises(UserError, match=re.escape(frag)):
            list(file_lines(str(src)))


@pytest.mark.parametrize("tokens", [False, True])
def test_a_prompt_file_is_converted_a_block_at_a_time_with_every_line_checked(tmp_path, monkeypatch, tokens):
    """A text or JSONL file is written a block of BLOCK_LINES prompts at a time (here 3): the same datasets as a file
    of one block (token rows of one length too, which h5py's ds[a:b] = ... refuses), its per-row settings included;
    a bad line in a later block, after blocks were written, refuses the file and leaves no file."""
    import gpt2job.files.prompt_files as P
    from gpt2job.errors import UserError
    lines = [{"tokens": [i, i + 1]} if tokens else {"prompt": f"p{i}"} for i in range(8)]
    lines[4]["temperature"], lines[7]["stop"] = 0.5, ["x", "yy"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(o) + "\n" for o in lines))
    whole, blocks = tmp_path / "whole.h5", tmp_path / "blocks.h5"
    P.convert(str(src), str(whole))
    monkeypatch.setattr(P, "BLOCK_LINES", 3)
    P.convert(str(src), str(blocks))
    with h5py.File(whole) as a, h5py.File(blocks) as b:
        assert sorted(a) == sorted(b) == sorted(["prompt_tokens" if tokens else "prompts", "temperature", "stop"])
        for k in a:
            x, y = a[k][()], b[k][()]
            assert [str(np.asarray(v).tolist()) for v in x] == [str(np.asarray(v).tolist()) for v in y], k   # (NaN)
        assert [t.tolist() for t in b["prompt_tokens"]] == [[i, i + 1] for i in range(8)] if tokens else True
    src.write_text(src.read_text() + '{"prompt": 5}\n')
    with pytest.raises(UserError, match="line 9"):
        P.convert(str(src), str(tmp_path / "bad.h5"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.h5", "p.jsonl", "whole.h5"]


def test_an_unchanged_source_reuses_its_conversion_without_reading_it_again(tmp_path, monkeypatch):
    """A rerun of `run` or `score` on an unchanged text/JSONL file finds its conversion by the file's digest and does
    not parse the file again (1M JSONL lines: ~5 s); a changed file is read and converted anew."""
    import gpt2job.files.prompt_files as P
    from gpt2job.files.conversions import convert_for_run
    from gpt2job.files.score_input import convert_pairs
    src, pairs, out = tmp_path / "p.txt", tmp_path / "pairs.jsonl", str(tmp_path / "out.h5")
    src.write_text("one\ntwo\n")
    pairs.write_text('{"context": "a", "continuation": " b"}\n')
    first, wrote = convert_for_run(str(src), out)
    scored, wrote_pairs = convert_pairs(str(pairs), out)
    assert wrote and wrote_pairs

    def no_reading(*a, **k):
        raise AssertionError("the unchanged source was read again")
    monkeypatch.setattr(P, "file_lines", no_reading)
    assert convert_for_run(str(src), out) == (first, False)
    assert convert_pairs(str(pairs), out) == (scored, False)
    monkeypatch.undo()
    src.write_text("one\ntwo\nthree\n")
    again, wrote = convert_for_run(str(src), out)
    assert wrote and again != first
    with h5py.File(again) as f:
        assert f["prompts"].asstr()[()].tolist() == ["one", "two", "three"]


def test_text_prompts_are_tokenized_in_small_blocks_with_the_digest_of_the_big_ones(tmp_path, monkeypatch, vocab_dir):
    """The master tokenizes a text input TOKENIZE_ROWS prompts at a time (each one's ids are Python lists until
    packed: 1M prompts peaked at 645 MB with blocks of 262,144, 253 MB now); the ids, and the text digest that
    outputs record and export checks (by blocks of BLOCK_ROWS), are those of one block."""
    import gpt2job.files.prompts as P
    from gpt2job.files.read_input import read_prompts
    from gpt2job.model.tokenizer import load_tokenizer
    inp = tmp_path / "in.h5"
    texts = [f"prompt number {i} " * (i % 4 + 1) for i in range(50)]
    with h5py.File(inp, "w") as f:
        f.create_dataset("prompts", data=texts, dtype=h5py.string_dtype("utf-8"))
    one = read_prompts(str(inp), lambda: load_tokenizer(vocab_dir), 50257)
    monkeypatch.setattr(P, "TOKENIZE_ROWS", 4)
    small = read_prompts(str(inp), lambda: load_tokenizer(vocab_dir), 50257)
    assert [small.prompt(i).tolist() for i in range(50)] == [one.prompt(i).tolist() for i in range(50)]
    assert small.text_digest == one.text_digest and small.fingerprint() == one.fingerprint()
    monkeypatch.setattr(P, "BLOCK_ROWS", 16)   # the digest is by blocks of BLOCK_ROWS, tokenizing aside
    assert read_prompts(str(inp), lambda: load_tokenizer(vocab_dir), 50257).text_digest != one.text_digest


def test_prompts_tokenize_loads_no_tokenizer_for_a_file_of_token_prompts(tmp_path):
    """`prompts --tokenize` tokenizes text blocks only: a JSONL file of token lists needs no tokenizer (a review
    found the streamed conversion loading it first, and refusing the file without one)."""
    from gpt2job.files.prompt_files import convert
    src = tmp_path / "t.jsonl"
    src.write_text("[1, 2]\n[3]\n")
    assert convert(str(src), str(tmp_path / "t.h5"), tokenize=True, vocab_dir=str(tmp_path / "no-vocab")) == 0
    with h5py.File(tmp_path / "t.h5") as f:
        assert [r.tolist() for r in f["prompt_tokens"]] == [[1, 2], [3]]


@pytest.mark.parametrize("line", ['{"prompt": "a \\ud800 b"}', '"\\udfff"', '{"prompt": "ok", "stop": ["\\ud83d"]}'])
def test_half_a_surrogate_pair_in_a_jsonl_line_is_one_line_naming_it(tmp_path, line):
    """JSON may spell half a UTF-16 pair (\\ud800), which UTF-8 cannot hold: one line naming the line, no traceback
    from HDF5's write (before: rc 1 and a UnicodeEncodeError), nothing left behind; a whole pair is text."""
    src = tmp_path / "p.jsonl"
    src.write_text('"fine"\n' + line + "\n" + '"\\ud83d\\ude00 pair"\n')
    p = run_gpt2job(["prompts", src, tmp_path / "x.h5"])
    assert_one_clear_line(p, "line 2: holds half a UTF-16 surrogate pair")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.jsonl"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"context": "a", "continuation": "\\ud800"}\n')
    from gpt2job.errors import UserError
    from gpt2job.files.score_input import convert_pairs
    with pytest.raises(UserError, match="line 1: holds half"):
        convert_pairs(str(pairs), str(tmp_path / "out.h5"))


@pytest.mark.parametrize("name, content, frags", [
    ("arr.json", '["The capital of France is", "Hello"]\n', ["a .json file", "one JSON value per line", ".jsonl"]),
    ("table.csv", "a,b\n1,2\n", ["its extension (.csv) is not .txt, .jsonl or .bin", "as a .txt file"]),
    ("notes", "hello\n", ["its extension (none) is not .txt, .jsonl or .bin"]),
])
def test_prompts_refuses_a_source_whose_extension_it_does_not_take(tmp_path, name, content, frags):
    """As `run` does (README: a .txt, .jsonl or .bin source): a JSON array file was one text prompt, exit 0."""
    src = tmp_path / name
    src.write_text(content)
    assert_one_clear_line(run_gpt2job(["prompts", src, tmp_path / "x.h5"]), f"{src}: source: ", *frags)
    assert files(tmp_path) == [name]
    for ok in ("P.TXT", "p.NDJSON"):   # the extensions it takes, in any case
        (tmp_path / ok).write_text('"hello"\n')
        run_gpt2job(["prompts", tmp_path / ok, tmp_path / (ok + ".h5")], check=0)
    (tmp_path / "rows.raw").write_bytes(np.arange(8, dtype="<i4").tobytes())   # --tokens-per-row: a raw file, any name
    run_gpt2job(["prompts", tmp_path / "rows.raw", tmp_path / "raw.h5", "--tokens-per-row", 4], check=0)


def test_prompts_given_an_hdf5_file_says_so_and_that_run_takes_it(tmp_path):
    """Before: `in.h5: source: not valid UTF-8 (byte 0)`. By its signature, whatever its name."""
    src = tmp_path / "p.txt"
    src.write_text("hello\n")
    run_gpt2job(["prompts", src, tmp_path / "in.h5"], check=0)
    (tmp_path / "in.data").write_bytes((tmp_path / "in.h5").read_bytes())
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    before = files(tmp_path)
    for name in ("in.h5", "in.data"):
        line = assert_one_clear_line(run_gpt2job(["prompts", tmp_path / name, tmp_path / "out.h5"]),
                                     f"{tmp_path / name}: source: is already an HDF5 prompts file",
                                     f"python -m gpt2job run {tmp_path / name} OUT.h5")
        assert "UTF-8" not in line
    assert_one_clear_line(run_gpt2job(["prompts", tmp_path / "other.h5", tmp_path / "out.h5"]),
                          "source: is an HDF5 file, not a text, JSONL or raw token file")
    assert files(tmp_path) == before


def test_a_conversion_keeps_its_prompts_ids_and_a_rerun_reads_them_not_the_text(tmp_path, monkeypatch, vocab_dir):
    """A text input's conversion keeps the ids of its prompts (files/token_cache.py): a rerun or resume reads them
    (a million prompts: ~6 s of tokenizing became ~0.8 s, RESULTS.md). They are what tokenizing the text makes, with
    the same text digest; another tokenizer, or a file that is not a conversion, tokenizes the text."""
    import gpt2job.files.prompts as P
    import gpt2job.files.read_input as R
    import gpt2job.model.tokenizer as T
    from gpt2job.files import token_cache
    from gpt2job.files.conversions import convert_for_run
    from gpt2job.files.read_ahead import read_ahead
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt {i} is {'long ' * (i % 7)}\n" for i in range(300)) + "<|endoftext|> too\n")
    conv, created = convert_for_run(str(src), str(tmp_path / "out.h5"), vocab_dir=vocab_dir)
    assert created
    enc = lambda: T.load_tokenizer(vocab_dir)   # noqa: E731
    with h5py.File(conv, "r") as f:
        assert token_cache.GROUP in f
        want = P.read_text_dataset(conv, f["prompts"], enc, 50257)

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(T, "encode_texts", no_tokenizing)
    # the read-ahead probe (a child process) hashes the text as it reads it: this process does not read it again.
    # The child runs this gpt2job, also from a folder holding another (it would lose the hang guard in silence)
    (tmp_path / "elsewhere" / "gpt2job").mkdir(parents=True)
    (tmp_path / "elsewhere" / "gpt2job" / "__init__.py").write_text("raise ImportError('another gpt2job')\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with h5py.File(conv, "r") as f:
        assert read_ahead(conv, 50257)[0] == P.texts_digest(f["prompts"]) == want.text_digest
    monkeypatch.setattr(R, "texts_digest", lambda ds, read=None: pytest.fail("the text read a second time"))
    got = R.read_prompts(conv, enc, 50257)
    monkeypatch.undo()
    monkeypatch.setattr(T, "encode_texts", no_tokenizing)
    assert got.tokens.dtype == want.tokens.dtype == np.uint16 and len(got) == 301
    assert (got.offsets == want.offsets).all() and (got.tokens == want.tokens).all()
    assert got.text_digest == want.text_digest and got.fingerprint() == want.fingerprint()
    assert got.prompt(300)[0] == 50256          # (<|endoftext|> written out is that token, as when tokenized)
    assert R.read_prompts(conv, enc, 1000).tokens.dtype == np.int32   # ids past a small vocabulary: kept as int32
    monkeypatch.setattr(token_cache, "tokenizer_digest", lambda enc: "another")
    with pytest.raises(AssertionError, match="tokenized again"):      # another tokenizer: the text is read
        R.read_prompts(conv, enc, 50257)


def test_kept_ids_of_a_conversion_edited_afterwards_are_not_used(tmp_path, vocab_dir):
    """A conversion whose text was changed after it was written (copied and edited, then given to `run`) is
    tokenized anew: its kept ids are checked against the text's digest (a QA run found the old ids used, an empty
    prompt let through and the output recording the old digest)."""
    import shutil
    src, out = tmp_path / "p.txt", tmp_path / "a.h5"
    src.write_text("The capital of France is\nOnce upon a time\nWater boils at\n")
    run_gpt2job(args(src, out, vocab_dir))
    edited = tmp_path / "edited.h5"
    shutil.copy(out.parent / conversions(out)[0], edited)
    with h5py.File(edited, "a") as f:
        assert "token_cache" in f
        f["prompts"][0] = "A completely different prompt"
    fresh = tmp_path / "fresh.h5"
    with h5py.File(fresh, "w") as f:
        f.create_dataset("prompts", data=["A completely different prompt", "Once upon a time", "Water boils at"],
                         dtype=h5py.string_dtype("utf-8"))
    run_gpt2job(args(edited, tmp_path / "e.h5", vocab_dir))
    run_gpt2job(args(fresh, tmp_path / "f.h5", vocab_dir))
    same_result(tmp_path / "e.h5", tmp_path / "f.h5")
    with h5py.File(edited, "a") as f:
        f["prompts"][1] = ""
    assert_one_clear_line(run_gpt2job(args(edited, tmp_path / "e2.h5", vocab_dir)), "1 empty (row 1)")


def test_ids_are_read_only_from_a_conversion_and_one_made_without_a_tokenizer_has_none(tmp_path, monkeypatch,
                                                                                       vocab_dir):
    from gpt2job.files import token_cache
    from gpt2job.files.conversions import convert_for_run
    from gpt2job.files.read_input import read_prompts
    from gpt2job.model.tokenizer import load_tokenizer
    enc = lambda: load_tokenizer(vocab_dir)   # noqa: E731
    inp = tmp_path / "mine.h5"    # a user's file with the group: its text is what counts (it may have been edited)
    with h5py.File(inp, "w") as f:
        f.create_dataset("prompts", data=["Hello there", "Bye"], dtype=h5py.string_dtype("utf-8"))
        token_cache.write(f, [0, 1, 2], [7, 8], "sha256:x", enc())
    assert read_prompts(str(inp), enc, 50257).prompt(1).tolist() == enc().encode("Bye")
    monkeypatch.delenv("GPT2_VOCAB_DIR", raising=False)
    src = tmp_path / "p.txt"
    src.write_text("Hello there\nBye\n")
    conv, _ = convert_for_run(str(src), str(tmp_path / "out.h5"), vocab_dir=str(tmp_path / "no-vocab"))
    with h5py.File(conv, "r") as f:
        assert list(f) == ["prompts"]
    assert read_prompts(conv, enc, 50257).prompt(1).tolist() == enc().encode("Bye")


def test_validate_in_converts_a_text_file_without_keeping_its_ids(tmp_path, monkeypatch, vocab_dir):
    """`validate IN`'s conversion is read once and thrown away: it tokenizes the text once, keeping no ids."""
    import io
    from gpt2job.files import token_cache
    from gpt2job.files.input_check import check_input

    def no_keeping(*a, **k):
        raise AssertionError("ids kept")
    monkeypatch.setattr(token_cache, "write", no_keeping)
    src = tmp_path / "p.txt"
    src.write_text("Hello there\nBye\n")
    out = io.StringIO()
    assert check_input(str(src), MODEL, 6, vocab_dir, out) == 0 and "2 prompts" in out.getvalue()
