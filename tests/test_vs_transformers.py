"""benchmarks/features_check.py on the tiny checkpoint with the NumPy backend: repetition penalty (job-wide and per
row, also on a copy of the model whose logits are all negative), per-row max_new_tokens, stop token ids and stop
strings against transformers' greedy generate, and the sampled reproducibility checks. Needs torch and transformers
(not project dependencies): skipped without them."""
import sys

import pytest

from conftest import ROOT, TINY_HF, VOCAB_DIR

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "benchmarks"))
import features_check as fc  # noqa: E402

HAVE_VOCAB = (VOCAB_DIR / "vocab.bpe").is_file() and (VOCAB_DIR / "encoder.json").is_file()
QUIET = lambda *a, **k: None  # noqa: E731


def run(model_dir, cases=fc.ALL_CASES, tag=""):
    ctx = fc.Ctx(str(model_dir), "numpy", "float32", str(VOCAB_DIR) if HAVE_VOCAB else None, "cpu", threads=1)
    try:
        prompts = fc.make_prompts(ctx, 6, 8)
        return {r["case"]: r for r in fc.run_cases(ctx, prompts, 8, cases, log=QUIET, tag=tag)}
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run(TINY_HF)
    neg = fc.write_negative(str(TINY_HF), str(tmp_path_factory.mktemp("negative")))
    out.update(run(neg, ("rep-job", "rep-rows", "mixed-rows"), " [negative logits]"))
    return out


def test_every_case_agrees_with_transformers_or_differs_where_expected(results):
    bad = {k: (r["identical"], r["rows"], r["first_difference"]) for k, r in results.items() if r["passed"] is False}
    assert not bad
    assert set(results) >= {"rep-job", "rep-rows", "max-new-rows", "max-new-over-job", "stop-ids", "mixed-rows",
                            "logprobs", "sampled-split: two chunks", "sampled-split: reversed", "sampled-job-split",
                            "temp0-in-sampled", "temp0-in-sampled (vs transformers)", "rep-job [negative logits]",
                            "rep-rows [negative logits]", "mixed-rows [negative logits]"}
    for r in results.values():
        assert r["passed"] is None or r["rows"] > 0


def test_the_checks_bite(results):
    """The penalty changed greedy tokens, stops fired, and the shifted copy's logits are all negative."""
    assert not results["rep-job"]["note"].startswith("penalty 1.3; it changed 0/")
    assert "stop_token_ids []" not in results["stop-ids"]["note"]
    assert not results["stop-ids"]["note"].endswith(" 0/6 rows stopped")
    assert not results["logprobs"]["note"].startswith("0 steps") and results["logprobs"]["passed"] is True
    assert "largest reference logit -" in results["rep-job [negative logits]"]["note"]
    if not HAVE_VOCAB:
        pytest.skip("GPT-2 vocabulary files not present: stop-string cases skipped")
    for case in ("stop-str-job", "stop-str-rows"):
        assert results[case]["passed"] is True, results[case]
    assert results["stop-str-prompt"]["passed"] in (True, None)   # transformers also matches across the prompt end
