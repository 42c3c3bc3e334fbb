"""`python -m gpt2job show OUT`: print the state and some rows of an output file."""
import json
import os

import numpy as np

from gpt2job.errors import UserError, plural
from gpt2job.files import h5flat, score_output
from gpt2job.files.h5files import contents, open_readable, reading
from gpt2job.files.journal import JOURNAL_SUFFIX, rows_in_journal, rows_only_in_journal


def show(path, start=0, limit=10):
    if not os.path.exists(path) and os.path.exists(str(path) + JOURNAL_SUFFIX):   # stopped before OUT was made
        held = rows_in_journal(str(path))
        if held is not None:
            print(f"{path}: not written yet; its journal holds {plural(held, 'completed row')}: run the same "
                  f"command again to resume (the file is written then)")
            return 0
    with open_readable(path, "file", "give an output file written by gpt2job run") as f, reading(path):
        if score_output.is_score(f) and "done" in f:     # a `score` output
            return score_output.show_rows(f, path, start, limit, rows_only_in_journal(str(path), f))
        if not h5flat.has(f, "completion_tokens") or "done" not in f:
            raise UserError(f"not a gpt2job output (no completion_tokens/done; {contents(f)})", path, "datasets",
                            "give an output file written by gpt2job run")
        done = f["done"][()]
        n = len(done)
        state = "finished" if f.attrs.get("finished", 0) else "unfinished (run the same command to resume)"
        pending = rows_only_in_journal(str(path), f)
        print(f"{path}: {int(done.sum()):,} of {plural(n, 'row')} done, {state}"
              + (f"; {pending:,} more are complete in its journal (the next run adds them)" if pending else ""))
        print(f"  model: {f.attrs.get('model', '?')}   settings: {f.attrs.get('settings', '?')}")
        if "summary" in f.attrs:
            try:
                sm = json.loads(f.attrs["summary"])
                tput, resumed = sm.get("throughput_tokens_per_s"), sm.get("rows_resumed") or 0
                last = f"the last run, which resumed {resumed:,} rows kept before, " if resumed else ""   # (its figures)
                print(f"  {last}generated {sm.get('generated_tokens')} tokens"
                      + (f" at {tput:,.0f} tokens/s" if tput else "") + f", wall {sm.get('wall_s', 0):.2f} s")
            except (ValueError, TypeError, AttributeError):   # (a damaged file: its rows may still be read)
                print("  summary: cannot be read (the file is damaged)")
        stop = min(n, start + limit)
        if start >= n and n:   # (only the header was printed)
            print(f"  (--start {start} is past the last row, {n - 1}: no row shown)")
        has_text = h5flat.has(f, "completions")
        stop_reason = f["stop_reason"] if "stop_reason" in f else None
        cols = {k: h5flat.rows(f, k, start, stop) for k in ("completion_tokens", "completions", "completion_logprobs",
                                                           "top_logprob_ids", "top_logprobs") if h5flat.has(f, k)}
        lps = cols.get("completion_logprobs")
        top = h5flat.top_dataset(f)
        tops = (cols["top_logprob_ids"], cols["top_logprobs"], int(top.attrs["top_logprobs_k"])) \
            if top is not None else None
        for i in range(start, stop):
            if not done[i]:
                print(f"[{i}] (not done)")
                continue
            reason = f["finish_reason"][i]
            reason = reason.decode() if isinstance(reason, bytes) else reason
            toks = np.asarray(cols["completion_tokens"][i - start]).tolist()
            line = f"[{i}] {reason:7s} {toks}"
            if "prompt_index" in f and "sample_index" in f:   # --num-samples: which prompt, which of its samples
                line = f"[{i}] prompt {int(f['prompt_index'][i])} sample {int(f['sample_index'][i])} {reason:7s} {toks}"
            if has_text:
                text = cols["completions"][i - start]
                text = text.decode() if isinstance(text, bytes) else text
                line += f"  {text!r}" + ("" if f["text_exact"][i] else " (lossy: see completion_tokens)")
            why = stop_reason[i] if stop_reason is not None else b""
            why = why.decode("utf-8", "replace") if isinstance(why, bytes) else why
            if why:
                line += f"  (stop_reason {why!r})"
            print(line)
            if lps is not None:
                print("      logprobs " + " ".join(f"{x:.3f}" for x in np.asarray(lps[i - start]).tolist()))
            if tops is not None and len(tops[0][i - start]):   # the first token's alternatives (export: all)
                ids, vals = tops[0][i - start][:tops[2]], tops[1][i - start][:tops[2]]
                alt = zip(np.asarray(ids).tolist(), np.asarray(vals).tolist())
                print("      top at token 0: " + ", ".join(f"{t} {v:.3f}" for t, v in alt))
    return 0
