"""Shared prompt prefixes (gpt2job.backends.cuda.prefix_share): the plan computes each prefix once and copies the
rest, and the copies rebuild exactly the key/value caches of computing every prompt in full (NumPy reference model)."""
import numpy as np
import pytest

from gpt2job.backends.cuda import prefix_share
from gpt2job.model import reference
from gpt2job.model.config import GPT2Config
from gpt2job.model.weights import random_params


def prompts_with_stems(n, seed=0, vocab=50, max_len=12):
    """n prompts: a few shared stems + random tails, including exact repeats and prompts that prefix others."""
    rng = np.random.default_rng(seed)
    stems = [rng.integers(0, vocab, rng.integers(1, 8)) for _ in range(4)]
    out = []
    for i in range(n):
        if i % 7 == 3 and out:
            out.append(out[rng.integers(len(out))].copy())                      # an exact repeat
        elif i % 7 == 5 and out and len(out[-1]) > 1:
            out.append(out[-1][:rng.integers(1, len(out[-1]))].copy())          # a prefix of an earlier prompt
        else:
            stem = stems[rng.integers(len(stems))]
            tail = rng.integers(0, vocab, rng.integers(0, max_len - len(stem) + 1))
            p = np.concatenate([stem, tail])
            out.append(p if len(p) else stem)
    return out


def flat(prompts):
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    return offsets, np.concatenate(prompts).astype(np.int64)


def even_groups(k):
    """groups_of: k consecutive groups of near-equal size."""
    def groups_of(lens):
        B = len(lens)
        cuts = [B * i // k for i in range(k + 1)]
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return groups_of


@pytest.mark.parametrize("n_groups", [1, 3])
def test_plan_computes_or_copies_every_position_once_from_an_identical_prefix(n_groups):
    prompts = prompts_with_stems(60, seed=n_groups)
    offsets, tokens = flat(prompts)
    sp = prefix_share.plan(offsets, tokens, even_groups(n_groups), min_saving=0.0)
    assert sp is not None and sorted(sp.perm.tolist()) == list(range(len(prompts)))
    P = [prompts[j] for j in sp.perm]                                   # prompts in the plan's order
    assert np.array_equal(sp.lens, [len(p) for p in P])
    group = np.zeros(len(P), np.int64)
    for g, (b0, b1) in enumerate(sp.groups):
        group[b0:b1] = g
        assert sp.skip[b0] == 0                                         # nothing copied across groups
    seen = {}
    for t in range(len(sp.tokens)):                                     # computed tokens
        i, p = int(sp.seq[t]), int(sp.positions[t])
        assert sp.offsets[i] <= t < sp.offsets[i + 1] and sp.tokens[t] == P[i][p]
        seen[(i, p)] = "computed"
    assert all(sp.skip < sp.lens)                                       # the last token always runs
    for k, (d, s, p) in enumerate(sp.copies.tolist()):
        assert sp.copy_off[d] <= k < sp.copy_off[d + 1]
        assert s < d and group[s] == group[d]
        assert seen.get((s, p)) == "computed"                          # the source computed that row itself
        assert np.array_equal(P[s][:p + 1], P[d][:p + 1])              # same tokens 0..p: same key and value
        assert (d, p) not in seen
        seen[(d, p)] = "copied"
    assert len(seen) == sum(len(p) for p in P)                          # every position exactly once
    assert sp.saving > 0.2


def test_plan_declines_when_little_is_shared():
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50257, 16) for _ in range(64)]
    offsets, tokens = flat(prompts)
    assert prefix_share.plan(offsets, tokens, even_groups(1)) is None
    assert prefix_share.plan(offsets[:2], tokens[:16], even_groups(1)) is None      # one prompt


@pytest.mark.parametrize("seed", range(6))
def test_skip_bound_is_above_what_a_plan_skips(seed):
    """skip_bound (the first PEEK tokens only) never rules out a plan: it is at least the positions the
    lexicographic order skips, on prompts with shared stems, repeats, prefixes of others and prompts shorter than PEEK."""
    prompts = prompts_with_stems(50, seed=seed, vocab=6 if seed % 2 else 50)
    offsets, tokens = flat(prompts)
    perm, lcp = prefix_share.lexicographic(offsets, tokens)
    skipped = int(np.minimum(lcp, np.diff(offsets)[perm] - 1).sum())
    assert skipped <= prefix_share.skip_bound(offsets, tokens) <= int((np.diff(offsets) - 1).sum())
    rng = np.random.default_rng(seed)                                    # unrelated prompts: PEEK - 1 a prompt
    offsets, tokens = flat([rng.integers(0, 50257, int(n)) for n in rng.integers(8, 40, 64)])
    assert prefix_share.skip_bound(offsets, tokens) == 64 * (prefix_share.PEEK - 1)
    wide = tokens + (1 << 20)                                            # 21-bit ids: 3 tokens packed, not 4
    assert prefix_share.skip_bound(offsets, wide) == 64 * 2


def test_plan_declines_when_its_order_needs_more_kv_groups():
    """4 long and 12 short prompts with one stem: in the chunk's order (longest first) their caches fit 2 KV groups;
    in lexicographic order the lengths mix, every group needs the long cache, and 4 groups would be needed."""
    from gpt2job.backends.cuda.plan import kv_groups
    rng = np.random.default_rng(4)
    stem = rng.integers(0, 50, 6)
    prompts = ([np.concatenate([stem, rng.integers(0, 50, 40)]) for _ in range(4)] +
               [np.concatenate([stem, rng.integers(0, 50, 2)]) for _ in range(12)])
    offsets, tokens = flat(prompts)
    perm, _ = prefix_share.lexicographic(offsets, tokens)
    lens = np.diff(offsets)
    assert (len(kv_groups(lens, 0, 1, 200)), len(kv_groups(lens[perm], 0, 1, 200))) == (2, 4)
    assert prefix_share.plan(offsets, tokens, lambda ls: kv_groups(ls, 0, 1, 200), min_saving=0.0) is None
    assert prefix_share.plan(offsets, tokens, lambda ls: kv_groups(ls, 0, 1, 10 ** 6), min_saving=0.0) is not None


def test_lexicographic_puts_a_prefix_before_its_extensions():
    prompts = [np.array([3, 1, 2]), np.array([3, 1]), np.array([2, 9]), np.array([3, 1, 2, 0]), np.array([3, 0])]
    perm, lcp = prefix_share.lexicographic(*flat(prompts))
    assert perm.tolist() == [2, 4, 1, 0, 3]
    assert lcp.tolist() == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("max_len", [12, 48])
@pytest.mark.parametrize("vocab", [50, 50257, 70000])
def test_lexicographic_is_the_sorted_order_with_narrow_and_wide_tokens(vocab, max_len):
    """Keys of two bytes a token while every token + 1 fits, four beyond (a vocabulary over 65,535), sorted by
    np.lexsort up to LEXSORT_KEYS columns and as byte strings beyond (max_len 48): the order and the common
    prefixes are those of sorting the prompts as Python lists, prefixes first, ties by index; with a primary key
    `first`, by it first (the common prefixes still of the tokens alone)."""
    prompts = prompts_with_stems(200, seed=vocab % 7, vocab=vocab, max_len=max_len)
    prompts += [np.array([vocab - 1] * 3), np.array([vocab - 1, 0]), np.array([0])]
    first = np.random.default_rng(vocab).integers(0, 3, len(prompts))
    for key in (None, first):
        perm, lcp = prefix_share.lexicographic(*flat(prompts), first=key)
        want = sorted(range(len(prompts)), key=lambda i: (0 if key is None else key[i], prompts[i].tolist(), i))
        assert perm.tolist() == want
        for j in range(1, len(want)):
            a, b = prompts[want[j - 1]].tolist(), prompts[want[j]].tolist()
            n = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            assert lcp[j] == n


def test_copies_rebuild_the_full_caches_of_the_reference_model():
    """Caches holding only the computed rows (the rest NaN), after reference.kv_copy (the twin of the kv_copy
    kernel), equal the caches of running every prompt in full, in the CUDA layout [slots, S, C]."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50)
    params = random_params(cfg, 3)
    prompts = prompts_with_stems(24, seed=5)
    offsets, tokens = flat(prompts)
    sp = prefix_share.plan(offsets, tokens, even_groups(2), min_saving=0.0)
    P = [prompts[j] for j in sp.perm]
    S, C = int(sp.lens.max()), cfg.n_embd
    cache, _, _ = reference.prefill(params, P, S)                          # per layer [B, H, S, D]
    for li in range(cfg.n_layer):
        full_k, full_v = (c.transpose(0, 2, 1, 3).reshape(len(P), S, C) for c in cache[li])   # [B, S, C]
        for b0, b1 in sp.groups:
            k = np.full((b1 - b0, S, C), np.nan, np.float32)
            v = np.full((b1 - b0, S, C), np.nan, np.float32)
            mine = (sp.seq >= b0) & (sp.seq < b1)
            k[sp.seq[mine] - b0, sp.positions[mine]] = full_k[sp.seq[mine], sp.positions[mine]]
            v[sp.seq[mine] - b0, sp.positions[mine]] = full_v[sp.seq[mine], sp.positions[mine]]
            cp = sp.copies[sp.copy_off[b0]:sp.copy_off[b1]]
            k, v = reference.kv_copy(k, v, cp, slot_base=b0)
            for i in range(b0, b1):
                n = len(P[i])
                np.testing.assert_allclose(k[i - b0, :n], full_k[i, :n], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(v[i - b0, :n], full_v[i, :n], rtol=1e-5, atol=1e-6)


def test_seed_workload_saving():
    """On the seed workload (when present) a single group saves about a quarter of the prefill tokens."""
    from conftest import SHARED
    path = SHARED / "seed-workload" / "input.bin"
    if not path.is_file():
        pytest.skip(f"no seed workload ({path})")
    a = np.fromfile(path, np.int32).reshape(-1, 16)
    offsets = np.arange(len(a) + 1, dtype=np.int64) * 16
    sp = prefix_share.plan(offsets, a.reshape(-1), even_groups(1))
    assert sp is not None and 0.25 < sp.saving < 0.30
