"""A quick fuzz pass (the long one is benchmarks/reliability.py): ~30 mutated input and model files,
one of each kind in tests/mutations.py, each run through `gpt2job run` in a forked copy of this
process. Every case must end in a clear error (exit 2, one line naming the file) or a success: no
traceback, no hang, no crash. Without the GPT-2 tokenizer files (../shared/gpt2-vocab or GPT2_VOCAB_DIR) the
text-prompt cases end in the tokenizer's own clear error (outcome no_vocab) and are passed over."""
import mutations

N_CASES = 30
SEED = 1


def test_mutated_inputs_and_models_give_clear_errors_or_success(tmp_path, monkeypatch):
    monkeypatch.setattr(mutations, "HEAVY", False)
    results = mutations.run_cases(range(N_CASES), SEED, tmp_path, timeout=15, jobs=2)
    table, counts = mutations.summary_table(results)
    bad = [r for r in results if r.outcome not in ("clear", "success", "no_vocab")]
    details = "\n\n".join(
        f"case {r.index} {r.mutator}: {r.description}\n  outcome {r.outcome}, exit {r.exit_code}, files {r.files}\n"
        + "\n".join("  " + l for l in (r.traceback or r.stderr).strip().splitlines()[-8:])
        for r in bad)
    assert len(results) == N_CASES
    assert not bad, f"{len(bad)} of {N_CASES} cases did not end in a clear error or success:\n{table}\n\n{details}"
