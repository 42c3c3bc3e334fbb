"""The output of `python -m gpt2job score`: written by the same writer as a run with --logprobs (the scored tokens
where a run keeps its completion tokens, their log-probabilities in completion_logprobs), then, when the job
finishes, given its own names in one place (finalize):

  scored_tokens   vlen int32   [N]  the scored tokens of row i (positions start..L-1 of its full row)
  token_logprobs  vlen float32 [N]  log P(token_t | tokens_<t) of each (log_softmax of the float32 logits, in float64)
  sum_logprob     float64      [N]  their sum (float64 over the float32 values; NaN for rows marked 'invalid')
  n_tokens        int32        [N]  their count
  done, finish_reason ("length", or "invalid" with --skip-invalid), prompt_length (the full row, with the <|endoftext|>
  of --prepend-eos), and a run's attributes (settings with "score": true, model, resume_key, finished, summary).
An unfinished output (a job interrupted, to be resumed) still has the run's names.
"""
import json

import numpy as np

BLOCK = 1 << 16
RENAMES = (("completion_tokens", "scored_tokens"), ("completion_logprobs", "token_logprobs"))


def is_score(f):
    try:
        return bool(json.loads(f.attrs.get("settings", "{}")).get("score"))
    except (TypeError, ValueError):
        return False


def finalize(f):
    """A finished score job's file (open r+): its datasets renamed, sum_logprob and n_tokens added."""
    if not is_score(f) or "token_logprobs" in f:
        return
    for old, new in RENAMES:
        f.move(old, new)
    lp, fin = f["token_logprobs"], f["finish_reason"]
    n = len(lp)
    sums, counts = np.zeros(n, np.float64), np.zeros(n, np.int32)
    for a in range(0, n, BLOCK):
        rows = lp[a:a + BLOCK]
        counts[a:a + len(rows)] = [len(r) for r in rows]
        sums[a:a + len(rows)] = [np.asarray(r, np.float32).astype(np.float64).sum() for r in rows]
        sums[a:a + len(rows)][fin[a:a + BLOCK] == b"invalid"] = np.nan
    f.create_dataset("sum_logprob", data=sums)
    f.create_dataset("n_tokens", data=counts)


def _rows(f, a, b):
    """Rows a..b of a score output, finished or not (an unfinished one has the run's names and no sums yet):
    (token log-probabilities, scored tokens, sum_logprob, n_tokens, finish_reason)."""
    fin = f["finish_reason"][a:b]
    if "token_logprobs" in f:
        return (f["token_logprobs"][a:b], f["scored_tokens"][a:b], f["sum_logprob"][a:b], f["n_tokens"][a:b], fin)
    lp = [np.asarray(r, np.float32) for r in f["completion_logprobs"][a:b]]
    sums = np.array([np.nan if x == b"invalid" else r.astype(np.float64).sum() for r, x in zip(lp, fin)], np.float64)
    return lp, f["completion_tokens"][a:b], sums, np.array([len(r) for r in lp], np.int32), fin


def export_rows(f, write):
    """`export` of a score output: write(record) for each done row, {"row", "logprobs", "sum_logprob", "n_tokens",
    "scored_tokens", "finish_reason"}; -> rows written."""
    n, written = len(f["done"]), 0
    for a in range(0, n, BLOCK):
        done = np.flatnonzero(f["done"][a:a + BLOCK])
        if not len(done):
            continue
        lp, toks, sums, counts, fin = _rows(f, a, a + BLOCK)
        for i in done:
            s = float(sums[i])
            write({"row": a + int(i), "logprobs": [float(x) for x in np.asarray(lp[i], np.float32).astype(str)],
                   "sum_logprob": s if s == s else None, "n_tokens": int(counts[i]),
                   "scored_tokens": np.asarray(toks[i]).tolist(), "finish_reason": fin[i].decode()})
            written += 1
    return written


def show_rows(f, path, start, limit, pending=0):
    """`show` of a score output: per row its count, sum and first log-probabilities."""
    done = f["done"][()]
    state = "finished" if f.attrs.get("finished", 0) else "unfinished (run the same command to resume)"
    print(f"{path}: score output, {int(done.sum()):,} of {len(done):,} rows done, {state}"
          + (f"; {pending:,} more are complete in its journal (the next run adds them)" if pending else ""))
    print(f"  model: {f.attrs.get('model', '?')}   settings: {f.attrs.get('settings', '?')}")
    stop = min(len(done), start + limit)
    if stop <= start:
        return 0
    lps, _, sums, counts, fin = _rows(f, start, stop)
    for i in range(start, stop):
        if not done[i]:
            print(f"  [{i}] (not done)")
            continue
        lp = np.asarray(lps[i - start], np.float32)
        head = ", ".join(f"{x:.3f}" for x in lp[:6]) + (", ..." if len(lp) > 6 else "")
        print(f"  [{i}] {fin[i - start].decode()}: n_tokens {int(counts[i - start])}, sum_logprob "
              f"{float(sums[i - start]):.4f}; token_logprobs [{head}]")
    return 0
