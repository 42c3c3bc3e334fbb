"""Read and write the safetensors format with NumPy alone (no pickle, no extra dependency).

Layout: 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Reading validates every entry against the file size.
"""
import json
import mmap
import os
import struct

import numpy as np

from gpt2job.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
MAX_HEADER = 100 * 1024 * 1024
PICKLE_FIX = "convert with model.save_pretrained(dir, safe_serialization=True), then give that dir"


def is_pickle(head):
    """Do these first bytes (at least 9) start a pickle stream (protocol 2-5, as torch.save writes) or a zip archive
    (PyTorch's default format since 1.6)? A safetensors file's header length (8 bytes) can start as a pickle does
    (0x0280 bytes: "\x80\x02"); its JSON header's "{" follows."""
    if looks_like_safetensors(head):
        return False
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"


def looks_like_safetensors(head):
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_header(path):
    """Returns (header dict without __metadata__, data start offset, file size)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
            f.seek(8)
            if is_pickle(head):
                raise UserError("is a pickle file, not safetensors: pickle refused, gpt2job never unpickles model "
                                "files", path, "header", PICKLE_FIX)
            if len(head) < 8:
                raise UserError("file is too short to be safetensors", path, "header",
                                "re-save the checkpoint with save_pretrained(safe_serialization=True)")
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(f"header size {n} is larger than the file", path, "header",
                                "the file is truncated or not safetensors; copy it again")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "file", "check the path and permissions")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"header is not valid JSON ({e})", path, "header",
                        "the file is corrupt; copy or re-save it")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(dtype, str) and dtype not in DTYPES:    # a dtype of the format this reader does not take (F8_*)
            raise UserError(f"dtype {dtype} is not supported (F32, F16, BF16, F64 and integer tensors are)", path,
                            name, "save the model in float32 or float16 (model.float() or .half(), then "
                            "save_pretrained)")
        try:
            dt = DTYPES[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offsets)):
                raise TypeError("shape and data_offsets must be lists of non-negative integers")
            a, b = offsets
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError("malformed tensor entry", path, name, "the file is corrupt; copy or re-save it")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if b < a or b - a != count * np.dtype(dt).itemsize:
            raise UserError(f"tensor size does not match its shape {shape}", path, name,
                            "the file is corrupt; copy or re-save it")
        if start + b > size:
            raise UserError(f"tensor data runs past the end of the file ({size} bytes)", path, name,
                            "the file is truncated; copy it again")
    return header, start, size


def load(path):
    """Map tensor name -> float32/int ndarray (BF16 and F16 are widened to float32). The file is memory-mapped
    read-only: float32 and integer tensors are views of it (no copy; the pages are shared with every rank of the
    node that maps the same file), MAP_POPULATE maps them all at once rather than a page fault at a time. The CUDA
    backend reads them once, to upload; the NumPy backend, which reads them for the whole job, copies them
    (GPT2Params.in_memory): each NumPy rank then holds its own copy."""
    header, start, _ = read_header(path)
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    try:
        with open(path, "rb") as f:
            try:
                mm = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
            except OSError:     # a file system without mmap: the bytes read into memory instead
                mm = f.read()
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "file", "check the path and permissions")
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        dt = np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize, offset=start + a).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        out[name] = arr
    return out


def save(path, tensors, metadata=None):
    """Write name -> ndarray as safetensors (used by tests and by the random-weights exporter). Written to a
    temporary file renamed over path: a job that has the old file mapped keeps reading the old bytes (a symbolic
    link at path is replaced by the file)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for data in blobs:
                f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
