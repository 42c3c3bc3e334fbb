"""Per-row settings (the input's max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty, stop datasets),
--stop / --stop-token-ids / --repetition-penalty, and the output's text cut at stop strings with its stop_reason."""
import json

import h5py
import numpy as np
import pytest

from conftest import TINY_HF, read_output, run_gpt2job, write_token_input
from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, Completions
from gpt2job.errors import UserError
from gpt2job.files.row_settings import read_row_settings
from gpt2job.files.row_stops import StopTable
from gpt2job.settings import JobSettings

SMALL = "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257"
N = 6


def make_input(path, **datasets):
    """A token input of N prompts plus the given per-row datasets (name -> array, or (array, dtype))."""
    write_token_input(path, [list(range(1, 3 + i)) for i in range(N)])
    with h5py.File(path, "a") as f:
        for name, v in datasets.items():
            if name == "stop":
                f.create_dataset(name, data=v, dtype=h5py.string_dtype())
            else:
                f[name] = v


def settings(path, **kw):
    return JobSettings(input=str(path), output=str(path) + ".out", **kw)


def assert_one_clear_line(p, *fragments):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("gpt2job: error: ")]
    assert len(errors) == 1, p.stderr
    for frag in fragments:
        assert frag in errors[0], errors[0]


# ---------------------------------------------------------------- reading, defaults, checks

def test_no_datasets_means_no_row_settings(tmp_path):
    make_input(tmp_path / "in.h5")
    assert read_row_settings(tmp_path / "in.h5", N, settings(tmp_path / "in.h5")) is None


def test_values_resolve_against_the_flags(tmp_path):
    inp = tmp_path / "in.h5"
    make_input(inp, max_new_tokens=np.array([2, -1, 5, 3, -7, 8], np.int16),
               temperature=np.array([0, np.nan, 1.0, 0.5, 0, 2], np.float64),
               top_k=np.array([np.nan, 3, 0, 4, np.nan, 1]),              # a float dataset of whole numbers
               top_p=np.array([-1, 1, -1, -1, -1, -1], np.int8),            # an integer dataset: negative is none
               seed=np.array([2 ** 63 - 1, 0, 5, -1, 1, 2], np.int64),
               repetition_penalty=np.array([1.2, np.nan, 1, 0.5, 3, np.nan], np.float32),
               stop=np.array([["", ""], ["a", ""], ["b", "cd"], ["", ""], ["é", ""], ["", "x"]], object))
    s = settings(inp, max_new_tokens=4, temperature=0.7, top_k=9, top_p=0.9, seed=11, repetition_penalty=1.1,
                 stop=("END",))
    rs = read_row_settings(inp, N, s)
    assert rs.given == ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "stop")
    assert rs.max_new_tokens.tolist() == [2, 4, 5, 3, 4, 8]
    assert rs.values["temperature"].tolist() == pytest.approx([0, 0.7, 1, 0.5, 0, 2])
    assert rs.values["top_k"].tolist() == [9, 3, 0, 4, 9, 1]
    assert rs.values["top_p"].tolist() == pytest.approx([0.9, 1, 0.9, 0.9, 0.9, 0.9])
    assert rs.values["seed"].tolist() == [2 ** 63 - 1, 0, 5, 11, 1, 2]
    assert rs.values["repetition_penalty"].tolist() == pytest.approx([1.2, 1.1, 1, 0.5, 3, 1.1])
    # a chunk's rows, in the scheduler's (length) order: every field and each row's stops, "" -> --stop
    p = rs.params([5, 0, 2, 4])
    assert p.max_new_tokens.tolist() == [8, 2, 5, 4] and p.seed.dtype == np.int64
    assert list(p.all_stops()) == [("x",), ("END",), ("b", "cd"), ("é",)]
    # without a stop dataset every row has --stop; the fingerprint follows the datasets and the flags
    make_input(tmp_path / "b.h5", seed=np.array([1, 2, 3, 4, 5, 6]))
    rb = read_row_settings(tmp_path / "b.h5", N, s)
    assert list(rb.params([0, 1]).all_stops()) == [("END",), ("END",)]
    assert rb.key()["datasets"] == ["seed"]
    assert read_row_settings(tmp_path / "b.h5", N, s).fingerprint == rb.fingerprint
    assert read_row_settings(tmp_path / "b.h5", N, settings(inp, seed=12)).fingerprint != rb.fingerprint
    with h5py.File(tmp_path / "b.h5", "a") as f:
        f["seed"][3] = 7
    assert read_row_settings(tmp_path / "b.h5", N, s).fingerprint != rb.fingerprint


@pytest.mark.parametrize("name, data, frag", [
    ("max_new_tokens", np.array([1, 2, 0, 0, 3, 4], np.int32),
     "row 2 is 0: each value must be an integer in 1..2^31-1 (2 rows"),
    ("max_new_tokens", np.array([1, 2, 2.5, 1, 1, 1]), "row 2 is 2.5: each value must be an integer in 1..2^31-1"),
    ("max_new_tokens", np.array([1, 2 ** 40, 1, 1, 1, 1], np.int64), "row 1 is 1099511627776"),
    ("temperature", np.array([0, 0, 0, np.inf, 0, -0.5]), "row 3 is inf: each value must be a finite number >= 0 "
     "(below 1e-05: greedy) (2 rows"),
    ("repetition_penalty", np.array([1, 1, 1, 1, 1e300, 1]), "row 4 is 1e+300"),   # beyond float32: refused
    ("top_k", np.array([1, 1, 1, 1, 1, -2.0]), "row 5 is -2.0: each value must be an integer in 0..2^31-1"),
    ("top_p", np.array([1, 0, 1, 1, 1.5, 1], np.float32), "row 1 is 0.0: each value must be a number in (0, 1] (2 rows"),
    ("seed", np.array([0, 2 ** 63, 0, 0, 0, 0], np.uint64), "row 1 is 9223372036854775808: each value must be an integer in 0..2^63-1"),
    ("repetition_penalty", np.array([1, 1, 1, 1, 1, 0]), "row 5 is 0: each value must be a finite number > 0"),
    ("temperature", np.zeros(5), "has shape (5,): it must be [N] with N = 6"),
    ("temperature", np.zeros((6, 2)), "has shape (6, 2): it must be [N]"),
    ("temperature", np.zeros(6, bool), "has dtype bool: it must be numbers (fix: write it as integers or floats, "),
    ("stop", np.zeros((6, 2, 2), object), "has shape (6, 2, 2): it must be [N] or [N, K] with N = 6, one entry per "
     "prompt (fix: write stop strings as variable-length UTF-8 strings"),   # (not the numbers' fix: NaN, -1)
    ("stop", np.array([b"", b"ok", b"\xff\xfe", b"", b"", b""], object), "row 2 is b'\\xff\\xfe': each stop string must be UTF-8 text without NUL (1 string"),
])
def test_bad_values_name_the_dataset_and_the_first_row(tmp_path, name, data, frag):
    inp = tmp_path / "in.h5"
    make_input(inp)
    with h5py.File(inp, "a") as f:
        if name == "stop" and data.ndim == 3:
            f.create_dataset(name, data=np.full((6, 2, 2), "a", object), dtype=h5py.string_dtype())
        elif name == "stop":
            f.create_dataset(name, data=data, dtype=h5py.string_dtype(encoding="ascii"))
        else:
            f[name] = data
    with pytest.raises(UserError) as e:
        read_row_settings(inp, N, settings(inp))
    assert f"{inp}: {name}: " in str(e.value) and frag in str(e.value), str(e.value)


def test_the_least_temperature_as_float32_is_taken_and_one_below_it_is_greedy(tmp_path):
    """As vLLM: a temperature below 1e-5 is greedy (1 / T times a logit overflows float32 at 1e-39: every worker
    failed; such a row was refused after that)."""
    inp = tmp_path / "in.h5"
    temps = np.array([0, 1e-5, 1, np.nan, 1e-39, 9.9e-6], np.float32)   # float32(1e-5) < 1e-5
    make_input(inp, temperature=temps)
    got = read_row_settings(inp, N, settings(inp, temperature=0.5)).values["temperature"]
    assert got.tolist() == np.array([0, 1e-5, 1, 0.5, 0, 0], np.float32).tolist()


@pytest.mark.parametrize("name, frag", [
    ("temprature", "temprature: is not a gpt2job setting (did you mean 'temperature'?) (fix: name it 'temperature'"),
    ("max_tokens", "max_tokens: is not a gpt2job setting (did you mean 'max_new_tokens'?)"),
    ("topP", "did you mean 'top_p'?"),
    ("stop_token_ids", "stop_token_ids: is a setting of the whole job (--stop-token-ids), not of a row"),
    ("num_samples", "(fix: give --num-samples on the command line, or rename it if it is your own data)"),
])
def test_a_misnamed_per_row_dataset_is_refused_as_in_jsonl(tmp_path, name, frag, capsys):
    """Its rows ran with the flag's value, silently (a JSONL line's field of that name was refused); a dataset that only
    resembles a setting (seeds) is said once and ignored, and the user's own datasets pass without a word."""
    inp = tmp_path / "in.h5"
    make_input(inp, **{name: np.full(N, 0.5)})
    with pytest.raises(UserError) as e:
        read_row_settings(inp, N, settings(inp))
    assert str(e.value).startswith(f"{inp}: {name}: ") and frag in str(e.value), str(e.value)
    make_input(inp, seeds=np.arange(N), ids=np.arange(N), meta=np.zeros(N))
    assert read_row_settings(inp, N, settings(inp)) is None
    assert capsys.readouterr().err == f"gpt2job: warning: {inp}: dataset 'seeds' is not a gpt2job setting: ignored " \
        "(a per-row setting is named 'seed')\n"


def test_rows_with_their_own_top_k_top_p_or_seed_that_decode_greedily_are_warned_of(tmp_path, capsys):
    """As the flags' warning (cli): a row's top_k, top_p or seed does nothing where its temperature is 0, its own or
    the flag's; they ran greedily without a word (vLLM's temperature defaults to 1)."""
    inp = tmp_path / "in.h5"
    make_input(inp, top_k=np.array([3, 3, -1, 3, 3, 3]), temperature=np.array([0, np.nan, 0, 0.7, np.nan, 1e-6]))
    read_row_settings(inp, N, settings(inp))
    assert capsys.readouterr().err == f"gpt2job: warning: {inp}: 4 rows with their own top_k decode greedily " \
        "(temperature 0: their own or --temperature's), where those have no effect; give them a temperature >= " \
        "1e-05 to sample\n"
    read_row_settings(inp, N, settings(inp, temperature=0.5))   # rows 1 and 4 take 0.5: two greedy rows left
    assert "2 rows with their own top_k" in capsys.readouterr().err
    make_input(inp, top_k=np.full(N, 3), temperature=np.full(N, 0.8))
    read_row_settings(inp, N, settings(inp))
    assert capsys.readouterr().err == ""


def test_a_refused_start_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    make_input(inp, top_p=np.array([1, 1, 1, np.nan, 2, 1]))
    p = run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "synthetic"])
    assert_one_clear_line(p, str(inp), "top_p", "row 4 is 2.0", "(1 row bad)")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.h5"]


def test_a_prompt_too_long_for_its_own_max_new_tokens_says_to_lower_that(tmp_path):
    inp = tmp_path / "in.h5"
    make_input(inp, max_new_tokens=np.array([1, 1, 200, -1, 1, 1], np.int32))   # the tiny model: 128 positions
    p = run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", TINY_HF, "--backend", "synthetic"])
    assert_one_clear_line(p, str(inp), "1 too long for the room their own max_new_tokens leaves", "(row 2)",
                          "lower the input's max_new_tokens (--max-new-tokens for rows without one)")


@pytest.mark.parametrize("flags, frag", [
    (["--stop", ""], "--stop must be non-empty"),
    (["--stop-token-ids", "3,x"], "--stop-token-ids must be integers"),
    (["--stop-token-ids", "-3"], "token ids >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be in (0"),
    (["--stop-token-ids", "5", "1000"], "--stop-token-ids: 1000 outside the vocabulary 0..999"),
])
def test_bad_stop_and_penalty_flags(tmp_path, flags, frag):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    make_input(inp)
    p = run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "synthetic"] + flags)
    assert_one_clear_line(p, frag)
    assert not out.exists()


def test_each_row_has_room_for_its_own_max_new_tokens(tmp_path):
    """TINY_HF has 128 positions: a 120-token prompt fits 9 new tokens, not 10; --skip-invalid marks it."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[5] * 120, [5] * 120, [1, 2]])
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"] = np.array([9, 10, 100], np.int32)
    base = ["run", inp, out, "--model", TINY_HF, "--backend", "synthetic", "--max-new-tokens", "2"]
    assert_one_clear_line(run_gpt2job(base), "1 of 3 prompts is invalid", "too long for the room their own "
                          "max_new_tokens leaves", "(row 1)")
    run_gpt2job(base + ["--skip-invalid", "--ignore-eos"], check=0)
    res = read_output(out)
    assert res["finish"] == ["length", "invalid", "length"]
    assert [len(t) for t in res["tokens"]] == [9, 0, 100]


# ---------------------------------------------------------------- the job: chunks, dedup, resume key

def test_job_with_row_settings_dedups_nothing_and_resumes_only_identical(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]] * 4 + [[4, 5]] * 2)           # greedy copies, which dedup would share
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"] = np.array([1, 2, 3, -1, 5, 6], np.int32)
    cmd = ["run", inp, out, "--model", TINY_HF, "--backend", "synthetic", "--ignore-eos", "--chunk-size", "2"]
    p = run_gpt2job(cmd, check=0)
    assert "up to 33 new in all; per-row max_new_tokens from the input; no dedup" in p.stderr
    res = read_output(out)
    assert [len(t) for t in res["tokens"]] == [1, 2, 3, 16, 5, 6]              # -1: --max-new-tokens (16)
    assert res["tokens"][1].tolist() == res["tokens"][3][:2].tolist()     # same prompt, own length
    summary = json.loads(res["attrs"]["summary"])
    assert summary["duplicate_prompts"] == 0 and summary["generated_tokens"] == 33
    key = json.loads(res["attrs"]["resume_key"])
    assert key["row_settings"]["datasets"] == ["max_new_tokens"]
    assert "already complete" in run_gpt2job(cmd, check=0).stderr
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"][0] = 2
    assert_one_clear_line(run_gpt2job(cmd), "(the values of the input's per-row settings (max_new_tokens) are not "
                                            "those it was started with)", "--overwrite")   # (a fingerprint before)
    run_gpt2job(cmd + ["--overwrite"], check=0)
    assert len(read_output(out)["tokens"][0]) == 2
    # the same input without per-row datasets: the key has no row_settings (outputs made before them resume)
    out2 = tmp_path / "plain.h5"
    write_token_input(inp, [[1, 2, 3]] * 2)
    run_gpt2job(["run", inp, out2, "--model", TINY_HF, "--backend", "synthetic"], check=0)
    assert "row_settings" not in json.loads(read_output(out2)["attrs"]["resume_key"])
    assert "stop_reason" not in h5py.File(out2, "r")


def test_stop_token_ids_end_rows_and_are_named_in_stop_reason(tmp_path):
    inp, out, js = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "o.jsonl"
    write_token_input(inp, [[i, i + 1] for i in range(40)])
    base = ["run", inp, tmp_path / "free.h5", "--model", TINY_HF, "--backend", "synthetic", "--ignore-eos",
            "--max-new-tokens", "8"]
    run_gpt2job(base, check=0)
    free = read_output(tmp_path / "free.h5")["tokens"]
    ids = sorted({int(t[2]) for t in free[:10]})                      # ids some rows generate third
    base[2] = out
    run_gpt2job(base + ["--stop-token-ids", ",".join(map(str, ids))], check=0)
    res = read_output(out)
    with h5py.File(out, "r") as f:
        reasons = [x.decode() for x in f["stop_reason"][()]]
    for t, fin, why, want in zip(res["tokens"], res["finish"], reasons, free):
        hit = np.flatnonzero(np.isin(want, ids))
        if len(hit):
            assert fin == "stop" and t.tolist() == want[:hit[0] + 1].tolist() and why == str(want[hit[0]])
        else:
            assert fin == "length" and why == ""
    run_gpt2job(["export", out, js], check=0)
    got = [json.loads(x) for x in js.read_text().splitlines()]
    assert [g["stop_reason"] for g in got] == reasons
    keys = list(got[0])
    assert keys.index("stop_reason") == keys.index("finish_reason") + 1


# ---------------------------------------------------------------- the writer: text cut at stop strings

def _write(tmp_path, vocab_dir, comps, stops, per_row=None, kind="thread"):
    """An output of N rows written by the writer (thread or process) from these Completions; -> its completions,
    text_exact, stop_reason and finish_reason."""
    from gpt2job.files.h5write import make_header, token_text
    from gpt2job.files.journal import Journal
    from gpt2job.files.writer import WriterProcess, WriterThread
    inp = tmp_path / "in.h5"
    make_input(inp) if per_row is None else make_input(inp, stop=per_row)
    st = {"stop": list(stops), "stop_token_ids": [13], "eos": 50256, "input": str(inp) if per_row is not None else None}
    header = make_header(str(tmp_path / f"out-{kind}.h5"), N, {"k": 1}, {}, True, vocab_dir, 60, st)
    w = (WriterThread(header, np.ones(N, np.int32), token_text(header)) if kind == "thread" else
         WriterProcess(header, np.ones(N, np.int32)))
    w.put(comps, Journal.encode(comps))
    w.finish({})
    with h5py.File(header["path"], "r") as f:
        return ([x.decode() for x in f["completions"][()]], f["text_exact"][()].tolist(),
                [x.decode() for x in f["stop_reason"][()]], [x.decode() for x in f["finish_reason"][()]])


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_writer_cuts_text_before_the_earliest_stop_string(tmp_path, vocab_dir, kind):
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    texts = ["Hello world, and then some", "one two three four", "ünïcode stop here", "plain text"]
    toks = [enc.encode(t) for t in texts]
    # row 0: ", and" spans tokens ("," then " and"), "world" comes earlier and wins; row 1 stopped at id 13 ("."),
    # kept in the tokens, left out of the text, whose stop string cuts it too; row 2 per-row stop inside a
    # multi-byte token; row 3 ran to its length: never cut
    toks[1] = toks[1] + [13]
    finish = [FINISH_STOP_STRING, FINISH_STOP, FINISH_STOP_STRING, FINISH_LENGTH]
    comps = [Completions.from_lists(0, [0, 1, 2, 3], toks, finish)]
    per_row = np.array([["", ""], ["", ""], ["code s", "ï"], ["", ""], ["", ""], ["", ""]], object)
    text, exact, why, fin = _write(tmp_path, vocab_dir, comps, [", and", "o w", "three"], per_row, kind)
    assert text[:4] == ["Hell", "one two ", "ün", "plain text"]
    assert why[:4] == ["o w", "three", "ï", ""]
    assert exact[:4] == [1, 1, 1, 1] and fin[:4] == ["stop", "stop", "stop", "length"]


def test_reading_back_an_output_without_journal_keeps_both_stop_codes(tmp_path, vocab_dir):
    from gpt2job.files.h5read import records_from_h5
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    toks = [enc.encode("a b c"), enc.encode("x y") + [13], enc.encode("q") + [50256], [1, 2]]
    finish = [FINISH_STOP_STRING, FINISH_STOP, FINISH_STOP, FINISH_LENGTH]
    _write(tmp_path, vocab_dir, [Completions.from_lists(0, [0, 1, 2, 3], toks, finish)], [" b"])
    (got,) = list(records_from_h5(str(tmp_path / "out-thread.h5")))
    assert got.finish.tolist() == finish


def test_stop_table_falls_back_to_the_job_stops():
    so = np.array([0, 0, 2, 2], np.int64)
    t = StopTable(("x", "yy"), so, np.frombuffer(b"a\0", np.uint8), ids=(5,), eos=50256)
    assert [t.of(i) for i in range(3)] == [("x", "yy"), ("a",), ("x", "yy")]
    assert t.id_reason(5) == "5" and t.id_reason(50256) == "" and t.id_reason(7) == ""


# ---------------------------------------------------------------- end to end with the NumPy backend

def test_numpy_job_with_row_settings_and_stops(tmp_path, vocab_dir):
    """Per-row datasets and --stop through the NumPy backend: each row's limit, each row's stops, text cut."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    make_input(inp, max_new_tokens=np.array([2, -1, 5, 3, -1, 8], np.int32),
               temperature=np.array([0, np.nan, 0.8, 0, 0, 0], np.float32))
    base = ["run", inp, tmp_path / "free.h5", "--model", SMALL, "--backend", "numpy", "--max-new-tokens", "4",
            "--vocab-dir", vocab_dir, "--ignore-eos"]
    run_gpt2job(base, check=0)
    free = read_output(tmp_path / "free.h5")
    assert [len(t) for t in free["tokens"]] == [2, 4, 5, 3, 4, 8]
    # a stop string made of the end of row 5's first token and the start of its second
    t5 = free["text"][5]
    from gpt2job.model.tokenizer import load_tokenizer
    first = load_tokenizer(vocab_dir).decode([int(free["tokens"][5][0])])
    stop = first[-2:] + t5[len(first):len(first) + 2]
    with h5py.File(inp, "a") as f:
        f.create_dataset("stop", data=np.array(["", "", "", "", "", stop], object), dtype=h5py.string_dtype())
    base[2] = out
    run_gpt2job(base, check=0)
    res = read_output(out)
    with h5py.File(out, "r") as f:
        why = [x.decode() for x in f["stop_reason"][()]]
    assert res["finish"][5] == "stop" and why[5] == stop
    assert res["text"][5] == t5[:t5.index(stop)] and len(res["tokens"][5]) == 2
    assert all(a.tolist() == b.tolist() for a, b in zip(res["tokens"][:5], free["tokens"][:5]))


def test_validate_checks_an_input_file_as_run_would(tmp_path):
    inp = tmp_path / "in.h5"
    make_input(inp, max_new_tokens=np.array([1, 2, 3, 4, 5, -1], np.int32))
    p = run_gpt2job(["validate", inp, "--model", TINY_HF], check=0)
    assert "6 prompts ('prompt_tokens'), per-row max_new_tokens from the input: valid for" in p.stdout
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"][2] = 127          # TINY_HF: 128 positions, row 2 has 4 prompt tokens
    assert_one_clear_line(run_gpt2job(["validate", inp, "--model", TINY_HF]), "1 of 6 prompts is invalid", "(row 2)")
    with h5py.File(inp, "a") as f:
        f["seed"] = np.array([0, 1, 2, 3, 4, 1.5])
    assert_one_clear_line(run_gpt2job(["validate", inp, "--model", TINY_HF]), "seed: row 5 is 1.5")


def test_a_worker_builds_the_stop_token_table_before_it_is_ready(tmp_path, vocab_dir):
    """With a `stop` dataset (or --stop) the worker builds the stop strings' token table at start-up (about half a
    second) and runs a matcher once, so that the first chunk does not; without stop strings it does not load the
    tokenizer at all."""
    from gpt2job.cluster.worker import build_backend
    from gpt2job.files.row_stops import may_have_stops
    from gpt2job.model.stops import token_bytes
    plain, stopped, text = tmp_path / "plain.h5", tmp_path / "stop.h5", tmp_path / "p.txt"
    make_input(plain)
    make_input(stopped, stop=np.array(["x"] * N, object))
    text.write_text("a prompt\n")
    # a JSONL input: a worker's s.input is the user's file (only the master converts it; the HDF5 check of it failed,
    # so per-row stops from JSONL were prepared inside the first chunk)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "stop": "x"}\n')
    assert [may_have_stops(p) for p in (plain, stopped, text, jsonl)] == [False, True, False, True]
    token_bytes.cache_clear()
    build_backend(settings(plain, model=SMALL, backend="numpy", vocab_dir=vocab_dir), 0)
    assert token_bytes.cache_info().currsize == 0
    for s in (settings(stopped, model=SMALL, backend="numpy", vocab_dir=vocab_dir),
              settings(plain, model=SMALL, backend="numpy", vocab_dir=vocab_dir, stop=("y",))):
        token_bytes.cache_clear()
        build_backend(s, 0)
        assert token_bytes.cache_info().currsize == 1
        assert token_bytes.cache_info().hits == 0
        table = token_bytes(vocab_dir, 50257)           # what StopStrings.of asks for: built already
        assert token_bytes.cache_info().hits == 1
        assert table.last_words.cache_info().currsize == 1   # and a matcher ran once (stops.prepare)
    # no tokenizer: the worker still starts (only a chunk whose rows have stop strings needs it, and says so)
    build_backend(settings(stopped, model=SMALL, backend="numpy", vocab_dir=str(tmp_path / "none")), 0)


def test_a_row_without_a_value_draws_exactly_as_the_job_wide_flag(tmp_path):
    """Per-row temperature / top_p are float64, as the flags: a row that takes the flag's value (NaN) samples the
    same tokens as a job without the dataset (float32 would round 0.7 and 0.9 and could change a draw)."""
    from gpt2job.model.sampling import RowSettings, select_rows, select_tokens
    inp = tmp_path / "in.h5"
    make_input(inp, temperature=np.full(N, np.nan, np.float32), top_p=np.full(N, np.nan, np.float32))
    s = settings(inp, temperature=0.7, top_p=0.9, top_k=0, seed=3)
    rows = read_row_settings(inp, N, s)
    p = rows.params(np.arange(N))
    assert p.temperature.dtype == np.float64 and (p.temperature == 0.7).all() and (p.top_p == 0.9).all()
    rs = RowSettings.of(p, s.generation(50256), N)
    lg = np.random.default_rng(0).standard_normal((N, 50257)).astype(np.float32)
    ids = np.arange(N) * 11
    for step in range(4):
        job = select_tokens(lg, ids, step, s.generation(50256).sampling)
        np.testing.assert_array_equal(select_rows(lg, ids, step, rs), job)


def test_a_max_new_tokens_flag_no_row_takes_is_not_checked(tmp_path):
    """Every row has its own max_new_tokens: the flag's value leaves no room for a prompt, but no row takes it (it
    was refused before the input was read); a row without its own value still is."""
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3], [4, 5]])
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"] = np.array([2, 3], np.int32)
    cmd = ["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", "100000", "--ignore-eos"]
    run_gpt2job(cmd, check=0)
    assert [len(t) for t in read_output(out)["tokens"]] == [2, 3]
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"][1] = -1   # this row takes the flag
    p = run_gpt2job(cmd + ["--overwrite"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and "row 1" in p.stderr, p.stderr
