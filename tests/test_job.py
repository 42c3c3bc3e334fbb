"""End-to-end jobs: one process, and under mpirun with 1, 2, 3 and 4 ranks."""
import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from conftest import (ROOT, TINY_HF, TINY_TEXT_MODEL, job_env, read_output, run_gpt2job, write_token_input,
                      require_mpirun)
from test_inputs import assert_one_clear_line

@pytest.fixture
def token_input(tmp_path, expected):
    path = tmp_path / "in.h5"
    write_token_input(path, expected.prompts)
    return path


def check_matches_transformers(out_path, expected):
    out = read_output(out_path)
    assert out["done"].all()
    for got, want, fin in zip(out["tokens"], expected.gen, out["finish"]):
        assert got.tolist() == want.tolist()
        assert fin == ("stop" if want[-1] == expected.eos else "length")
    assert out["attrs"]["finished"] == 1


@pytest.mark.parametrize("np_", [None, 1, 2, 4])
def test_greedy_job_matches_transformers(tmp_path, token_input, expected, np_):
    out = tmp_path / "out.h5"
    p = run_gpt2job(["run", token_input, out, "--model", TINY_HF, "--max-new-tokens", expected.max_new,
                     "--backend", "numpy", "--chunk-size", 2], np_=np_, check=0)
    assert "generated tokens/s" in p.stdout
    check_matches_transformers(out, expected)


def test_sampling_is_identical_across_ranks_and_chunk_sizes(tmp_path, token_input):
    outs = []
    for np_, chunk in ((None, 0), (2, 1), (3, 5), (4, 3)):
        out = tmp_path / f"s{np_}-{chunk}.h5"
        run_gpt2job(["run", token_input, out, "--model", TINY_HF, "--max-new-tokens", 8, "--backend", "numpy",
                     "--temperature", 1.5, "--top-k", 40, "--top-p", 0.95, "--seed", 1234, "--chunk-size", chunk],
                    np_=np_, check=0)
        outs.append([t.tolist() for t in read_output(out)["tokens"]])
    assert all(o == outs[0] for o in outs[1:])
    greedy = tmp_path / "g.h5"
    run_gpt2job(["run", token_input, greedy, "--model", TINY_HF, "--max-new-tokens", 8, "--backend", "numpy"],
                check=0)
    assert [t.tolist() for t in read_output(greedy)["tokens"]] != outs[0]


def test_text_prompts_end_to_end(tmp_path, vocab_dir):
    src = tmp_path / "p.txt"
    src.write_text("Hello world\nThe quick brown fox jumps\n\nÜber café ☕ and 漢字\n<|endoftext|>Once upon\n",
                   encoding="utf-8")
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    run_gpt2job(["prompts", src, inp, "--vocab-dir", vocab_dir], check=0)
    with h5py.File(inp) as f:
        assert [s.decode() for s in f["prompts"][()]][2] == "Über café ☕ and 漢字"
    run_gpt2job(["run", inp, out, "--model", TINY_TEXT_MODEL, "--max-new-tokens", 5, "--vocab-dir", vocab_dir,
                 "--ignore-eos"], np_=3, check=0)
    res = read_output(out)
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    assert len(res["tokens"]) == 4
    for toks, text, exact in zip(res["tokens"], res["text"], res["text_exact"]):
        assert len(toks) == 5
        raw = enc.decode_bytes(toks.tolist())
        if exact:
            assert text == raw.decode("utf-8")
        else:
            assert text == raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    shown = run_gpt2job(["show", out, "--limit", 2], check=0).stdout
    assert "4 of 4 rows done, finished" in shown
    for i in range(2):   # each row shown with its own tokens and text
        line = next(x for x in shown.splitlines() if x.startswith(f"[{i}] "))
        assert f" {res['tokens'][i].tolist()}  {res['text'][i]!r}" in line, line


def test_two_dimensional_token_input_and_tokens_win_over_text(tmp_path, expected):
    prompts = [p for p in expected.prompts if len(p) >= 5][:4]
    arr = np.stack([p[:5] for p in prompts]).astype(np.int32)
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(inp, "w") as f:
        f["prompt_tokens"] = arr
        f.create_dataset("prompts", data=["ignored"] * 4, dtype=h5py.string_dtype())
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--max-new-tokens", 3], check=0)
    from gpt2job.settings import GenerationSettings
    from gpt2job.backends.numpy_backend import generate_batch
    from gpt2job.model.weights import load_params
    want, _ = generate_batch(load_params(str(TINY_HF)), list(arr), np.arange(4),
                             GenerationSettings(max_new_tokens=3, eos_token_id=expected.eos))
    assert [t.tolist() for t in read_output(out)["tokens"]] == want


def test_run_inference_sh_by_hand_and_under_mpirun(tmp_path, token_input, expected):
    require_mpirun()
    env = job_env(NP=3)
    out = tmp_path / "a.h5"
    args = [str(token_input), str(out), "--model", str(TINY_HF), "--max-new-tokens", str(expected.max_new)]
    p = subprocess.run([str(ROOT / "run_inference.sh")] + args, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    check_matches_transformers(out, expected)
    out2 = tmp_path / "b.h5"
    args[1] = str(out2)
    p = subprocess.run(["mpirun", "-np", "3", "--oversubscribe", "--hostfile", str(ROOT / "hostfile"),
                        str(ROOT / "run_inference.sh")] + args, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    check_matches_transformers(out2, expected)
    assert "rank 2" in p.stdout


def test_validate_against_answer_file(tmp_path, token_input, expected):
    out = tmp_path / "out.h5"
    answer = tmp_path / "answer.bin"
    np.asarray(expected.greedy_ignore_eos, "<i4").tofile(answer)
    p = run_gpt2job(["run", token_input, out, "--model", TINY_HF, "--max-new-tokens", expected.max_new,
                     "--ignore-eos", "--validate", answer], check=0)
    assert "0 of 120 tokens differ" in p.stdout and "PASS" in p.stdout
    bad = expected.greedy_ignore_eos.copy()
    bad[3, 4] += 1
    np.asarray(bad, "<i4").tofile(answer)
    p = run_gpt2job(["validate", out, answer], check=4)
    assert "1 of 120 tokens differ" in p.stdout and "row 3, token 4" in p.stdout and "FAIL" in p.stdout
    p = run_gpt2job(["validate", out, answer, "--tolerance", 0.01], check=0)
    p = run_gpt2job(["validate", out])   # the answer forgotten: not "no 'prompts' dataset"
    assert_one_clear_line(p, str(out), "is a gpt2job output", f"validate {out} ANSWER")
    np.asarray(expected.greedy_ignore_eos, "<i8").tofile(answer)   # int64 (read as int32 pairs and compared before)
    assert_one_clear_line(run_gpt2job(["validate", out, answer]), str(answer), "int64 tokens, not int32")
    answer.write_bytes(b"")   # an empty answer passed ("0 of 0 tokens differ: PASS")
    assert_one_clear_line(run_gpt2job(["validate", out, answer]), str(answer), "0 bytes is not")
    nope = tmp_path / "nope.bin"   # named as the command names it (it said --validate, run's flag)
    assert_one_clear_line(run_gpt2job(["validate", out, nope]), f"{nope}: answer: no such file")
    with h5py.File(tmp_path / "strs.h5", "w") as f:   # not token ids: a ValueError traceback, exit 1
        f.create_dataset("completion_tokens", data=np.array(["a"] * 8, object), dtype=h5py.string_dtype())
        f["done"] = np.ones(8, np.uint8)
    assert_one_clear_line(run_gpt2job(["validate", out, tmp_path / "strs.h5"]), "are not rows of token ids")


def test_validate_against_an_output_compares_row_ends_and_only_its_done_rows(tmp_path, token_input, expected):
    """Against another gpt2job output: a row of ours that goes on past where the other's stopped is a difference
    (it passed: only the expected row's length was compared); an unfinished expected output's rows that are not done
    are not compared, and the line says how many (it passed on '0 of 0 tokens' for them)."""
    base = ["run", token_input, "--model", TINY_HF, "--max-new-tokens", expected.max_new]
    run_gpt2job([base[0], base[1], tmp_path / "long.h5", *base[2:], "--ignore-eos"], check=0)
    run_gpt2job([base[0], base[1], tmp_path / "short.h5", *base[2:], "--ignore-eos", "--max-new-tokens", "2"], check=0)
    p = run_gpt2job(["validate", tmp_path / "long.h5", tmp_path / "short.h5"], check=4)
    assert "FAIL" in p.stdout and "token 2: got" in p.stdout and "expected the row's end" in p.stdout, p.stdout
    run_gpt2job(["validate", tmp_path / "long.h5", tmp_path / "long.h5"], check=0)
    part = tmp_path / "part.h5"
    shutil.copy(tmp_path / "long.h5", part)
    with h5py.File(part, "r+") as f:
        f["done"][1:] = 0
        f.attrs["finished"] = 0
    p = run_gpt2job(["validate", tmp_path / "long.h5", part], check=0)
    n = len(expected.greedy_ignore_eos)
    assert f"{n - 1:,} of {n:,} rows are not done in {part}: compared the other 1" in p.stdout, p.stdout
    assert f"0 of {expected.max_new} tokens differ" in p.stdout and "PASS" in p.stdout, p.stdout
    p = run_gpt2job(["validate", part, tmp_path / "long.h5"], check=0)   # ours unfinished (a stopped job's): the same
    assert f"{n - 1:,} of {n:,} rows are not done in {part} or {tmp_path / 'long.h5'}: compared the other 1" \
        in p.stdout and "PASS" in p.stdout, p.stdout   # (its rows not done counted as every token differing: FAIL)


def test_a_job_says_what_it_starts_ends_at_100_percent_and_reports_busy_workers(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, [[1, 2, 3]] * 4 + [[4, 5]] * 3)
    p = run_gpt2job(["run", inp, out, "--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "3",
                     "--chunk-size", "2", "--progress-interval", "1000", "--no-dedup"], check=0)
    lines = p.stderr.splitlines()
    assert any(x.startswith("gpt2job: starting: 7 prompts to compute (18 prompt tokens") for x in lines), p.stderr
    assert "chunks of 2 prompts" in p.stderr
    progress = [x for x in lines if x.startswith("progress:")]
    assert progress and progress[-1].startswith("progress: 7/7 prompts (100.0%)"), p.stderr
    summary = json.loads(read_output(out)["attrs"]["summary"])
    busy = summary["workers"][0]["busy_percent"]
    assert busy is not None and 0 < busy <= 100
    # the figure itself: compute time over the span from the first chunk sent to the last result received
    from gpt2job.cluster.scheduler import WorkerState
    w = WorkerState(rank=1, compute_s=0.75, first_sent=100.0, last_result=101.0)
    assert w.busy_percent() == 75.0 and w.summary()["busy_percent"] == 75.0
    w.compute_s = 1.5   # never over 100
    assert w.busy_percent() == 100.0 and WorkerState(rank=1, compute_s=1.0).busy_percent() is None


@pytest.mark.parametrize("np_", [None, 3])
def test_small_chunks_are_computed_in_batches_with_the_same_results(tmp_path, np_):
    """--chunk-size below a worker's batch (the synthetic backend computes up to 8,192 rows at once, as a GPU
    worker): the master hands each worker enough chunks for two batches and the worker computes them merged; every
    row gets the same completion as with one chunk per batch (GPT2JOB_MERGE_CHUNKS=0), each chunk is journaled and
    counted on its own."""
    rng = np.random.default_rng(3)
    inp = tmp_path / "in.h5"
    write_token_input(inp, [rng.integers(0, 50257, int(n)) for n in rng.integers(1, 30, 300)])
    got = {}
    for merge in ("1", "0"):
        out = tmp_path / f"out{merge}.h5"
        p = run_gpt2job(["run", inp, out, "--model", "random:gpt2", "--backend", "synthetic", "--max-new-tokens", "5",
                         "--chunk-size", "7", "--progress-interval", "1000", "--temperature", "0.8", "--seed", "4"],
                        np_=np_, env=job_env(GPT2JOB_MERGE_CHUNKS=merge, GPT2JOB_TRACE=1), check=0)
        got[merge] = read_output(out)
        summary = json.loads(got[merge]["attrs"]["summary"])
        assert sum(w["chunks"] for w in summary["workers"]) == 43 and sum(w["rows"] for w in summary["workers"]) == 300
        assert ("computed in batches of up to 8,192 prompts" in p.stderr) == (merge == "1"), p.stderr   # its window
        assert ("as one batch) submitted" in p.stderr) == (merge == "1"), p.stderr  # the workers' batches
    assert got["1"]["done"].all()
    assert [t.tolist() for t in got["1"]["tokens"]] == [t.tolist() for t in got["0"]["tokens"]]
