"""benchmarks/features_check.py on the tiny checkpoint with the NumPy backend: repetition penalty (job-wide and per
row, also on a copy of the model whose logits are all negative), per-row max_new_tokens, stop token ids and stop
strings against transformers' greedy generate, and the sampled reproducibility checks. With torch and transformers
(not project dependencies; the GPU machine has them) transformers runs here; without them (CI) its outputs come
from tests/fixtures/features_reference.npz, recorded by this test where they run (the stop-string cases, whose
outputs would derive from the GPT-2 vocabulary files, only run live):

    FEATURES_REFERENCE_OUT=tests/fixtures/features_reference.npz python3 -m pytest tests/test_vs_transformers.py
"""
import importlib.util
import os
import sys

import pytest

from conftest import FIXTURES, ROOT, TINY_HF, VOCAB_DIR

sys.path.insert(0, str(ROOT / "benchmarks"))
import features_check as fc  # noqa: E402

LIVE = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
REFERENCE = FIXTURES / "features_reference.npz"
if not LIVE and not REFERENCE.is_file():
    pytest.skip("neither torch and transformers nor their recorded outputs", allow_module_level=True)
# the cases with stop strings (stop-str-*, and mixed-rows with the vocabulary) need the GPT-2 vocabulary (../shared):
# live only, their recorded outputs would derive from it
HAVE_VOCAB = LIVE and (VOCAB_DIR / "vocab.bpe").is_file() and (VOCAB_DIR / "encoder.json").is_file()
CASES = fc.ALL_CASES if LIVE else tuple(c for c in fc.ALL_CASES if c != "mixed-rows")
NEGATIVE = ("rep-job", "rep-rows", "mixed-rows") if LIVE else ("rep-job", "rep-rows")
QUIET = lambda *a, **k: None  # noqa: E731


def run(model_dir, name, replay, record, cases=CASES, tag=""):
    ctx = fc.Ctx(str(model_dir), "numpy", "float32", str(VOCAB_DIR) if HAVE_VOCAB else None, "cpu", threads=1,
                 replay=replay, record=record, name=name)
    try:
        prompts = fc.make_prompts(ctx, 6, 8)
        return {r["case"]: r for r in fc.run_cases(ctx, prompts, 8, cases, log=QUIET, tag=tag)}
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    replay = None if LIVE else fc.load_reference(REFERENCE)
    record = {} if LIVE else None
    out = run(TINY_HF, "tiny-hf", replay, record)
    neg = fc.write_negative(str(TINY_HF), str(tmp_path_factory.mktemp("negative")))
    out.update(run(neg, "negative", replay, record, NEGATIVE, " [negative logits]"))
    if LIVE and os.environ.get("FEATURES_REFERENCE_OUT"):   # the calls without stop strings
        fc.save_reference({k: v for k, v in record.items() if not fc.has_stop_strings(k)},
                          os.environ["FEATURES_REFERENCE_OUT"])
    return out


def test_every_case_agrees_with_transformers_or_differs_where_expected(results):
    bad = {k: (r["identical"], r["rows"], r["first_difference"]) for k, r in results.items() if r["passed"] is False}
    assert not bad
    assert set(results) >= {"rep-job", "rep-rows", "max-new-rows", "max-new-over-job", "stop-ids", "logprobs",
                            "sampled-split: two chunks", "sampled-split: reversed", "sampled-job-split",
                            "temp0-in-sampled", "temp0-in-sampled (vs transformers)", "rep-job [negative logits]",
                            "rep-rows [negative logits]"} | ({"mixed-rows", "mixed-rows [negative logits]"}
                                                             if LIVE else set())
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
        pytest.skip("the stop-string cases run only live: torch, transformers and the GPT-2 vocabulary files")
    for case in ("stop-str-job", "stop-str-rows"):
        assert results[case]["passed"] is True, results[case]
    assert results["stop-str-prompt"]["passed"] in (True, None)   # transformers also matches across the prompt end
