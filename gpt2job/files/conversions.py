"""`run` (and `score`) on a text or JSONL file: the master converts it first, with the `prompts` command's rules
(files/prompt_files.py), into OUT.prompts-HASH.h5 beside the output; an unchanged file reuses its conversion; a job's
end keeps or removes conversions so that nothing left blocks or changes a later run."""
import os

from gpt2job.errors import UserError, plural
from gpt2job.files.h5files import HDF5_EXTENSIONS, TEXT_EXTENSIONS, check_output_path, has_hdf5_signature
from gpt2job.files.jsonl_settings import JsonlRows
from gpt2job.files.outpaths import being_written
from gpt2job.files.prompt_files import file_digest, prompt_blocks, remove_dead_temps, write_prompts_h5
from gpt2job.model.tokenizer import load_tokenizer

CONVERSION = 3                                      # bump when prompt_blocks's rules change what it makes
INPUT_FIX = ("give an HDF5 input (`python -m gpt2job prompts` makes one), a .txt file (one prompt per line) or "
             "a .jsonl file")


def is_text_input(path):
    """Does `run` convert this input first? Decided by the extension; an input that is neither a text file nor
    HDF5 (by its signature, whatever its extension) is refused here with one line. A missing file or an
    HDF5-named one is left to the HDF5 reader, which names what is wrong with it."""
    low = str(path).lower()
    if low.endswith(TEXT_EXTENSIONS):
        return True
    if low.endswith(HDF5_EXTENSIONS) or not os.path.isfile(path) or has_hdf5_signature(path):
        return False
    if low.endswith(".bin"):
        raise UserError("a raw int32 token file is not run directly", path, "input",
                        f"convert it first: python -m gpt2job prompts {path} in.h5 --tokens-per-row T")
    ext = os.path.splitext(low)[1]
    raise UserError(f"is not an HDF5 file, and its extension ({ext or 'none'}) is not .txt or .jsonl", path,
                    "input", INPUT_FIX)


def converted_path(output, digest):
    """Where `run SOURCE OUTPUT` puts SOURCE's prompts: OUTPUT.prompts-HASH.h5, HASH from SOURCE's bytes."""
    return f"{output}.prompts-{digest.split(':')[-1][:12]}.h5"


def convert_for_run(source, output, log=None, vocab_dir=None, keep_ids=True):
    """The input HDF5 for `run SOURCE OUTPUT` with a text or JSONL SOURCE, next to the output (the master's node
    writes it; the workers get token chunks, never the input). The same rules and errors as the `prompts` command;
    the source is read and checked as its conversion is written at a temporary name (one refused half-way leaves
    nothing). Its name holds a hash of SOURCE's bytes: the same SOURCE reuses it without reading it again (a rerun
    resumes the output), a changed SOURCE gets a file of its own (and the output's resume check refuses it as a
    changed input, while the output's own input stays as it was). keep_ids: text prompts' token ids are kept beside
    them (files/token_cache.py; tokenized with vocab_dir's tokenizer, where one loads): a rerun reads them, not the
    text (a conversion read once, validate IN's, keeps none). Returns (its path, whether this call wrote it)."""
    log = log or (lambda msg: None)
    check_output_path(output, example="out.h5")
    digest, target = unchanged_conversion(source, output, "run")
    if digest is None:
        log(f"prompts of {source}: unchanged, read from {target}")
        return target, False
    rows = JsonlRows()
    n, kind = write_prompts_h5(target, prompt_blocks(source, rows), rows, conversion_attrs(source, digest),
                               (lambda: _tokenizer_or_none(vocab_dir)) if keep_ids else None)
    log(f"{plural(n, kind + ' prompt')} of {source} converted to {target}")
    return target, True


def _tokenizer_or_none(vocab_dir):
    try:
        return load_tokenizer(vocab_dir)
    except UserError:   # none here: the job tokenizes the text, or says why it cannot
        return None


def unchanged_conversion(source, output, command):
    """(SOURCE's digest, where its conversion for OUTPUT goes); the digest is None when a conversion of these very
    bytes, by these rules, is already there (the source was checked when it was written)."""
    digest = file_digest(source)
    target = converted_path(output, digest)
    old = _conversion_attrs(target) if os.path.exists(target) else None
    if old is not None and old.get("source_sha256") == digest and old.get("gpt2job_conversion") == CONVERSION:
        return None, target
    if os.path.isdir(target):
        raise UserError("is a folder", target, "input", f"remove it: `{command}` converts {source} there")
    return digest, target


def conversion_attrs(source, digest):
    """What a conversion records of its source (unchanged_conversion and _conversion_attrs read it back)."""
    return {"source": os.path.abspath(source), "source_sha256": digest, "gpt2job_conversion": CONVERSION}


def conversions_of(output):
    """The files convert_for_run made for this output (any version of its source)."""
    import glob
    return [p for p in glob.glob(glob.escape(str(output)) + ".prompts-*.h5") if _conversion_attrs(p) is not None]


def output_input(output):
    """The input an output file records (its 'input' attribute, an absolute path), or None."""
    import h5py
    try:
        with h5py.File(output, "r") as f:
            v = f.attrs.get("input")
            return v.decode() if isinstance(v, bytes) else v
    except (OSError, RuntimeError, ValueError):
        return None


def tidy_conversions(output, converted, created, ok):
    """After `run` on a text input: a job that ended well keeps its conversion and drops those of earlier versions of
    the source that the output no longer names; a failed one removes the conversion it wrote unless the output (an
    earlier job's, kept) names it (one it found, it leaves: another run of the same command may be using it).
    A job that ended well also removes what killed conversions left (remove_dead_temps). Nothing left this way
    blocks or changes a later run."""
    if ok:
        import glob
        remove_dead_temps(glob.escape(str(output)) + ".prompts-*.h5")
    if not ok and (not created or being_written(output)):   # (another run of the same command, started at the
        return                                                # same moment, converted it too and is reading it)
    named = output_input(output) if os.path.exists(output) else None
    for p in conversions_of(output) if ok else [converted]:
        if os.path.abspath(p) != named and (not ok or os.path.abspath(p) != os.path.abspath(converted)):
            try:
                os.remove(p)
            except OSError:
                pass


def _conversion_attrs(path):
    """The attributes convert_for_run recorded in path, or None when path is something else."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "source_sha256" not in f.attrs:
                return None
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except (OSError, RuntimeError, ValueError):
        return None
