"""The NumPy reference against transformers' GPT2LMHeadModel (fixture made by tests/fixtures/make_fixture.py)."""
import numpy as np

from conftest import TINY_FP16, TINY_HF
from gpt2job.model import reference
from gpt2job.settings import GenerationSettings
from gpt2job.backends.numpy_backend import generate_batch
from gpt2job.model.weights import load_params


def test_teacher_forced_logits_match_transformers(expected):
    p = load_params(str(TINY_HF))
    for prompt, want in zip(expected.prompts, expected.logits):
        got = reference.full_logits(p, prompt[None, :].astype(np.int64))[0]   # [T, V]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fp16_checkpoint_logits_match_transformers(expected):
    p = load_params(str(TINY_FP16))
    for prompt, want in zip(expected.prompts, expected.fp16_logits):
        got = reference.full_logits(p, prompt[None, :].astype(np.int64))[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_batched_greedy_generation_of_mixed_lengths_matches_transformers(expected):
    p = load_params(str(TINY_HF))
    assert p.config.eos_token_id == expected.eos
    gs = GenerationSettings(max_new_tokens=expected.max_new, eos_token_id=expected.eos)
    rows = np.arange(len(expected.prompts))
    out, finish = generate_batch(p, expected.prompts, rows, gs)
    stopped = 0
    for got, want, fin in zip(out, expected.gen, finish):
        assert got == want.tolist()
        stopped += fin == 1
        assert (fin == 1) == (want[-1] == expected.eos)
    assert stopped >= 2  # the fixture has prompts that end at <eos>


def test_ignore_eos_generates_every_token(expected):
    p = load_params(str(TINY_HF))
    gs = GenerationSettings(max_new_tokens=expected.max_new, eos_token_id=expected.eos, ignore_eos=True)
    out, finish = generate_batch(p, expected.prompts, np.arange(len(expected.prompts)), gs)
    np.testing.assert_array_equal(np.array(out), expected.greedy_ignore_eos)
    assert set(finish) == {0}


def test_kv_cache_decode_equals_full_recompute():
    from gpt2job.model.weights import random_params
    from gpt2job.model.config import GPT2Config
    p = random_params(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50), 0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, n) for n in (3, 7, 1)]
    cache, lengths, logits = reference.prefill(p, prompts, 12)
    nxt = rng.integers(0, 50, 3)
    step_logits = reference.decode_step(p, cache, nxt, lengths)
    for b, pr in enumerate(prompts):
        full = reference.full_logits(p, np.concatenate([pr, [nxt[b]]])[None, :])[0]
        np.testing.assert_allclose(logits[b], full[-2], atol=1e-5)
        np.testing.assert_allclose(step_logits[b], full[-1], atol=1e-5)
