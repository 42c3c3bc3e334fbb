"""`python -m gpt2job validate IN`: an input file checked as `run` would check it before work starts, without running
anything (the prompts, the per-row settings; a text or JSONL file converted as `run` converts it)."""
import os
import sys
import tempfile

from gpt2job.errors import UserError, plural
from gpt2job.files.conversions import convert_for_run, is_text_input
from gpt2job.files.h5read import read_status
from gpt2job.files.prompt_checks import check_room, invalid_fix, validate
from gpt2job.files.read_input import read_prompts
from gpt2job.files.row_settings import read_row_settings
from gpt2job.model.tokenizer import load_tokenizer
from gpt2job.model.weights import load_config
from gpt2job.settings import JobSettings


def check_input(path, model="random:gpt2", max_new_tokens=16, vocab_dir=None, out=None):
    """`gpt2job validate IN`: every check `run` makes of an input file before work starts, without running it: the
    prompts (empty, too long for the model's positions and each row's max_new_tokens, ids outside the vocabulary)
    and the per-row settings datasets (files/row_settings.py); a text or JSONL file converted as `run` does (into a
    temporary folder). Raises the UserError `run` would; 0 when it is fine."""
    out = out or sys.stdout   # (looked up now: a default bound at import outlives a replaced stdout)
    if not is_text_input(path):
        if read_status(path)[0] is not None:   # (the answer file forgotten)
            raise UserError("is a gpt2job output, not an input: `validate` with one file checks an input", path,
                            "validate", f"compare it with the expected tokens: python -m gpt2job validate {path} "
                            "ANSWER")
        return _check_input(path, path, model, max_new_tokens, vocab_dir, out)
    with tempfile.TemporaryDirectory() as folder:
        converted, _ = convert_for_run(path, os.path.join(folder, "validate.h5"), keep_ids=False)
        return _check_input(converted, path, model, max_new_tokens, vocab_dir, out)


def _check_input(path, shown, model, max_new_tokens, vocab_dir, out):
    cfg = load_config(model, warn=True)
    prompts = read_prompts(path, lambda: load_tokenizer(vocab_dir))
    rows = read_row_settings(path, len(prompts), JobSettings(input=path, output="", max_new_tokens=max_new_tokens,
                                                             converted_from=shown if shown != path else ""))
    check_room(prompts, cfg.n_positions, max_new_tokens, rows)
    val = validate(prompts, cfg.n_positions, cfg.vocab_size, rows.max_new_tokens if rows else max_new_tokens)
    if val.n_invalid:
        raise UserError(val.message(), shown, prompts.source, invalid_fix(False, rows, val))
    out.write(f"gpt2job: {shown}: {plural(len(prompts), 'prompt')} ('{prompts.source}')"
              + (f", {rows.describe()}" if rows else "") + f": valid for {model} (n_positions {cfg.n_positions}, "
              f"vocabulary {cfg.vocab_size})\n")
    return 0
