"""`python -m gpt2job export OUT.h5 out.jsonl`: one JSON object per completed row, the shape batch users feed to
their next tool:

    {"row": 0, "prompt": "Hello", "completion": " world", "completion_tokens": [995], "finish_reason": "length",
     "text_exact": true}

`prompt` is the input's text (or `prompt_tokens`, the ids, for token inputs) when the input file named in the
output is still there and holds the same prompts; `completion`/`text_exact` when the output has text, or else when a
tokenizer loads here (--vocab-dir, GPT2_VOCAB_DIR, tiktoken's own): the text decoded as the job's writer would have
written it (an output whose job ran without a tokenizer); `stop_reason`
(after `finish_reason`) when the job used stop strings or stop token ids; with --logprobs `logprobs` (one per
completion token) and with --top-logprobs K `top_logprobs` (per token, its K alternatives, most likely first:
[{"id": 11, "logprob": -1.23}, ...]; float32 values written shortest); any other per-row dataset of the output
(not in BUILT_IN) that holds one value or one list per row is exported under its own name (prompt_length is not).
With --num-samples N, `prompt_index` and `sample_index` follow `row` (row r: sample r % N of prompt r // N, whose
prompt it shows). Outputs of either layout (--layout vlen or flat) export the same lines. Rows are read
in blocks: any size of output exports in bounded memory. The file is written beside its final name and renamed into
place, so a failed export leaves no half file."""
import hashlib
import json
import os
import sys

import numpy as np

from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP
from gpt2job.errors import UserError, plural
from gpt2job.files import h5flat, prompts, score_output
from gpt2job.files.h5files import check_output_path, contents, has_hdf5_signature, open_readable, read_rows, reading
from gpt2job.files.journal import JOURNAL_SUFFIX, MAGIC_HEAD, rows_only_in_journal
from gpt2job.files.outpaths import LOCK_SUFFIX, REPLACED_SUFFIX
from gpt2job.files.text import row_text
from gpt2job.model.tokenizer import NoTokenizer, load_tokenizer

BLOCK = 1 << 15
BUILT_IN = ("completion_tokens", "completions", "text_exact", "done", "finish_reason", "prompt_length", "stop_reason",
            "completion_logprobs", "top_logprob_ids", "top_logprobs", "prompt_index", "sample_index")


def _text(x):
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _plain(v):
    """A dataset element as JSON: numpy scalars and arrays to numbers and lists, bytes to text."""
    if isinstance(v, (bytes, np.bytes_)):
        return _text(v)
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _floats(a):
    """float32 values as the shortest decimals that read back as them (not float64's long tails)."""
    return [float(x) for x in np.asarray(a, np.float32).astype(str)]


def _tops(ids, vals, k):
    """A row's flattened top ids / logprobs (n_generated x k, step-major: h5logprobs.py) as a list per token of
    {"id", "logprob"}, most likely first."""
    ids, vals = np.asarray(ids, np.int64).tolist(), _floats(vals)
    return [[{"id": ids[j], "logprob": vals[j]} for j in range(s, s + k)] for s in range(0, len(ids), k)]


class _WriteFailed(Exception):
    """An OSError writing the JSON lines (its __cause__): only these are 'cannot write'; a read of OUT or of the
    input that fails is said by h5files.reading, naming that file."""


class _Sink:
    """The JSON lines' file (or standard output): writes whose errors are _WriteFailed."""

    def __init__(self, path):
        self.path = path
        try:
            self.f = sys.stdout if path is None else open(path, "w", encoding="utf-8")
        except OSError as e:
            raise _WriteFailed() from e

    def write(self, s):
        try:
            self.f.write(s)
        except OSError as e:
            raise _WriteFailed() from e

    def close(self):
        """Flush; a file: fsync and close."""
        try:
            self.f.flush()
            if self.path is not None:
                os.fsync(self.f.fileno())
                self.f.close()
        except OSError as e:
            raise _WriteFailed() from e


def _input_prompts(path, n):
    """(open file, key, dataset) of the input's prompts when the input is still there and has n rows; else
    (None, None, None)."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except (OSError, TypeError, ValueError):
        return None, None, None
    try:
        for name in ("prompts", "prompt_tokens"):
            if name in f and isinstance(f[name], h5py.Dataset) and len(f[name]) == n:
                return f, ("prompt" if name == "prompts" else "prompt_tokens"), f[name]
    except (KeyError, OSError, RuntimeError):   # a damaged input: its prompts are not exported
        pass
    f.close()
    return None, None, None


def token_fingerprint(ds):
    """PromptSet.fingerprint (files/prompts.py) of a prompt_tokens dataset ([N, T] or vlen rows), read a block at a
    time: the same digest (offsets as int64, then every token as int32) without holding the prompts."""
    import h5py
    h, n, step = hashlib.sha256(), ds.shape[0], prompts.BLOCK_ROWS
    vlen = h5py.check_vlen_dtype(ds.dtype) is not None
    total = 0
    h.update(np.zeros(1, "<i8"))
    for a in range(0, n, step):   # the offsets 1..N
        lengths = np.fromiter(map(len, read_rows(ds, a, a + step)), np.int64) if vlen else \
            np.full(min(step, n - a), ds.shape[1], np.int64)
        h.update((total + np.cumsum(lengths)).astype("<i8"))
        total += int(lengths.sum())
    for a in range(0, n, step):
        rows = ds[a:a + step]
        block = (np.concatenate(list(rows)) if len(rows) else np.zeros(0, np.int32)) if vlen else rows.reshape(-1)
        h.update(np.ascontiguousarray(prompts.to_int32(block), "<i4"))
    return "sha256:" + h.hexdigest()[:32]


def _same_prompts(out, key, ds):
    """Does the input still hold the prompts the output was made from (the resume key's input_fingerprint, or for
    text the input_text_digest the master recorded)? An output that recorded neither: taken as yes."""
    if key == "prompt_tokens":
        want = out.attrs.get("input_fingerprint")
        try:
            return want is None or token_fingerprint(ds) == _text(want)
        except (KeyError, OSError, RuntimeError, TypeError, ValueError):   # (a damaged input: no prompts exported)
            return False
    want = out.attrs.get("input_text_digest")
    try:
        return want is None or prompts.texts_digest(ds) == _text(want)
    except (KeyError, OSError, RuntimeError):   # (a damaged input, as above)
        return False


def _where_now(out_path, inp):
    """The recorded input, or, where it is not there, the file of its name beside the output (moved together, as a
    `run` of a text file's conversion OUT.prompts-HASH.h5 is; the prompts are checked against the output after)."""
    near = os.path.join(os.path.dirname(os.path.abspath(out_path)), os.path.basename(inp))
    return inp if os.path.exists(inp) or not os.path.exists(near) else near


def _never_the_input(jsonl_path, out_path, inp):
    """--overwrite replaces an earlier export, never the job's input or the text file it was converted from."""
    if inp is None or not os.path.exists(jsonl_path):
        return
    import h5py
    mine = [inp]
    try:
        with h5py.File(inp, "r") as fin:
            source = _text(fin.attrs.get("source", ""))   # a conversion's .txt or .jsonl, where it is now
            mine.append(source and _where_now(out_path, source))
    except (OSError, ValueError):
        pass
    if any(p and os.path.exists(p) and os.path.samefile(p, jsonl_path) for p in mine):
        raise UserError(f"is the input of {out_path} (its prompts): export never replaces it", jsonl_path, "export",
                        "choose another file name, e.g. out.jsonl")


def _job_file(path):
    """Is path an output's companion (OUT.journal, OUT.lock, OUT.replaced, OUT.journal.replaced) or a journal by its
    first bytes, whatever its name?"""
    if path.endswith((JOURNAL_SUFFIX, LOCK_SUFFIX, REPLACED_SUFFIX)):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC_HEAD)) == MAGIC_HEAD
    except OSError:
        return False


def _decoder(f, out_path, vocab_dir, stream):
    """For an output without text (its job had no tokenizer): a function of (tokens, finish_reason) giving the row's
    (completion, text_exact) as the job's writer would have (files/text.py row_text), or None without a tokenizer."""
    if h5flat.has(f, "completions"):
        return None
    try:
        enc = load_tokenizer(vocab_dir)
    except NoTokenizer as e:   # (a folder named by --vocab-dir or GPT2_VOCAB_DIR without the files: its error, exit 2)
        stream.write(f"gpt2job: {out_path} has no completion text (its job ran without a tokenizer) and none loads "
                     f"here ({e.message}): exporting the token ids; --vocab-dir DIR decodes the text\n")
        return None
    # (stop strings need a tokenizer at the job's start: a job without text has none, so no text is cut at one)
    return lambda toks, why: row_text(enc, toks, FINISH_STOP if _text(why) == "stop" else FINISH_LENGTH)


def export(out_path, jsonl_path, overwrite=False, stream=None, vocab_dir=None):
    stream = stream or sys.stderr
    to_stdout = jsonl_path == "-"   # `export OUT - | jq ...`
    if not to_stdout:
        check_output_path(jsonl_path, "export", "out.jsonl", hdf5=False)
        if _job_file(jsonl_path):   # a job's journal or lock (its only rows, its guard; a run removes the lock)
            raise UserError("is the name or the content of a gpt2job job's file (a journal, a lock or a set-aside "
                            "output): export never writes one", jsonl_path, "export", "choose another file name, "
                            "e.g. out.jsonl")
    if not to_stdout and os.path.exists(jsonl_path):
        if has_hdf5_signature(jsonl_path):   # an output, an input: never replaced by JSON lines, even with --overwrite
            raise UserError("is an HDF5 file: export writes JSON lines and never replaces one", jsonl_path, "export",
                            "choose another file name, e.g. out.jsonl")
        if not overwrite:
            raise UserError("exists", jsonl_path, "export", "choose another file name, or pass --overwrite")
    with open_readable(out_path, "file", "give an output file written by gpt2job run") as f, reading(out_path):
        scored = score_output.is_score(f)     # a `score` output (files/score_output.py), finished or not
        if (not h5flat.has(f, "completion_tokens") and not scored) or "done" not in f:
            raise UserError(f"not a gpt2job output (no completion_tokens/done; {contents(f)})", out_path,
                            "datasets", "give an output file written by gpt2job run")
        n = len(f["done"])
        pending = rows_only_in_journal(str(out_path), f)
        own = set(BUILT_IN) | set(h5flat.dataset_names(f))
        extra = [k for k in f.keys() if k not in own and getattr(f[k], "shape", None)
                 and f[k].shape[0] == n and len(f[k].shape) <= 2]
        decode = None if scored else _decoder(f, out_path, vocab_dir, stream)
        top = h5flat.top_dataset(f)
        topk = int(top.attrs.get("top_logprobs_k", 1)) if top is not None else 0
        inp = f.attrs.get("input")
        inp = None if inp is None else _where_now(out_path, _text(inp))
        if not to_stdout:
            _never_the_input(jsonl_path, out_path, inp)
        samples = int(f.attrs.get("num_samples", 1))      # --num-samples N: row r answers prompt r // N
        fin, pkey, pds = _input_prompts(_text(inp), n // samples) if inp is not None else (None, None, None)
        if pds is not None and not scored and not _same_prompts(f, pkey, pds):
            stream.write(f"gpt2job: the input {_text(inp)} holds other prompts than when {out_path} was made: "
                         "exporting without the prompts\n")
            fin.close()
            fin = pkey = pds = None
        elif pds is None and not scored:   # (a score output's rows carry their tokens: score_output.export_rows)
            where = _text(inp) if inp is not None else "(not recorded)"
            why = "has no 'prompts' or 'prompt_tokens' of its rows" if inp is not None and os.path.exists(where) \
                else "is not there"
            if why == "is not there" and ".prompts-" in os.path.basename(where):   # (conversions.converted_path)
                why += (" (the conversion of the text or JSONL file the job ran on: the same `run` command makes it "
                        "again, then export again)")
            stream.write(f"gpt2job: the input {where} {why}: exporting without the prompts\n")
        tmp = jsonl_path + ".tmp"
        written, out = 0, None
        try:
            out = _Sink(None if to_stdout else tmp)
            if scored:
                written = score_output.export_rows(f, lambda r: out.write(json.dumps(r) + "\n"))
            for a in range(0, 0 if scored else n, BLOCK):
                b = min(n, a + BLOCK)
                done = f["done"][a:b]
                if not done.any():
                    continue
                cols = {"completion_tokens": h5flat.rows(f, "completion_tokens", a, b),
                        "finish_reason": f["finish_reason"][a:b]}
                if "stop_reason" in f:
                    cols["stop_reason"] = f["stop_reason"][a:b]
                if h5flat.has(f, "completions"):
                    cols["completion"] = h5flat.rows(f, "completions", a, b)
                    cols["text_exact"] = f["text_exact"][a:b]
                if pds is not None:
                    with reading(_text(inp), "input", "restore it, or move it away: export then leaves the "
                                 "prompts out"):
                        first = a // samples
                        cols[pkey] = read_rows(pds, a, b) if samples == 1 else \
                            read_rows(pds, first, (b - 1) // samples + 1)[np.arange(a, b) // samples - first]
                for k in ("prompt_index", "sample_index"):
                    if k in f:
                        cols[k] = f[k][a:b]
                for k in ("completion_logprobs", "top_logprob_ids", "top_logprobs"):
                    if h5flat.has(f, k):
                        cols[k] = h5flat.rows(f, k, a, b)
                for k in extra:
                    cols[k] = f[k][a:b]
                for i in np.flatnonzero(done):
                    rec = {"row": a + int(i)}
                    for k in ("prompt_index", "sample_index"):
                        if k in cols:
                            rec[k] = int(cols[k][i])
                    if pkey in cols:
                        rec[pkey] = _plain(cols[pkey][i])
                    if "completion" in cols:
                        rec["completion"] = _text(cols["completion"][i])
                    elif decode is not None:
                        rec["completion"], exact = decode(cols["completion_tokens"][i], cols["finish_reason"][i])
                    rec["completion_tokens"] = _plain(cols["completion_tokens"][i])
                    rec["finish_reason"] = _text(cols["finish_reason"][i])
                    if "stop_reason" in cols:
                        rec["stop_reason"] = _text(cols["stop_reason"][i])
                    if "text_exact" in cols or decode is not None:
                        rec["text_exact"] = bool(cols["text_exact"][i]) if "text_exact" in cols else exact
                    if "completion_logprobs" in cols:
                        rec["logprobs"] = _floats(cols["completion_logprobs"][i])
                    if "top_logprobs" in cols:
                        rec["top_logprobs"] = _tops(cols["top_logprob_ids"][i], cols["top_logprobs"][i], topk)
                    for k in extra:
                        rec[k] = _plain(cols[k][i])
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    written += 1
            out.close()
            if not to_stdout:
                try:
                    os.replace(tmp, jsonl_path)
                except OSError as e:
                    raise _WriteFailed() from e
        except BaseException as e:
            if not to_stdout and os.path.exists(tmp):
                if out is not None:
                    out.f.close()
                os.remove(tmp)
            if not isinstance(e, _WriteFailed):
                raise
            cause = e.__cause__
            if to_stdout and isinstance(cause, BrokenPipeError):   # `export OUT - | head`: cli ends quietly, as show
                raise cause from None
            raise UserError(f"cannot write ({cause.strerror or cause})", jsonl_path, "export",
                            "check the path, its permissions and the free disk space") from None
        finally:
            if fin is not None:
                fin.close()
    missing = n - written
    todo = f", {pending:,} of them complete in its journal: run the same command again to add them and finish the " \
        "rest" if pending else ": run the job again to finish them"
    stream.write(f"gpt2job: exported {plural(written, 'row')} to {'standard output' if to_stdout else jsonl_path}"
                 + (f" ({plural(missing, 'row')} not done{todo})" if missing else "") + "\n")
    return 0
