"""Host-side helpers of the CUDA backend (no GPU needed)."""
import numpy as np

from gpt2job.cuda_backend import PREFILL_TILE_ROWS, kv_groups, prefill_passes, prefill_tiles


def test_prefill_passes_cover_every_prompt_once_within_the_row_limit():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, 50)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    for b0, b1, limit in ((0, 50, 64), (7, 31, 10), (0, 50, 10 ** 9), (3, 4, 1)):
        passes = list(prefill_passes(offsets, b0, b1, limit))
        assert passes[0][0] == b0 and passes[-1][1] == b1
        assert all(a[1] == b[0] for a, b in zip(passes, passes[1:]))
        for p0, p1 in passes:
            assert p1 - p0 == 1 or offsets[p1] - offsets[p0] <= limit
    assert list(prefill_passes(offsets, 0, 50, 10 ** 9)) == [(0, 50)]


def test_kv_groups_fit_the_budget_cover_every_prompt_and_are_even():
    rng = np.random.default_rng(1)
    for _ in range(200):
        B = int(rng.integers(1, 60))
        lens = np.sort(rng.integers(1, 100, B))[::-1]
        extra, bpp = int(rng.integers(0, 20)), int(rng.integers(1, 5))
        budget = int(rng.integers(50, 5000))
        groups = kv_groups(lens, extra, bpp, budget)
        assert groups[0][0] == 0 and groups[-1][1] == B
        assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:] + [(B, None)]))
        for a, b in groups:
            assert b - a == 1 or (b - a) * (lens[a:b].max() + extra) * bpp <= budget
    # 2,048 prompts of one length that fit 1,583 at a time: two groups of 1,024, not 1,583 + 465
    assert kv_groups(np.full(2048, 768), 0, 1, 1583 * 768) == [(0, 1024), (1024, 2048)]
    assert kv_groups([5, 3], 2, 10, 10 ** 9) == [(0, 2)]


def test_prefill_tiles_cover_each_prompt_in_consecutive_tiles():
    rng = np.random.default_rng(2)
    for lens in (rng.integers(1, 600, 300), np.array([1, 15, 16, 17, 32, 33]), np.array([7]), np.zeros(0, int)):
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        tiles, tile_off = prefill_tiles(offsets)
        assert tiles.dtype == np.int32 and tiles.shape == (int(tile_off[-1]), 2) and tile_off[0] == 0
        for b, n in enumerate(lens):
            t = tiles[tile_off[b]:tile_off[b + 1]]
            assert len(t) == -(-n // PREFILL_TILE_ROWS)
            assert (t[:, 1] >= 1).all() and (t[:, 1] <= PREFILL_TILE_ROWS).all()
            assert (t[:-1, 1] == PREFILL_TILE_ROWS).all()
            # the tiles cover the prompt's rows offsets[b]..offsets[b+1]-1 in order, once each
            rows = np.concatenate([np.arange(f, f + k) for f, k in t])
            np.testing.assert_array_equal(rows, np.arange(offsets[b], offsets[b + 1]))
