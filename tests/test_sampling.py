"""Token selection rules and per-prompt determinism of sampling."""
import numpy as np
import pytest

from gpt2job.chunks import Chunk
from gpt2job.settings import GenerationSettings
from gpt2job.backends.base import compute
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.model.config import GPT2Config
from gpt2job.settings import SamplingSettings
from gpt2job.model.sampling import kept_probs, lowbias32, select_tokens, tempered_key, tempered_pick, uniform
from gpt2job.model.weights import random_params


def test_uniform_is_a_deterministic_function_of_seed_row_step():
    assert uniform(1, 2, 3) == uniform(1, 2, 3)
    vals = {uniform(1, r, s) for r in range(50) for s in range(20)}
    assert len(vals) > 990
    u = np.array([uniform(7, r, 0) for r in range(20000)])
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_greedy_picks_the_lowest_index_on_ties():
    logits = np.array([[0.0, 3.0, 3.0, 1.0]], np.float32)
    assert select_tokens(logits, [0], 0, SamplingSettings()).tolist() == [1]


def test_top_k_keeps_the_k_largest_and_ties_at_the_boundary():
    p = kept_probs(np.log(np.array([0.1, 0.4, 0.2, 0.2, 0.1], np.float32)), SamplingSettings(1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, True, True, False]  # 0.2 ties at the k-th place: both kept


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = np.array([0.05, 0.5, 0.3, 0.15], np.float32)
    p = kept_probs(np.log(probs), SamplingSettings(1.0, top_p=0.7))
    assert (p > 0).tolist() == [False, True, True, False]
    p = kept_probs(np.log(probs), SamplingSettings(1.0, top_p=0.5))
    assert (p > 0).tolist() == [False, True, False, False]


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.1, 0.6, 0.3]], np.float32)).repeat(4000, axis=0)
    s = SamplingSettings(temperature=1.0, seed=11)
    toks = select_tokens(logits, np.arange(4000), 0, s)
    freq = np.bincount(toks, minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)


def _generate(backend, rows, prompts, split):
    out = {}
    for part in np.array_split(np.arange(len(rows)), split):
        ps = [prompts[i] for i in part]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in ps])])
        comp = compute(backend, Chunk(0, rows[part], offsets, np.concatenate(ps).astype(np.int32)))
        for i, r in enumerate(comp.rows):
            out[int(r)] = comp.row_tokens(i).tolist()
    return out


def test_same_seed_same_completions_whatever_the_batching():
    p = random_params(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=60), 2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 60, rng.integers(1, 8)) for _ in range(9)]
    rows = np.arange(9)
    gs = GenerationSettings(max_new_tokens=6, eos_token_id=59,
                            sampling=SamplingSettings(temperature=1.3, top_k=20, top_p=0.9, seed=5))
    a = _generate(NumpyBackend(p, gs, batch_size=32), rows, prompts, 1)
    b = _generate(NumpyBackend(p, gs, batch_size=2), rows, prompts, 4)
    perm = rng.permutation(9)
    c = _generate(NumpyBackend(p, gs, batch_size=3), rows[perm], [prompts[i] for i in perm], 3)
    assert a == b == c
    other = GenerationSettings(max_new_tokens=6, eos_token_id=59,
                               sampling=SamplingSettings(temperature=1.3, top_k=20, top_p=0.9, seed=6))
    assert _generate(NumpyBackend(p, other), rows, prompts, 1) != a


# ---- golden values: the per-token seed (seed, row, step) is pinned, so a change to how it is formed (dropping the
# step, swapping row and step) fails here, on the CPU. cuda_src/sampling.cu implements the same hash and rules.

def test_uniform_golden_values():
    assert uniform(42, 3, 5) == 0.6668963432312012
    assert uniform(42, 5, 3) == 0.8318838477134705        # row and step are not interchangeable
    assert uniform(0, 0, 0) == 0.13870936632156372


def golden_logits():
    return np.random.default_rng(123).normal(0, 2, (6, 50)).astype(np.float32)   # [6, 50]


GOLDEN = SamplingSettings(temperature=0.9, top_k=20, top_p=0.95, seed=42)


def test_sampled_tokens_golden_per_step():
    got = [select_tokens(golden_logits(), list(range(6)), step, GOLDEN).tolist() for step in range(3)]
    assert got == [[32, 32, 1, 25, 41, 12], [48, 24, 33, 29, 20, 18], [48, 48, 7, 39, 49, 12]]


def test_sampled_tokens_golden_per_row():
    assert select_tokens(golden_logits(), list(range(10, 16)), 0, GOLDEN).tolist() == [48, 24, 7, 29, 5, 12]



# ---- rule 6: a temperature alone (no top-k / top-p): by chunks of 64 columns, Gumbel-perturbed chunk masses

def test_rule_6_key_and_hash_golden_values():
    assert tempered_key(42, 3, 5) == 2864298224 and tempered_key(42, 5, 3) == 3572914101
    assert lowbias32(np.array([0, 1, 2 ** 31], np.uint32)).tolist() == [0, 1753845952, 3427483940]


def test_rule_6_tokens_golden():
    s = SamplingSettings(temperature=0.9, seed=42)
    got = [select_tokens(golden_logits(), list(range(6)), step, s).tolist() for step in range(3)]
    assert got == [[42, 23, 28, 39, 10, 20], [37, 23, 45, 27, 14, 48], [48, 44, 37, 29, 47, 41]]
    assert got[1][2] == tempered_pick(golden_logits()[2], 0.9, tempered_key(42, 2, 1))
    lg = np.random.default_rng(5).normal(0, 1, (3, 1000)).astype(np.float32)      # 16 chunks, the last one short
    assert select_tokens(lg, [7, 8, 9], 4, SamplingSettings(1.3, seed=2)).tolist() == [622, 51, 152]


@pytest.mark.parametrize("temperature,V", [(0.5, 5), (1.0, 200), (1.7, 150)])
def test_rule_6_follows_softmax_over_t(temperature, V):
    """Token frequencies of 40,000 draws (rows and steps) against softmax(l / T): within 4.5 standard errors each,
    and a chi-square below its 99.99% point; across several chunks (V 150, 200) and inside one (V 5)."""
    lg = np.random.default_rng(V).normal(0, 1.5, V).astype(np.float32)
    p = np.exp((lg / temperature).astype(np.float64))
    p /= p.sum()
    s = SamplingSettings(temperature=temperature, seed=9)
    toks = np.concatenate([select_tokens(np.tile(lg, (8000, 1)), np.arange(8000), step, s) for step in range(5)])
    n = toks.size
    freq = np.bincount(toks, minlength=V) / n
    assert (np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9).all()
    big = p * n >= 5
    chi2 = (((freq - p) * n) ** 2 / (p * n))[big].sum()
    dof = big.sum() - 1
    assert chi2 < dof + 3.9 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_rule_6_is_only_for_rows_without_top_k_or_top_p():
    lg = golden_logits()
    for s in (SamplingSettings(0.9, 20, 1.0, 42), SamplingSettings(0.9, 0, 0.95, 42)):
        want = [_draw_ref(lg[b], s, b) for b in range(6)]
        assert select_tokens(lg, list(range(6)), 0, s).tolist() == want
    s = SamplingSettings(0.9, 50, 1.0, 42)                       # top-k = V keeps every token: rule 6
    assert select_tokens(lg, list(range(6)), 0, s).tolist() == [
        tempered_pick(lg[b], 0.9, tempered_key(42, b, 0)) for b in range(6)]


def _draw_ref(logits, s, row):
    from gpt2job.model.sampling import _draw
    return _draw(kept_probs(logits, s), s.seed, row, 0)


def test_draws_differ_across_steps_rows_and_seeds():
    """The same logits drawn at 64 steps (or rows, or seeds) give many different tokens: the step, the row and the
    seed all enter the draw."""
    logits = np.zeros((64, 50), np.float32)                                        # uniform over 50 tokens
    s = SamplingSettings(temperature=1.0, seed=5)
    by_step = {int(select_tokens(logits[:1], [0], step, s)[0]) for step in range(64)}
    by_row = set(select_tokens(logits, list(range(64)), 0, s).tolist())
    by_seed = {int(select_tokens(logits[:1], [0], 0, SamplingSettings(1.0, seed=k))[0]) for k in range(64)}
    assert min(len(by_step), len(by_row), len(by_seed)) > 25


# ---- per-row settings and the repetition penalty (model/sampling.py select_rows; sampling.cu sample_rows_params)

from gpt2job.chunks import RowParams  # noqa: E402
from gpt2job.model.sampling import (RowSettings, mark_seen, penalize, sample_rows_params, seen_mask,  # noqa: E402
                                    seen_words, select_rows)

GOLDEN_ROWS = RowParams.of(max_new_tokens=[4] * 6, temperature=[0.9, 0, 1.3, 0.7, 0, 2.0], top_k=[20, 0, 0, 5, 3, 1],
                           top_p=[0.95, 1, 0.8, 1, 0.5, 1], seed=[42, 1, 7, 2 ** 62, 9, 3],
                           repetition_penalty=[1, 1.3, 1.2, 0.8, 2, 1.5])


def golden_seen():
    """Each row has seen its own greedy argmax (row 3 its smallest logit too): [6, W] bitmap."""
    lg = golden_logits()
    bits = np.zeros((6, seen_words(50)), np.uint32)
    mark_seen(bits, list(lg.argmax(1)) + [int(np.argmin(lg[3]))], list(range(6)) + [3], 0)
    return bits


def test_penalty_is_transformers_rule_by_hand():
    """RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by p when positive, multiplied when
    negative; unseen tokens keep theirs."""
    lg = np.array([[2.0, -1.5, 0.5, 3.0, -0.25]], np.float32)
    seen = np.array([[True, True, False, True, True]])
    got = penalize(lg, seen, np.array([2.0], np.float32))
    np.testing.assert_array_equal(got, np.array([[1.0, -3.0, 0.5, 1.5, -0.5]], np.float32))
    got = penalize(lg, seen, np.array([0.5], np.float32))   # p < 1 favours the seen tokens
    np.testing.assert_array_equal(got, np.array([[4.0, -0.75, 0.5, 6.0, -0.125]], np.float32))
    assert got.dtype == np.float32


def test_penalty_applies_before_greedy_and_temperature():
    lg = np.array([[3.0, 2.9, 0.0]], np.float32)
    rs = RowSettings.of(RowParams.of(max_new_tokens=[1], temperature=[0.0], top_k=[0], top_p=[1.0], seed=[0],
                                     repetition_penalty=[1.2]), None, 1)
    seen = np.array([[True, False, False]])
    assert select_rows(lg, [0], 0, rs, seen).tolist() == [1]       # 3.0 / 1.2 = 2.5 < 2.9
    assert select_rows(lg, [0], 0, rs, None).tolist() == [0]


def test_seen_bitmap_round_trip():
    bits = np.zeros((3, seen_words(70)), np.uint32)
    assert bits.shape == (3, 3)
    mark_seen(bits, [0, 31, 32, 69, 69, 5], [7, 7, 8, 9, 9, 9], 7)
    m = seen_mask(bits, 70)
    assert sorted(map(tuple, np.argwhere(m).tolist())) == [(0, 0), (0, 31), (1, 32), (2, 5), (2, 69)]
    assert bits[0, 0] == np.uint32(1 | (1 << 31)) and bits[2, 2] == np.uint32(1 << 5)


def test_per_row_tokens_golden():
    rs = RowSettings.of(GOLDEN_ROWS, GenerationSettings(), 6)
    seen = seen_mask(golden_seen(), 50)
    got = [select_rows(golden_logits(), list(range(100, 106)), step, rs, seen).tolist() for step in range(3)]
    assert got == [[48, 32, 37, 36, 5, 6], [48, 32, 28, 29, 5, 6], [16, 32, 1, 29, 5, 6]]
    assert select_rows(golden_logits(), list(range(100, 106)), 0, rs, None).tolist() == [48, 24, 37, 39, 10, 12]


def test_kernel_twin_reads_each_rows_settings_by_its_sequence():
    """sample_rows_params: logits row r is sequence seqidx[r] (settings, input row and bitmap row q - seq_base)."""
    rs = RowSettings.of(GOLDEN_ROWS, GenerationSettings(), 6)
    perm = np.array([4, 0, 5, 2, 3, 1])
    bits = golden_seen()
    lg = golden_logits()[perm]                                   # logits row r belongs to sequence perm[r]
    pad = lambda a: np.concatenate([np.ones(3, a.dtype) * 9, a])   # noqa: E731  sequences 0..2: not this group
    got = sample_rows_params(lg, pad(np.arange(100, 106)), perm + 3, 0, pad(rs.seed), pad(rs.temperature),
                             pad(rs.top_k), pad(rs.top_p), pad(rs.penalty), bits, 3)
    assert got.tolist() == np.array([48, 32, 37, 36, 5, 6])[perm].tolist()
    # penalty 1 everywhere: the bitmap does not matter
    ones = np.ones(6, np.float32)
    np.testing.assert_array_equal(
        sample_rows_params(lg, np.arange(100, 106), perm, 0, rs.seed, rs.temperature, rs.top_k, rs.top_p, ones,
                           bits, 0),
        sample_rows_params(lg, np.arange(100, 106), perm, 0, rs.seed, rs.temperature, rs.top_k, rs.top_p, ones,
                           None, 0))


def test_temperature_zero_rows_among_sampled_rows_are_the_argmax():
    lg = np.random.default_rng(4).normal(0, 3, (40, 300)).astype(np.float32)
    t = np.where(np.arange(40) % 3 == 0, 0.0, 1.1)
    rs = RowSettings.of(RowParams.of(max_new_tokens=np.ones(40), temperature=t, top_k=np.full(40, 50),
                                     top_p=np.full(40, 0.9), seed=np.arange(40), repetition_penalty=np.ones(40)),
                        None, 40)
    got = select_rows(lg, np.arange(40), 3, rs)
    greedy = t == 0
    np.testing.assert_array_equal(got[greedy], lg[greedy].argmax(1))
    assert (got[~greedy] != lg[~greedy].argmax(1)).any()           # the others do sample
    # a sampled row draws as the job-wide rule does with its settings
    for b in np.flatnonzero(~greedy)[:5]:
        s = SamplingSettings(float(t[b]), 50, float(np.float32(0.9)), int(b))
        assert got[b] == select_tokens(lg[b:b + 1], [b], 3, s)[0]


def test_shared_settings_keep_the_job_wide_kernels():
    gs = GenerationSettings(sampling=SamplingSettings(0.7, 5, 0.9, 3))
    assert RowSettings.of(None, gs, 4).shared() is gs.sampling
    assert RowSettings.of(None, GenerationSettings(repetition_penalty=1.1), 4).shared() is None
    same = RowParams.of(max_new_tokens=[1, 9], temperature=[0.5, 0.5], top_k=[0, 0], top_p=[1, 1], seed=[4, 4],
                        repetition_penalty=[1, 1])
    assert RowSettings.of(same, gs, 2).shared() == SamplingSettings(0.5, 0, 1.0, 4)
    greedy = RowParams.of(max_new_tokens=[1, 9], temperature=[0, 0], top_k=[0, 7], top_p=[1, 0.5], seed=[4, 5],
                          repetition_penalty=[1, 1])
    assert RowSettings.of(greedy, gs, 2).shared().greedy
    mixed = RowParams.of(max_new_tokens=[1, 9], temperature=[0, 0.5], top_k=[0, 0], top_p=[1, 1], seed=[4, 4],
                         repetition_penalty=[1, 1])
    assert RowSettings.of(mixed, gs, 2).shared() is None


def test_twin_ties_margin_finds_a_top_p_cut_on_a_boundary():
    """tests/twin_ties.py (the GPU selection tests excuse a differing row only below its TIE): a top-p target that
    equals a kept mass is a tie; the golden rows' cuts and draws are far from one."""
    from twin_ties import TIE, margin
    lg = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    assert margin(lg, SamplingSettings(1.0, 0, 0.7, 1), 0, 0) < TIE            # 0.4 + 0.3 reaches 0.7
    assert margin(lg, SamplingSettings(1.0, 0, 0.75, 1), 0, 0) > 0.01
    assert margin(lg, SamplingSettings(), 0, 0) == np.inf                       # greedy
    assert min(margin(golden_logits()[b], GOLDEN, b, 0) for b in range(6)) > 1e-4


def test_twin_ties_margin_of_rule_6_rows():
    from twin_ties import TIE, margin
    s = SamplingSettings(0.9, 0, 1.0, 42)
    assert min(margin(golden_logits()[b], s, b, 0) for b in range(6)) > 1e-4
    flat = np.zeros(128, np.float32)                                   # two chunks alike: values apart by noise
    assert 0 < margin(flat, s, 0, 0) < 10
    assert margin(flat[:64], s, 0, 0) > TIE                            # one chunk: its draw's margin only
