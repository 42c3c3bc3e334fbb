"""Every prompt checked before work starts (`run`, `score`, `validate IN`): empty, too long for its new tokens, ids
outside the vocabulary; what the job's --max-new-tokens leaves room for; the fix a refusal names."""
from dataclasses import dataclass

import numpy as np

from gpt2job.errors import UserError, plural
from gpt2job.files.prompts import BLOCK_ROWS, PromptSet
from gpt2job.settings import max_prompt_length


@dataclass
class Validation:
    invalid: np.ndarray          # [N] bool
    reasons: dict                # reason -> indices (int64 array)
    too_long: int = 0            # of them, prompts that leave no room for their new tokens

    @property
    def n_invalid(self):
        return int(self.invalid.sum())

    def message(self, limit=10):
        parts = []
        for reason, idx in self.reasons.items():
            if len(idx):
                first = ", ".join(str(int(i)) for i in idx[:limit])
                more = ", ..." if len(idx) > limit else ""
                parts.append(f"{len(idx)} {reason} ({'row' if len(idx) == 1 else 'rows'} {first}{more})")
        return (f"{self.n_invalid} of {plural(len(self.invalid), 'prompt')} {'is' if self.n_invalid == 1 else 'are'} "
                "invalid: " + "; ".join(parts))


def check_room(prompts: PromptSet, n_positions, max_new_tokens, rows=None):
    """The job's max_new_tokens leaves room for a prompt (run, validate IN); rows with their own: validate() checks."""
    if (rows is None or "max_new_tokens" not in rows.given) and max_prompt_length(n_positions, max_new_tokens) < 1:
        n = int(prompts.lengths[prompts.lengths <= n_positions].max(initial=1))   # the longest that can fit
        raise UserError(f"{max_new_tokens} leaves no room for a prompt: the model has {n_positions} positions",
                        field="--max-new-tokens", fix=f"use at most {n_positions - n + 1} (the longest prompt that "
                        f"can fit has {n} tokens)")


def invalid_fix(score, rows, val):
    """The fix for a job's invalid prompts (val: their Validation). rows: the input's per-row settings (None: it has
    none)."""
    if score or not val.too_long:   # (fewer new tokens mend only prompts too long for them)
        lower = ""
    elif rows is not None and "max_new_tokens" in rows.given:   # the row's own value wins over the flag
        lower = ", lower the input's max_new_tokens (--max-new-tokens for rows without one)"
    else:
        lower = ", lower --max-new-tokens"
    return f"fix those prompts{lower}, or run with --skip-invalid to mark them 'invalid' and compute the rest"


def validate(prompts: PromptSet, n_positions, vocab_size, max_new_tokens):
    """Flag empty prompts, prompts too long to leave room for max_new_tokens (settings.max_prompt_length: the job's,
    or an int array [N], each row's own from the input's per-row settings), ids outside the vocabulary."""
    lengths = prompts.lengths                                                   # [N]
    per_row = np.ndim(max_new_tokens) > 0
    limit = max_prompt_length(n_positions, max_new_tokens)
    empty = lengths == 0
    too_long = lengths > limit
    bad_tok = np.zeros(len(prompts), dtype=bool)
    step = BLOCK_ROWS * 16
    tok = prompts.tokens          # int32, or uint16 (never negative)
    if tok.size and (tok.min() < 0 or tok.max() >= vocab_size):                # find them, a block at a time
        for a in range(0, tok.size, step):
            block = tok[a:a + step]
            bad = np.flatnonzero((block.view(np.uint32) if block.dtype == np.int32 else block) >= vocab_size)
            # (a negative id is huge as uint32)
            if len(bad):
                bad_tok[np.searchsorted(prompts.offsets, bad + a, side="right") - 1] = True
    long_reason = ("too long for the room their own max_new_tokens leaves (n_positions "
                   f"{n_positions} - max_new_tokens + 1)" if per_row else
                   f"longer than {limit} tokens (n_positions {n_positions} - max_new_tokens {max_new_tokens} + 1)")
    reasons = {
        "empty": np.flatnonzero(empty),
        long_reason: np.flatnonzero(too_long),
        f"with token ids outside 0..{vocab_size - 1}": np.flatnonzero(bad_tok),
    }
    return Validation(empty | too_long | bad_tok, reasons, int(too_long.sum()))
