"""Host-side helpers of the CUDA backend (no GPU needed)."""
import numpy as np

from gpt2job.cuda_backend import prefill_passes


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
