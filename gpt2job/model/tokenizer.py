"""GPT-2 tokenizer: tiktoken's gpt2 encoding, built from local vocab.bpe + encoder.json when a
directory is given (--vocab-dir or GPT2_VOCAB_DIR), else tiktoken's own download/cache."""
import os

from gpt2job import envs
from gpt2job.errors import UserError

# The GPT-2 pre-tokenisation pattern (tiktoken_ext/openai_public.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


def encode_texts(enc, texts):
    """Each text's token ids (<|endoftext|> written out is that token). A plain loop: tiktoken's encode_batch hands
    every text to a thread pool as its own task, several times slower for prompt-sized texts
    (benchmarks/RESULTS.md)."""
    allowed = {EOT}
    return [enc.encode(t, allowed_special=allowed) for t in texts]


class NoTokenizer(UserError):
    """No folder was named (--vocab-dir, GPT2_VOCAB_DIR) and tiktoken has no gpt2 encoding of its own here."""


def load_tokenizer(vocab_dir=None):
    """A tiktoken Encoding for GPT-2, from vocab_dir (a --vocab-dir; none given: GPT2_VOCAB_DIR, read here alone in
    gpt2job, on each rank and process that needs the tokenizer; neither: tiktoken's own). Raises UserError with the
    fix when none can be built."""
    import tiktoken
    given = "--vocab-dir" if vocab_dir else "GPT2_VOCAB_DIR"   # (the error names what the user set)
    vocab_dir = vocab_dir or envs.get("GPT2_VOCAB_DIR")
    if vocab_dir:
        bpe, enc_json = os.path.join(vocab_dir, "vocab.bpe"), os.path.join(vocab_dir, "encoder.json")
        for p in (bpe, enc_json):
            if not os.path.isfile(p):
                raise UserError("missing", p, given,
                                "point --vocab-dir (or GPT2_VOCAB_DIR) at a folder with vocab.bpe and encoder.json")
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=bpe, encoder_json_file=enc_json)
        except Exception as e:  # tiktoken raises assorted errors on malformed files
            raise UserError(f"not a GPT-2 vocabulary ({type(e).__name__}: {e})", vocab_dir, given,
                            "use the original GPT-2 vocab.bpe and encoder.json")
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise NoTokenizer(f"tiktoken could not load the gpt2 encoding ({type(e).__name__})", "tokenizer",
                          "--vocab-dir", "pass --vocab-dir DIR (or set GPT2_VOCAB_DIR) with vocab.bpe and encoder.json")
