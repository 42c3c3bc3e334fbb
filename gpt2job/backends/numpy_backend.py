"""The NumPy backend: the CPU fallback and the oracle every CUDA kernel is tested against. It generates with
the reference GPT-2 (gpt2job/model/reference.py) and the reference token selection (model/sampling.py)."""
import numpy as np

from gpt2job.backends.base import READY, Backend, Pause
from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, Completions
from gpt2job.model import reference
from gpt2job.model.logprobs import Recorder, token_logprobs
from gpt2job.model.sampling import RowSettings, select_rows, select_tokens
from gpt2job.model.stops import StopStrings
from gpt2job.settings import GenerationSettings



class NumpyBackend(Backend):
    """The reference forward pass on the CPU, in float32, in micro-batches of `batch_size` prompts."""
    name = "numpy"

    def __init__(self, params, settings: GenerationSettings, batch_size=32):
        self.params = params.in_memory()   # read for the whole job: not views of the checkpoint file
        self.settings = settings
        self.batch_size = batch_size

    def run(self):
        """The oldest submitted chunk, pausing after each micro-batch (the worker reports progress there)."""
        chunk = self._submitted.popleft()
        if self.settings.score:
            return (yield from score_rows(self.params, chunk, self.batch_size))
        prompts = chunk.prompts()
        rs = RowSettings.of(chunk.params, self.settings, len(prompts))
        token_lists, finish, lps = [], [], []
        gs = self.settings
        for s in range(0, len(prompts), self.batch_size):
            part = np.arange(s, min(s + self.batch_size, len(prompts)))
            rec = Recorder(len(part), gs.top_logprobs) if gs.logprobs else None
            t, f = generate_batch(self.params, prompts[s:s + self.batch_size], chunk.rows[part], gs, rs.take(part),
                                  rec)
            token_lists += t
            finish += f
            if rec is not None:
                lps.append(rec.flat())
            yield Pause(submit=True, ready=READY, generated=sum(len(x) for x in token_lists))
        comp = Completions.from_lists(chunk.chunk_id, chunk.rows, token_lists, finish)
        if gs.logprobs:
            k = gs.top_logprobs
            comp.logprobs = np.concatenate([x[0] for x in lps]) if lps else np.zeros(0, np.float32)
            if k:
                comp.top_ids = np.concatenate([x[1] for x in lps]) if lps else np.zeros((0, k), np.int32)
                comp.top_logprobs = np.concatenate([x[2] for x in lps]) if lps else np.zeros((0, k), np.float32)
        return comp

    def describe(self):
        return {"backend": self.name, "dtype": "float32", "device": "cpu"}


def generate_batch(params, prompts, rows, gs: GenerationSettings, rs: RowSettings = None, rec: Recorder = None):
    """Reference generation for one batch (rs: each row's settings; None: the job's; rec: collects each step's
    log-probabilities from the raw logits). Returns (list of generated token lists, list of finish codes). A row
    leaves the batch when it ends (its limit, a stop token id, a stop string); the rows left compute on."""
    B = len(prompts)
    rs = RowSettings.of(None, gs, B) if rs is None else rs
    lens = np.array([len(p) for p in prompts], np.int64)
    cache_len = int((lens + rs.max_new_tokens).max()) if B else 0
    out = [[] for _ in range(B)]
    finish = [FINISH_LENGTH] * B
    n_max = int(rs.max_new_tokens.max()) if B else 0
    if n_max <= 0:
        return out, finish
    cache, lengths, logits = reference.prefill(params, prompts, cache_len)   # logits [B, V]
    shared = rs.shared()              # one SamplingSettings for every row (else per-row selection)
    stop_ids = set(gs.stop_ids())
    stops = StopStrings.of(rs.stops, gs.vocab_dir, params.config.vocab_size)
    seen = None                       # [B, V] bool: tokens of the prompt or generated (repetition penalty)
    if rs.penalized:
        seen = np.zeros((B, params.config.vocab_size), bool)
        for b, p in enumerate(prompts):
            seen[b, np.asarray(p, np.int64)] = True
        seen &= (rs.penalty != 1)[:, None]
    act = np.arange(B)                # the rows still in the batch (rows of cache, lengths, logits)
    row_ids = np.asarray(rows, np.int64)
    for step in range(n_max):
        if shared is not None:
            tok = select_tokens(logits, row_ids[act], step, shared)                          # [A]
        else:
            tok = select_rows(logits, row_ids[act], step, rs.take(act), None if seen is None else seen[act])
        if rec is not None:   # logits are still the raw ones (the penalty works on a copy)
            rec.add(act, logits, tok)
        leave = np.zeros(len(act), bool)
        at_stop = np.zeros(len(act), bool) if stops is None else stops.ends(act, tok, out.__getitem__)
        for i, b in enumerate(act):
            t = int(tok[i])
            out[b].append(t)
            if seen is not None:
                seen[b, t] = rs.penalty[b] != 1
            if t in stop_ids:
                finish[b], leave[i] = FINISH_STOP, True
            elif at_stop[i]:
                finish[b], leave[i] = FINISH_STOP_STRING, True
            elif len(out[b]) >= rs.max_new_tokens[b]:
                leave[i] = True
        if leave.all():
            break
        if leave.any():   # the rows that ended leave the batch
            keep = ~leave
            act, tok, lengths = act[keep], tok[keep], lengths[keep]
            cache = [(k[keep], v[keep]) for k, v in cache]
        logits = reference.decode_step(params, cache, tok, lengths + step)   # [A, V]
    return out, finish


def score_rows(params, chunk, batch_size):
    """`score`: each row's tokens 1..L-1 and log P(token_t | tokens_<t) (model/logprobs.py's rule), finish "length".
    A row at a time (reference.full_logits): its values do not depend on the chunk it came in (BLAS rounds a
    batched product by its shape), so any ranks and chunk sizes give the same bits."""
    prompts = chunk.prompts()
    token_lists, lps = [], []
    done = 0
    for s in range(0, len(prompts), batch_size):
        for p in prompts[s:s + batch_size]:
            toks = np.asarray(p, np.int64)[None]                                                # [1, L]
            logits = reference.full_logits(params, toks)[0, :-1]                                # [L-1, V]
            token_lists.append(toks[0, 1:])
            lps.append(token_logprobs(logits, toks[0, 1:])[0])
            done += len(p) - 1
        yield Pause(submit=True, ready=READY, generated=done)
    comp = Completions.from_lists(chunk.chunk_id, chunk.rows, token_lists, [FINISH_LENGTH] * len(prompts))
    comp.logprobs = np.concatenate(lps).astype(np.float32) if lps else np.zeros(0, np.float32)
    return comp
