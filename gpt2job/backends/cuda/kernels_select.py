"""The token selection kernels' registry records and launchers (sampling.cu, logprobs.cu), a mixin of Kernels
(kernels.py, which launches them through Kernels.launch: self.launch and self.funcs are the subclass's)."""
import numpy as np

from gpt2job.backends.cuda.registry import register
from gpt2job.model.logprobs import MAX_TOP
from gpt2job.model.sampling import plain
from gpt2job.settings import SamplingSettings

SAMPLE_MAX_V = 1 << 18   # the longest logit rows the sampling kernels' fixed-point masses hold (fx_add)


class SelectKernels:
    """Launchers of the token selection kernels (Kernels inherits them)."""

    GATHER_TOKENS = register("gather_tokens", "sampling.cu", "PPPi", 256)

    def gather_tokens(self, stream, src, idx, dst, n):
        """dst[i] = src[idx[i]], int32, i < n."""
        if n:
            self.launch(self.GATHER_TOKENS, ((n + 255) // 256, 1, 1), stream, src, idx, dst, n)

    ARGMAX_PARTIALS = register("argmax_partials", "sampling.cu", "PiiPi", 256)

    ARGMAX_LOGPROB_PARTIALS = register("argmax_logprob_partials", "logprobs.cu", "PiiPPi", 256)

    def argmax_partials(self, stream, part, ld, n, out, R, lp=None):
        """out[r] = the column of the largest of the n EPI_ARGMAX partials of row r (lowest column on ties). lp: the
        partials are EPI_ARGMAX_LSE's, and lp[r] (float32) gets that column's log-probability (--logprobs)."""
        if R:
            if lp is None:
                self.launch(self.ARGMAX_PARTIALS, ((R + 7) // 8, 1, 1), stream, part, ld, n, out, R)
            else:
                self.launch(self.ARGMAX_LOGPROB_PARTIALS, ((R + 7) // 8, 1, 1), stream, part, ld, n, out, lp, R)

    ARGMAX_ROWS = register("argmax_rows", "sampling.cu", "PiiPi", 1024)

    def argmax(self, stream, logits, ld, V, out, R):
        if R:
            self.launch(self.ARGMAX_ROWS, (R, 1, 1), stream, logits, ld, V, out, R)

    SAMPLE_ROWS = register("sample_rows", "sampling.cu", "PiiPPiPQdidiPi", 1024)
    SAMPLE_ROWS_PARAMS = register("sample_rows_params", "sampling.cu", "PiiPPiPPPPPPPiiiPi", 1024)

    def setup_row_cache(self, drv):
        """Let the sampling kernels take a row of logits into dynamic shared memory (they read it several times):
        self.row_cache_floats is the longest row that fits, beside their static shared memory."""
        optin = drv.Context.get_device().get_attribute(drv.device_attribute.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        fits = []
        for k in (self.SAMPLE_ROWS, self.SAMPLE_ROWS_PARAMS):
            f = self.funcs[k.name]
            room = optin - f.get_attribute(drv.function_attribute.SHARED_SIZE_BYTES)
            f.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, room)
            fits.append(room // 4)
        self.row_cache_floats = min(fits)

    def _row_cache(self, V, cache):
        """(flag, dynamic shared bytes) of a sampling launch over rows of V logits."""
        if V > SAMPLE_MAX_V:
            raise ValueError(f"sampling on the GPU takes vocabularies of at most {SAMPLE_MAX_V:,} tokens, not {V:,} "
                             "(its fixed-point bucket masses: sampling.cu)")
        return (1, 4 * V) if cache and V <= self.row_cache_floats else (0, 0)

    def sample(self, stream, logits, ld, V, rows, seqidx, step, seed, temperature, top_k, top_p, out, R, cache=True,
               step_at=0):
        """cache False: the logits are read from global memory each time (tests of that path). step_at: 0, or the
        device address of an int32 that holds the step number (then step is not used; a replayed graph's step)."""
        if R:
            # rule 6 (temperature alone) reads the row once, from global memory: no copy, more blocks an SM
            flag, smem = self._row_cache(V, cache and not plain(SamplingSettings(temperature, top_k, top_p), V))
            self.launch(self.SAMPLE_ROWS, (R, 1, 1), stream, logits, ld, V, rows, seqidx, np.int32(step), step_at,
                        np.uint64(seed & ((1 << 64) - 1)), np.float64(temperature), np.int32(top_k),
                        np.float64(top_p), flag, out, R, shared=smem)

    def sample_params(self, stream, logits, ld, V, rows, seqidx, step, sel, out, R, cache=True, step_at=0):
        """Each row its own settings and penalty: sel (rows.RowSel) holds their device arrays and seen bitmap."""
        if R:
            flag, smem = self._row_cache(V, cache)
            self.launch(self.SAMPLE_ROWS_PARAMS, (R, 1, 1), stream, logits, ld, V, rows, seqidx, int(step), step_at,
                        sel.seed, sel.temp, sel.top_k, sel.top_p, sel.penalty, sel.seen, sel.words, sel.seq_base, flag,
                        out, R, shared=smem)

    TEMPERED_KEYS = register("tempered_keys", "sampling.cu", "PPiPQPdPPi", 256)

    def tempered_keys(self, stream, rows, seqidx, step, out, R, seed=0, temperature=0.0, sel=None, step_at=0):
        """out [R] int2: each logits row's {key, 1 / T} of sampling rule 6 for the LM head's EPI_TEMPERED epilogue,
        from the job's seed and temperature, or each row's (sel: rows.RowSel); step_at as sample's."""
        if R:
            self.launch(self.TEMPERED_KEYS, ((R + 255) // 256, 1, 1), stream, rows, seqidx, np.int32(step), step_at,
                        np.uint64(seed & ((1 << 64) - 1)), sel.seed if sel else 0, np.float64(temperature),
                        sel.temp if sel else 0, out, R)

    MARK_SEEN = register("mark_seen", "sampling.cu", "PPiiPi", 256)

    def mark_seen(self, stream, tok, seq, n, seq_base, bits, words):
        """bits[seq[i] - seq_base, tok[i] // 32] |= 1 << tok[i] % 32, i < n (the penalty's seen tokens)."""
        if n:
            self.launch(self.MARK_SEEN, ((n + 255) // 256, 1, 1), stream, tok, seq, n, seq_base, bits, words)

    TOKEN_LOGPROBS = register("token_logprobs", "logprobs.cu", "PiiPiiPPPi", 256)

    def logprobs(self, stream, logits, ld, V, tok, k, lp, top_ids, top_vals, R, greedy=False):
        """lp[r] = log_softmax(logits[r, :V])[tok[r]] (float32); k > 0: top_ids / top_vals [R, k] the k most likely
        ids (descending, ties to the lower id) and their log-probabilities (model/logprobs.py's rules). greedy: tok[r]
        is written first, the argmax of the row (argmax_rows' rule)."""
        if R:
            assert 0 <= k <= MAX_TOP
            self.launch(self.TOKEN_LOGPROBS, (R, 1, 1), stream, logits, ld, V, tok, int(bool(greedy)), int(k), lp,
                        top_ids if k else 0, top_vals if k else 0, R)
