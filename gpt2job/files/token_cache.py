"""The token ids a text input's conversion (files/conversions.py) keeps beside its prompts' text, so that a rerun or
a resume of the same job reads them instead of tokenizing every prompt again (a million prompts of ~16 tokens: ~6 s
on one core, reading the ids ~0.1 s; benchmarks/RESULTS.md).

They are written inside the conversion's atomic write, by the very function that reads text prompts
(prompts.read_text_dataset), from the text just written: they are the ids a read would make. They are read back
only from a conversion (a file with the source_sha256 attribute), only while the tokenizer is the same (its digest),
and only while the text is the one they were made from (read_input.read_prompts compares the text's digest: hashing
the text is a read, not a tokenizing; a conversion edited in place, or copied and edited, is tokenized anew). Where
they are not used (those cases, or a conversion made before they were kept, or without a tokenizer) the text is
tokenized as before.
"""
import hashlib

import numpy as np

# offsets [N+1] int64 and tokens [total] uint16 (int32 past 65,536 ids); attrs text_digest, tokenizer
GROUP = "token_cache"


def tokenizer_digest(enc):
    """What makes a tiktoken Encoding's ids: its split pattern and every id's bytes (ranks are ids in tiktoken)."""
    h = hashlib.sha256(str(getattr(enc, "_pat_str", "")).encode())
    for i in range(enc.n_vocab):
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:    # (an id no token has)
            b = b""
        h.update(len(b).to_bytes(4, "little") + b)
    return "sha256:" + h.hexdigest()[:32]


def write(f, offsets, tokens, text_digest, enc):
    """Keep the prompts' ids (as prompts.read_text_dataset read them with enc) in the conversion being written."""
    g = f.create_group(GROUP)
    g.create_dataset("offsets", data=np.asarray(offsets, np.int64))
    g.create_dataset("tokens", data=np.asarray(tokens))
    g.attrs.update(text_digest=text_digest, tokenizer=tokenizer_digest(enc))


def read(f, tokenizer_factory):
    """(offsets, tokens, the digest of the text they were made from) kept in f (an open conversion whose 'prompts'
    are text) for the tokenizer tokenizer_factory() gives, or None: tokenize the text. The caller compares the
    digest with the text's."""
    g = f.get(GROUP)
    if g is None or "source_sha256" not in f.attrs:    # (only a conversion's are read: a user's file may be edited)
        return None
    if g.attrs.get("tokenizer") != tokenizer_digest(tokenizer_factory()):
        return None
    offsets = g["offsets"][()]
    if len(offsets) != f["prompts"].shape[0] + 1:
        return None
    digest = g.attrs["text_digest"]
    return offsets, g["tokens"][()], digest.decode() if isinstance(digest, bytes) else digest
