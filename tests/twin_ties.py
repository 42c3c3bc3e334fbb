"""Near ties of the sampling rules (model/sampling.py): rows where a GPU selection kernel may rightly pick another
token than the NumPy twin. Both follow the same rules in float32 exponentials, but CUDA's expf / __expf (within 2
ulps) and NumPy's exp are not always the same bits, so the masses they sum differ by up to ~1e-7 relative: a row
whose top-p cut, draw or (rule 6) best chunk falls closer than that to the boundary between two tokens can go either
way (a row 3e-9 from its top-p cut did; benchmarks/RESULTS.md, session 44). The tests compare every other row
exactly, and the GPU's two ways to a rule-6 token (selection kernel, LM head epilogue) with each other always."""
import numpy as np

from gpt2job.model.sampling import (kept_probs, penalize, plain, seen_mask, tempered_chunks, tempered_key,
                                    uniform)
from gpt2job.settings import SamplingSettings

TIE = 1e-6   # relative distance below which a row's pick counts as a tie


def margin(logits, s: SamplingSettings, row, step):
    """The relative distance of a sampled row's top-p cut and of its draw to the nearest boundary between two
    tokens (rules 4-5 in float64), or (rule 6) of its best chunk's value to the next one's and of its draw to the
    nearest sum of its chunk's e's; inf for a greedy row."""
    if s.greedy:
        return np.inf
    lg = np.asarray(logits, np.float32)
    if plain(s, lg.size):   # rule 6: the two best chunks' values, and the draw inside the best one
        e, _, _, val, t = tempered_chunks(lg, s.temperature, tempered_key(int(s.seed), int(row), int(step)))
        j = int(np.argmax(val))
        gap = val[j] - np.partition(val, -2)[-2] if val.size > 1 else np.inf
        return min(gap, np.min(np.abs(np.cumsum(e[j].astype(np.float64)) - t[j])) / t[j])
    out = np.inf
    if 0.0 < s.top_p < 1.0:
        p = kept_probs(lg, SamplingSettings(s.temperature, s.top_k, 1.0, s.seed))   # before the cut
        cand = np.flatnonzero(p > 0)
        cs = np.cumsum(p[cand[np.argsort(-lg[cand], kind="stable")]])
        target = s.top_p * cs[-1]
        cut = int(np.searchsorted(cs, target))
        out = min(abs(cs[i] - target) for i in (cut - 1, cut) if 0 <= i < cs.size) / target
    c = np.cumsum(kept_probs(lg, s))
    x = uniform(int(s.seed), int(row), int(step)) * c[-1]
    i = min(int(np.searchsorted(c, x, side="right")), c.size - 1)
    return min(out, (c[i] - x) / x, (x - c[i - 1]) / x if i else np.inf)


def assert_same_but_ties(got, want, margins):
    """got == want but where margins(b) (a function of the row) is below TIE."""
    got, want = np.asarray(got), np.asarray(want)
    bad = [(int(b), int(got[b]), int(want[b]), margins(int(b))) for b in np.flatnonzero(got != want)]
    assert all(m < TIE for *_, m in bad), f"rows (row, got, want, margin) differ: {bad}"


def params_margins(lg, rows, seqidx, step, seed, temperature, top_k, top_p, penalty, bits, seq_base):
    """margins(r) for sample_rows_params' arguments (its twin's): the penalty first, then the row's settings."""
    def m(r):
        q = int(seqidx[r])
        row = lg[r:r + 1]
        if bits is not None and penalty[q] != 1:
            row = penalize(row, seen_mask(bits, lg.shape[1])[[q - seq_base]], penalty[q:q + 1])
        s = SamplingSettings(float(temperature[q]), int(top_k[q]), float(top_p[q]), int(seed[q]))
        return margin(row[0], s, int(rows[q]), step)
    return m
