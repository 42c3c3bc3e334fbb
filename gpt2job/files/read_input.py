"""An input's prompts read (`run`; score_input.py reads `score`'s): the read-ahead child reads them first, with a
deadline (read_ahead.py), then the master takes what it handed back, or reads what it did not."""
import os

from gpt2job.errors import UserError, first_line
from gpt2job.files import token_cache
from gpt2job.files.h5files import contents, open_readable
from gpt2job.files.prompts import (DATASET_FIX, PROMPT_DATASETS, PromptSet, TokenBlocks, read_text_dataset,
                                   read_token_dataset, texts_digest)
from gpt2job.files.read_ahead import read_ahead


def read_prompts(path, tokenizer_factory, vocab_size=None):
    """Read the prompts of an input file, a block of prompts at a time. tokenizer_factory() is called only for text
    prompts. vocab_size (the model's): ids kept as uint16 when it fits and every id is below it (TokenBlocks)."""
    before = identity(path)
    digest, arrays = read_ahead(path, vocab_size)   # (a child with a deadline: HDF5's loops)
    with open_readable(path, "input", "give an HDF5 file made by `python -m gpt2job prompts`") as f:
        if identity(path) != before:   # written since the child read it: what it read is not this file's
            digest = arrays = None
        try:
            tokens, text = PROMPT_DATASETS
            if tokens in f:
                if arrays and tokens in arrays:   # the child's read, not a second one
                    return handed_back(arrays, tokens)
                return read_token_dataset(path, f[tokens], vocab_size)
            if text in f:   # a conversion's text: the ids it kept, where they are still its text's (token_cache.py)
                kept = token_cache.read(f, tokenizer_factory)
                if kept and kept[2] == (digest or texts_digest(f[text])):
                    blocks = TokenBlocks(vocab_size)
                    blocks.add(kept[1])
                    return PromptSet(kept[0], blocks.result(), "prompts", text_digest=kept[2])
                return read_text_dataset(path, f[text], tokenizer_factory, vocab_size)
            raise UserError(f"no '{text}' or '{tokens}' dataset ({contents(f)})", path, "datasets", DATASET_FIX)
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
            # damaged structure, dangling or looping links, unreadable types
            raise UserError(f"cannot be read ({first_line(e)})",
                            path, "datasets", "the file is damaged; write it again (" + DATASET_FIX + ")")


def handed_back(arrays, name):
    """The PromptSet of a token dataset the read-ahead child read (read_ahead's arrays)."""
    offsets, ids = arrays[name]
    return PromptSet.grid(ids, name) if offsets is None else PromptSet(offsets, ids, name)


def identity(path):
    """The file's (inode, size, modification time): a read-ahead's arrays are this file's while it is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
