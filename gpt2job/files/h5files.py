"""Opening an HDF5 file the user named, with one clear line when it cannot be read; checking a path a command will
write."""
import contextlib
import errno
import os

import numpy as np

from gpt2job.errors import UserError, errno_of, first_line
from gpt2job.files.journal import JOURNAL_SUFFIX


JSONL_EXTENSIONS = (".jsonl", ".ndjson")   # JSON lines: prompts (prompt_files), pairs (score_input)
TEXT_NAMES = (*JSONL_EXTENSIONS, ".json", ".txt", ".csv", ".tsv")   # an HDF5 file by such a name is a surprise
TEXT_EXTENSIONS = (".txt", *JSONL_EXTENSIONS)     # prompts files: `run` converts them, `prompts` reads them
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")


def has_hdf5_signature(path):
    """The HDF5 signature at offset 0, 512, 1024, ... (a user block may precede it)."""
    sig, offset = b"\x89HDF\r\n\x1a\n", 0
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            while offset + len(sig) <= size:
                f.seek(offset)
                if f.read(len(sig)) == sig:
                    return True
                offset = 512 if offset == 0 else 2 * offset
    except OSError:
        return False
    return False


def check_output_path(output, field="output", example="prompts.h5", hdf5=True):
    """A file the command will write at output: its folder exists, output is not a folder and (hdf5: the file is
    HDF5) a new file's name is not a text format's (an output made under such a name still resumes); else a
    UserError."""
    if hdf5 and str(output).lower().endswith(TEXT_NAMES) and not os.path.exists(output) and \
            not os.path.exists(f"{output}{JOURNAL_SUFFIX}"):
        raise UserError(f"is a {os.path.splitext(str(output))[1]} name, but this command writes an HDF5 file", output,
                        field, f"name it like {example} (`export OUT.h5 out.jsonl` writes JSON lines)")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise UserError("folder does not exist", output, field, f"create {out_dir} first")
    if os.path.isdir(output):
        raise UserError("is a folder", output, field, f"give a file name, e.g. {example}")


def open_readable(path, field, fix):
    """h5py.File(path, "r"), or a UserError naming the file, the field and the fix."""
    import h5py
    if os.path.isdir(path):   # (HDF5 said "file read failed: time = ...")
        raise UserError("is a folder", path, field, fix)
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise UserError("no such file", path, field, "check the path")
    except (OSError, ValueError) as e:
        if errno_of(e) in (errno.EAGAIN, errno.EACCES) and "lock" in str(e):   # HDF5's lock: a writer has it open
            raise UserError("is open for writing in another process (a job still running?)", path, field,
                            "run this again once that job has ended (its progress lines say how far it is)")
        raise UserError(f"not a readable HDF5 file ({first_line(e)})", path, field, fix)


def contents(f, limit=8):
    """What an open file holds, for an error about a dataset it lacks: 'its datasets: a, g/b' or 'it has no dataset'."""
    import h5py
    names = []
    try:
        f.visititems(lambda name, obj: (names.append(name) if isinstance(obj, h5py.Dataset) else None)
                     if len(names) <= limit else True)
    except (KeyError, OSError, RuntimeError):   # (a damaged file: what could be listed)
        pass
    if not names:
        return "it has no dataset"
    return "its datasets: " + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


DAMAGED_OUTPUT_FIX = "compute it again: the same run command with --overwrite"


@contextlib.contextmanager
def reading(path, field="file", fix=None):
    """Reads of an open HDF5 file: where they fail, one line naming the file, not a traceback. HDF5 itself failing
    (a damaged file) raises an OSError without an errno, a KeyError or RuntimeError "Unable to ...", "Can't ..." or
    "... failed"; an OSError with one is the system's (EIO). A closed pipe (show's output) is not the file's. An
    output with a journal is a job's unfinished one: a job stopped by a signal may leave rows marked done whose
    values never reached the file (HDF5 is not written in order), and a rerun rebuilds them from the journal."""
    try:
        yield
    except (KeyError, OSError, RuntimeError) as e:
        why = first_line(e).strip("'\"")   # (a KeyError's text is quoted)
        if isinstance(e, BrokenPipeError) or (not isinstance(e, OSError) and not (
                why.startswith(("Unable to", "Can't ")) or " failed" in why)):
            raise
        if isinstance(e, OSError) and errno_of(e) is not None:
            raise UserError(f"cannot be read ({os.strerror(errno_of(e))})", path, field,
                            "check the file system, then run this again") from None
        if fix is None and os.path.exists(f"{path}{JOURNAL_SUFFIX}"):   # (an input's reads give their own fix)
            raise UserError(f"cannot be read: its job stopped while writing it (HDF5: {why})", path, field,
                            f"run the same command again: it resumes, rebuilding the file from {path}{JOURNAL_SUFFIX}; "
                            "then this again") from None
        raise UserError(f"cannot be read, the file is damaged (HDF5: {why})", path, field,
                        fix or DAMAGED_OUTPUT_FIX) from None


def check_vlen_rows(ds, a, b):
    """Raise HDF5's kind of error (an OSError without errno: reading()'s "the file is damaged") where a
    variable-length row of ds[a:b] claims more values than the file holds. HDF5 allocates a row's claimed length
    before it finds the row's address wrong: one damaged row of a small output took 6 GB and 6 s. Each row is 16
    bytes on disk, its length first (a uint32; then its global heap address and index); checked where ds is stored
    that way (contiguous, 8-byte addresses: the outputs gpt2job writes), else left to HDF5."""
    import h5py
    off = ds.id.get_offset()
    text = h5py.check_string_dtype(ds.dtype)
    base = h5py.check_vlen_dtype(ds.dtype)
    each = 1 if text is not None and text.length is None else np.dtype(base).itemsize if base is not None else 0
    if not each or off is None or ds.chunks is not None or b <= a \
            or ds.file.id.get_create_plist().get_sizes()[0] != 8 or ds.id.get_storage_size() != 16 * ds.shape[0]:
        return
    size = ds.file.id.get_filesize()
    try:
        with open(ds.file.filename, "rb") as fh:
            fh.seek(off + 16 * a)
            raw = np.frombuffer(fh.read(16 * (b - a)), "<u4")
    except (OSError, TypeError, ValueError):   # (not a file of that name: an in-memory or file-object HDF5)
        return
    if len(raw) == 4 * (b - a) and int(raw[::4].max()) * each > size:
        raise OSError(f"Can't read {ds.name}: a row's stored length ({int(raw[::4].max()):,} values) is past the "
                      f"end of the file ({size:,} bytes)")


def read_rows(ds, a, b):
    """ds[a:b], its variable-length rows' lengths checked against the file first (check_vlen_rows)."""
    check_vlen_rows(ds, a, min(b, ds.shape[0]))
    return ds[a:b]


def check_rows_shape(path, ds, name, n_rows, fix, ndims=(1,)):
    """An input's per-row dataset: a dataset of N rows ([N], or [N, K] where ndims allows), else one clear line."""
    import h5py
    if not isinstance(ds, h5py.Dataset):
        raise UserError("is a group, not a dataset", path, name, fix)
    if ds.ndim not in ndims or ds.shape[0] != n_rows:
        want = " or ".join({1: "[N]", 2: "[N, K]"}[d] for d in ndims)
        raise UserError(f"has shape {ds.shape}: it must be {want} with N = {n_rows}, one entry per prompt", path,
                        name, fix)
