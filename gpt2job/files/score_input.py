"""The input of `python -m gpt2job score IN OUT`: each row's full token sequence and the first position scored.

Input forms (HDF5):
  prompts / prompt_tokens         texts / token rows: every token but the first is scored (the first has no
                                  prediction: it is the condition, as transformers' loss treats it)
  context + continuation          texts: each is tokenized on its own and the ids concatenated (lm-eval-harness'
  context_tokens + continuation_tokens   rule); token rows: concatenated. Only the continuation's tokens are scored.
                                  An empty context scores the continuation from its second token (no prediction for
                                  the first), unless --prepend-eos.
With --prepend-eos every row starts with <|endoftext|> (50256), so that its first token is scored too
(lm-eval-harness' convention for rows without context).

A worker scores positions 1..L-1 of every row (it needs no more than the tokens); the master keeps positions
start..L-1 of each row (trim) before the journal: the output holds only the scored tokens.
"""
import hashlib

import numpy as np

from gpt2job.chunks import Completions
from gpt2job.errors import UserError, first_line, warn
from gpt2job.files.h5files import contents, open_readable
from gpt2job.files.prompt_checks import Validation
from gpt2job.files.prompts import PromptSet, read_text_dataset, read_token_dataset
from gpt2job.files.read_input import handed_back, identity, read_prompts
from gpt2job.files.read_ahead import read_ahead
from gpt2job.files.row_settings import ROW_DATASETS

PAIRS = (("context_tokens", "continuation_tokens"), ("context", "continuation"))
FIX = ("write 'prompts' (texts) or 'prompt_tokens' (token rows), or 'context' + 'continuation' (texts) or "
       "'context_tokens' + 'continuation_tokens' (token rows) of equal length; see README 'Scoring'")


def _pair_names(path):
    with open_readable(path, "input", "give an HDF5 file (see README 'Scoring')") as f:
        if unused := [k for k in ROW_DATASETS if k in f]:   # (`run` uses them: said, as `run` says what it ignores)
            warn(f"{path}: {', '.join(unused)}: per-row generation settings, which "
                 "`score` ignores (it computes no new token)")
        for a, b in PAIRS:
            if a in f or b in f:
                if not (a in f and b in f):
                    raise UserError(f"has '{a if a in f else b}' without '{b if a in f else a}' ({contents(f)})",
                                    path, "datasets", FIX)
                return a, b
    return None


def _read_dataset(path, name, tokenizer_factory, arrays, before):
    """One dataset of a pair: as the read-ahead child handed it back (arrays), unless the file changed since
    (before: its identity then), else read here."""
    with open_readable(path, "input", FIX) as f:
        if arrays and name in arrays and identity(path) == before:
            return handed_back(arrays, name)
        try:
            ds = f[name]
            ps = (read_token_dataset(path, ds) if name.endswith("_tokens") else
                  read_text_dataset(path, ds, tokenizer_factory))
        except UserError as e:   # the readers name the dataset; their fixes quote the prompts' two names: this pair's
            base = name[:-len("_tokens")] if name.endswith("_tokens") else name
            fix = e.fix and e.fix.replace("'prompt_tokens'", f"'{base}_tokens'").replace("'prompts'", f"'{base}'")
            raise UserError(e.message, e.path, e.field, fix) from None
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:   # dangling or looping links, damage
            raise UserError(f"cannot be read ({first_line(e)})", path, name, "the file is damaged; write it again ("
                            + FIX + ")") from None
    ps.source = name
    return ps


def read_score_input(path, tokenizer_factory, prepend_eos=False, eos=50256):
    """-> (PromptSet of the full rows, starts [N] int64: the first scored position of each row, >= 1)."""
    pair = _pair_names(path)
    if pair is None:
        ps = read_prompts(path, tokenizer_factory)
        starts = np.ones(len(ps), np.int64)
        ctx_len = np.zeros(len(ps), np.int64)
    else:
        before = identity(path)
        arrays = read_ahead(path, None, pair)[1]   # (a child with a deadline: HDF5's loops)
        ctx, cont = (_read_dataset(path, n, tokenizer_factory, arrays, before) for n in pair)
        if len(ctx) != len(cont):
            raise UserError(f"has {len(ctx)} rows but '{pair[1]}' has {len(cont)}", path, pair[0], FIX)
        n = len(ctx)
        lens = ctx.lengths.astype(np.int64) + cont.lengths                                   # [N]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        # row i: context i then continuation i (two ragged arrays interleaved)
        both = np.concatenate([ctx.tokens, cont.tokens])
        parts = np.stack([ctx.offsets[:-1], len(ctx.tokens) + cont.offsets[:-1]], 1).reshape(-1)   # [2N] starts
        plens = np.stack([ctx.lengths, cont.lengths], 1).reshape(-1).astype(np.int64)
        # token t of the result: its piece's start in `both` + (t - the piece's start in the result)
        src = np.repeat(parts - np.concatenate([[0], np.cumsum(plens)[:-1]]), plens) + np.arange(plens.sum())
        ps = PromptSet(offsets, both[src], f"{pair[0]}+{pair[1]}")
        ctx_len = ctx.lengths.astype(np.int64)
        starts = np.maximum(ctx_len, 1)
    if prepend_eos:
        lens = ps.lengths.astype(np.int64) + 1
        offsets = np.zeros(len(ps) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = np.full(int(offsets[-1]), eos, np.int32)
        keep = np.ones(len(tokens), bool)
        keep[offsets[:-1]] = False
        tokens[keep] = ps.tokens
        ps = PromptSet(offsets, tokens, ps.source)
        starts = ctx_len + 1
    return ps, starts


def starts_fingerprint(starts):
    """For the resume key: the same tokens split differently into context and continuation are another job."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(starts, "<i8")).hexdigest()[:32]


def validate_score(prompts: PromptSet, starts, n_positions, vocab_size):
    """Flag rows with nothing to score (fewer than 2 tokens, or an empty continuation), rows longer than
    n_positions (nothing is generated: the model's whole window is the limit), ids outside the vocabulary."""
    lengths = prompts.lengths.astype(np.int64)
    nothing = lengths - np.asarray(starts, np.int64) < 1
    too_long = lengths > n_positions
    bad_tok = np.zeros(len(prompts), bool)
    tok = prompts.tokens
    if tok.size and (tok.min() < 0 or tok.max() >= vocab_size):
        bad = np.flatnonzero(tok.view(np.uint32) >= vocab_size)
        bad_tok[np.searchsorted(prompts.offsets, bad, side="right") - 1] = True
    reasons = {"with nothing to score (fewer than 2 tokens, or an empty continuation)": np.flatnonzero(nothing),
               f"longer than {n_positions} tokens (the model's n_positions)": np.flatnonzero(too_long),
               f"with token ids outside 0..{vocab_size - 1}": np.flatnonzero(bad_tok)}
    return Validation(nothing | too_long | bad_tok, reasons)


def trim(comp: Completions, starts):
    """A worker's Completions (row b: tokens 1..L-1 and their logprobs) -> only tokens starts[row]..L-1 of each."""
    rows = np.asarray(comp.rows, np.int64)
    if not len(rows):
        return comp
    drop = np.asarray(starts, np.int64)[rows] - 1                                       # [B] >= 0
    if not drop.any():
        return comp
    lens = np.diff(comp.offsets) - drop
    new_off = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.maximum(lens, 0), out=new_off[1:])
    src = np.repeat(comp.offsets[:-1] + drop - new_off[:-1], np.maximum(lens, 0)) + np.arange(new_off[-1])
    out = Completions(comp.chunk_id, rows, new_off, np.asarray(comp.tokens)[src].astype(np.int32), comp.finish,
                      comp.copy_rows, comp.copy_src)
    if comp.logprobs is not None:
        out.logprobs = np.asarray(comp.logprobs, np.float32)[src]
    return out



def jsonl_pairs(path):
    """Is path a .jsonl file of {"context": ..., "continuation": ...} objects (its first line says)?"""
    import json
    from gpt2job.files.h5files import JSONL_EXTENSIONS
    if not str(path).lower().endswith(JSONL_EXTENSIONS):
        return False
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "context" in obj and "continuation" in obj
    except (OSError, ValueError):
        return False      # convert_for_run names what is wrong
    return False


def convert_pairs(source, output, log=None):
    """convert_for_run for a JSONL file of {"context", "continuation"} objects (both texts, or both lists of token
    ids): the input HDF5 (context + continuation, or context_tokens + continuation_tokens) at
    OUTPUT.prompts-HASH.h5, reused without reading SOURCE again while it is unchanged; written as it is read, a block
    of pairs at a time. -> (its path, whether this call wrote it)."""
    from gpt2job.files.h5files import check_output_path
    from gpt2job.files.conversions import conversion_attrs, unchanged_conversion
    from gpt2job.files.prompt_files import Appender, write_atomically
    check_output_path(output, example="out.h5")
    digest, target = unchanged_conversion(source, output, "score")
    if digest is None:
        return target, False
    written = []

    def fill(f):
        out = None
        for kind, ctx, cont in pair_blocks(source):
            out = out or [Appender(f, name + ("" if kind == "text" else "_tokens"), kind, len(ctx))
                          for name in ("context", "continuation")]
            out[0].add(ctx)
            out[1].add(cont)
        written.append(out[0].n)

    write_atomically(target, fill, conversion_attrs(source, digest))
    if log:
        log(f"{written[0]:,} context/continuation pairs of {source} converted to {target}")
    return target, True


def pair_blocks(source):
    """The pairs of a JSONL file of {"context", "continuation"} objects, every line checked as it is read: yields
    (kind, contexts, continuations), kind "text" or "token", BLOCK_LINES pairs at a time."""
    from gpt2job.files.prompt_files import BLOCK_LINES, check_ids, file_lines, json_line
    ctx, cont, kinds = [], [], set()
    for n, line in file_lines(source):
        if not line.strip():
            continue
        obj = json_line(line, n, source, "write one JSON object per line")
        if not (isinstance(obj, dict) and "context" in obj and "continuation" in obj):
            raise UserError("is not an object with 'context' and 'continuation'", source, f"line {n}",
                            'write {"context": "...", "continuation": "..."} on every line')
        for v in (obj["context"], obj["continuation"]):
            kinds.add("text" if isinstance(v, str) else "tokens" if isinstance(v, list) and
                      all(isinstance(t, int) and not isinstance(t, bool) for t in v) else "bad")
        if kinds - {"text", "tokens"} or len(kinds) > 1:
            raise UserError("context and continuation must both be texts or both token id lists, in "
                            "every line", source, f"line {n}", "use one kind per file")
        if kinds == {"tokens"}:
            check_ids(obj["context"] + obj["continuation"], source, n)
        ctx.append(obj["context"])
        cont.append(obj["continuation"])
        if len(ctx) == BLOCK_LINES:
            yield ("text" if kinds == {"text"} else "token"), ctx, cont
            ctx, cont = [], []
    if ctx:
        yield ("text" if kinds == {"text"} else "token"), ctx, cont
    elif not kinds:   # (jsonl_pairs saw a pair on the first line: the file changed since)
        raise UserError("holds no context/continuation pair", source, "source", "write one pair per line")
