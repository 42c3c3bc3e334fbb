"""Fuzzing gpt2job's inputs: mutated input HDF5 files and model files, each run through
`gpt2job run IN OUT --model M --max-new-tokens 2 --backend numpy` in a forked copy of this process
(gpt2job.cli.main, no new interpreter), and the outcome classified.

Used by benchmarks/reliability.py (hundreds of cases) and, as a program, by tests/test_fuzz_smoke.py (a few
dozen): `python benchmarks/fuzz_inputs.py --cases 30 --light --json-out R.json` (exit 1 when a case is bad).

Outcomes:
  clear       exit 2 with exactly one 'gpt2job: error:' line naming the input or the model file
  unclear     exit 2, but the line does not name the file, or more/other lines
  no_vocab    exit 2 because text prompts need the GPT-2 tokenizer files and there are none here
              (no ../shared/gpt2-vocab, no GPT2_VOCAB_DIR): the case tells nothing
  success     exit 0 and a finished output with every row done
  bad_success exit 0 but the output is missing, unfinished or has rows not done
  traceback   an exception escaped main()
  crash       the process died (signal, os._exit) without a result
  other_exit  any other exit code
  hang        no result within the timeout (the process is killed)

Every case is built from the tiny fixtures in tests/fixtures/ by a seeded generator: case i uses
mutator i % len(MUTATORS) (so a few dozen cases touch every kind) with random.Random((seed, i)).
"""
import io
import json
import os
import random
import select
import shutil
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY_HF = FIXTURES / "tiny-hf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import bench_common  # noqa: E402

VOCAB_DIR = bench_common.vocab_dir()   # "" where no folder has the tokenizer files
VOCAB = 1000            # tiny-hf's vocab_size
HEAVY = True            # False: leave out the few cases that load a 500 MB flat file (15-25 s each)
N_POSITIONS = 128


def base_prompts():
    d = np.load(FIXTURES / "tiny_expected.npz", allow_pickle=False)
    off, tok = d["prompt_offsets"], d["prompt_tokens"]
    return [tok[off[i]:off[i + 1]].astype(np.int32) for i in range(len(off) - 1)]


BASE_TEXTS = ["Hello world", "The quick brown fox", "Über café ☕ and 漢字", "<|endoftext|>Once upon",
              "a", "numbers 12345 and symbols !@#$%"]


# ---------------------------------------------------------------- file builders

def h5():
    import h5py
    return h5py


def write_tokens(path, rows, dtype=np.int32):
    hp = h5()
    with hp.File(path, "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=hp.vlen_dtype(dtype))
        for i, r in enumerate(rows):
            ds[i] = np.asarray(r, dtype)


def write_texts(path, texts, name="prompts", encoding="utf-8"):
    """texts: str or bytes items; bytes are stored as they are (may be invalid UTF-8)."""
    hp = h5()
    with hp.File(path, "w") as f:
        ds = f.create_dataset(name, (len(texts),), dtype=hp.string_dtype(encoding))
        for i, t in enumerate(texts):
            ds[i] = t


def flip_bits(path, rng, n, lo=0, hi=None):
    data = bytearray(Path(path).read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    if hi <= lo:
        return
    for _ in range(n):
        pos = rng.randrange(lo, hi)
        data[pos] ^= 1 << rng.randrange(8)
    Path(path).write_bytes(bytes(data))


def copy_model(d):
    m = Path(d) / "model"
    shutil.copytree(TINY_HF, m)
    for p in m.iterdir():
        os.chmod(p, 0o644)
    return m


def st_parts(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(path, header, data, pad=True, size_field=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if size_field is None else size_field
    Path(path).write_bytes(struct.pack("<Q", n) + raw + data)


def tensor_names(header):
    return [k for k in header if k != "__metadata__"]


# ---------------------------------------------------------------- mutators
# Each takes (rng, case dir) and returns (input path, model path, description).

def _tok_input(d):
    p = Path(d) / "in.h5"
    write_tokens(p, base_prompts())
    return p


def _text_input(d):
    p = Path(d) / "in.h5"
    write_texts(p, BASE_TEXTS)
    return p


def m_in_bitflip(rng, d):
    p = _tok_input(d) if rng.random() < 0.6 else _text_input(d)
    n = rng.choice([1, 2, 4, 16, 64])
    region = rng.choice(["any", "superblock", "tail"])
    size = p.stat().st_size
    lo, hi = {"any": (0, size), "superblock": (0, 512), "tail": (max(0, size - 2048), size)}[region]
    flip_bits(p, rng, n, lo, hi)
    return p, TINY_HF, f"input: {n} bit flips ({region})"


def m_in_truncate(rng, d):
    p = _tok_input(d) if rng.random() < 0.6 else _text_input(d)
    data = p.read_bytes()
    cut = rng.choice([0, 1, 7, 8, 100, 511, 512, rng.randrange(len(data)), len(data) - 1])
    p.write_bytes(data[:cut])
    return p, TINY_HF, f"input: truncated to {cut} of {len(data)} bytes"


def m_in_overwrite(rng, d):
    p = _tok_input(d) if rng.random() < 0.5 else _text_input(d)
    data = bytearray(p.read_bytes())
    n = rng.choice([4, 16, 64, 256])
    pos = rng.randrange(0, max(1, len(data) - n))
    fill = rng.choice(["zeros", "ones", "random"])
    chunk = bytes(n) if fill == "zeros" else b"\xff" * n if fill == "ones" else bytes(rng.randrange(256) for _ in range(n))
    data[pos:pos + n] = chunk
    p.write_bytes(bytes(data))
    return p, TINY_HF, f"input: {n} bytes of {fill} at {pos}"


def m_in_compressed_flip(rng, d):
    """A chunked, gzip-compressed prompt_tokens dataset with bits flipped in its data."""
    p = Path(d) / "in.h5"
    hp = h5()
    rows = base_prompts() * 8
    arr = np.zeros((len(rows), 20), np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
        arr[i, len(r):] = r[0]
    with hp.File(p, "w") as f:
        f.create_dataset("prompt_tokens", data=arr, chunks=(8, 20), compression=rng.choice(["gzip", "lzf"]),
                         shuffle=rng.random() < 0.5, fletcher32=rng.random() < 0.3)
    size = p.stat().st_size
    flip_bits(p, rng, rng.choice([1, 3, 10]), size // 3, size)
    return p, TINY_HF, "input: compressed chunked dataset with bit flips"


def m_in_wrong_dtype(rng, d):
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["float2d", "vlen_float", "bool2d", "int8_2d", "uint64_2d", "strings", "int1d", "int3d",
                       "scalar", "compound", "vlen_uint8", "vlen_int16", "opaque", "float16_2d", "enum",
                       "int64_2d_big", "vlen_str_as_tokens", "ref"])
    with hp.File(p, "w") as f:
        name = "prompt_tokens"
        if kind == "float2d":
            f[name] = np.random.default_rng(rng.randrange(99)).random((4, 5)) * 100
        elif kind == "vlen_float":
            ds = f.create_dataset(name, (3,), dtype=hp.vlen_dtype(np.float32))
            for i in range(3):
                ds[i] = np.arange(i + 1, dtype=np.float32)
        elif kind == "bool2d":
            f[name] = np.ones((3, 4), bool)
        elif kind == "int8_2d":
            f[name] = np.full((3, 4), -5, np.int8)
        elif kind == "uint64_2d":
            f[name] = np.array([[1, 2, 2 ** 64 - 1], [2 ** 63, 5, 6]], np.uint64)
        elif kind == "int64_2d_big":
            f[name] = np.array([[2 ** 62, 1], [-(2 ** 63), 3]], np.int64)
        elif kind == "float16_2d":
            f[name] = np.ones((2, 3), np.float16)
        elif kind == "strings":
            f[name] = np.array([b"1 2 3", b"4 5"], "S8")
        elif kind == "int1d":
            f[name] = np.arange(10, dtype=np.int32)
        elif kind == "int3d":
            f[name] = np.ones((2, 3, 4), np.int32)
        elif kind == "scalar":
            f[name] = np.int32(5)
        elif kind == "compound":
            f[name] = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])
        elif kind == "vlen_uint8":
            ds = f.create_dataset(name, (2,), dtype=hp.vlen_dtype(np.uint8))
            ds[0], ds[1] = np.array([1, 255], np.uint8), np.array([7], np.uint8)
        elif kind == "vlen_int16":
            ds = f.create_dataset(name, (2,), dtype=hp.vlen_dtype(np.int16))
            ds[0], ds[1] = np.array([1, -300], np.int16), np.array([7], np.int16)
        elif kind == "opaque":
            f[name] = np.void(b"\x01\x02\x03\x04")
        elif kind == "enum":
            f.create_dataset(name, data=np.array([[0, 1], [1, 0]], np.int8),
                             dtype=hp.enum_dtype({"A": 0, "B": 1}, basetype="i1"))
        elif kind == "vlen_str_as_tokens":
            ds = f.create_dataset(name, (2,), dtype=hp.string_dtype())
            ds[0], ds[1] = "1 2 3", "x"
        elif kind == "ref":
            f["target"] = np.arange(3)
            ds = f.create_dataset(name, (2,), dtype=hp.ref_dtype)
            ds[0] = f["target"].ref
    return p, TINY_HF, f"input: prompt_tokens of wrong type ({kind})"


def m_in_shape(rng, d):
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["n_by_0", "0_by_t", "vlen_empty_rows", "vlen_zero_rows", "too_long_vlen", "too_long_2d",
                       "exact_limit", "one_token", "many_rows", "vlen_2d"])
    with hp.File(p, "w") as f:
        if kind == "n_by_0":
            f.create_dataset("prompt_tokens", (4, 0), dtype=np.int32)
        elif kind == "0_by_t":
            f.create_dataset("prompt_tokens", (0, 5), dtype=np.int32)
        elif kind == "vlen_empty_rows":
            ds = f.create_dataset("prompt_tokens", (3,), dtype=hp.vlen_dtype(np.int32))
            ds[0], ds[1], ds[2] = np.array([5], np.int32), np.array([], np.int32), np.array([7, 8], np.int32)
        elif kind == "vlen_zero_rows":
            f.create_dataset("prompt_tokens", (0,), dtype=hp.vlen_dtype(np.int32))
        elif kind == "too_long_vlen":
            ds = f.create_dataset("prompt_tokens", (2,), dtype=hp.vlen_dtype(np.int32))
            ds[0] = np.arange(rng.choice([127, 128, 129, 1000, 100000]), dtype=np.int32) % VOCAB
            ds[1] = np.array([1, 2], np.int32)
        elif kind == "too_long_2d":
            f["prompt_tokens"] = np.ones((2, rng.choice([127, 200, 5000])), np.int32)
        elif kind == "exact_limit":
            f["prompt_tokens"] = np.ones((2, N_POSITIONS - 2), np.int32)
        elif kind == "one_token":
            f["prompt_tokens"] = np.array([[0], [VOCAB - 1]], np.int32)
        elif kind == "many_rows":
            f["prompt_tokens"] = np.random.default_rng(rng.randrange(99)).integers(0, VOCAB, (500, 3), dtype=np.int32)
        elif kind == "vlen_2d":
            ds = f.create_dataset("prompt_tokens", (2, 2), dtype=hp.vlen_dtype(np.int32))
            ds[0, 0] = np.array([1], np.int32)
    return p, TINY_HF, f"input: shape case {kind}"


def m_in_missing(rng, d):
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["empty_file", "other_names", "group_tokens", "group_prompts", "dangling_soft",
                       "external_missing", "external_self", "nested", "attrs_only"])
    with hp.File(p, "w") as f:
        if kind == "other_names":
            f["Prompts"] = np.array([b"x"])
            f["prompt_token"] = np.ones((2, 2), np.int32)
        elif kind == "group_tokens":
            f.create_group("prompt_tokens")
        elif kind == "group_prompts":
            f.create_group("prompts").create_dataset("x", data=[1])
        elif kind == "dangling_soft":
            f["prompt_tokens"] = hp.SoftLink("/nowhere")
        elif kind == "external_missing":
            f["prompt_tokens"] = hp.ExternalLink(str(Path(d) / "missing.h5"), "/prompt_tokens")
        elif kind == "external_self":
            f["prompt_tokens"] = hp.ExternalLink(str(p), "/prompt_tokens")
        elif kind == "nested":
            f.create_group("data")["prompt_tokens"] = np.ones((2, 2), np.int32)
        elif kind == "attrs_only":
            f.attrs["prompt_tokens"] = np.ones(3, np.int32)
    return p, TINY_HF, f"input: datasets missing ({kind})"


def m_in_token_values(rng, d):
    p = Path(d) / "in.h5"
    rows = [r.copy() for r in base_prompts()]
    kind = rng.choice(["negative", "int32_max", "vocab_size", "vocab_minus_1", "int64_huge", "uint32_max", "mixed"])
    dtype = np.int32
    bad = {"negative": -1, "int32_max": 2 ** 31 - 1, "vocab_size": VOCAB, "vocab_minus_1": VOCAB - 1,
           "int64_huge": 2 ** 62, "uint32_max": 2 ** 32 - 1, "mixed": -(2 ** 31)}[kind]
    if kind == "int64_huge":
        dtype = np.int64
    if kind == "uint32_max":
        dtype = np.uint32
    k = rng.randrange(len(rows))
    rows = [np.asarray(r, np.int64) for r in rows]
    rows[k][rng.randrange(len(rows[k]))] = bad
    if kind == "mixed":
        rows[(k + 1) % len(rows)][0] = VOCAB + 5
    write_tokens(p, [r.astype(dtype) for r in rows], dtype)
    return p, TINY_HF, f"input: token id {kind} ({bad})"


def _fixed_utf8(f, name, arr):
    """A fixed-length string dataset marked UTF-8, written with the low-level API (h5py's high-level
    one will not convert bytes to it)."""
    hp = h5()
    tid = hp.h5t.C_S1.copy()
    tid.set_size(arr.dtype.itemsize)
    tid.set_cset(hp.h5t.CSET_UTF8)
    space = hp.h5s.create_simple(arr.shape)
    dset = hp.h5d.create(f.id, name.encode(), tid, space)
    dset.write(hp.h5s.ALL, hp.h5s.ALL, arr, mtype=tid)


def m_in_text_nul(rng, d):
    """HDF5 variable-length strings cannot hold NUL (h5py refuses to write one); fixed-length ones can."""
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["fixed_embedded", "fixed_all_nul", "fixed_utf8_embedded", "fixed_padded", "fixed_lead"])
    with hp.File(p, "w") as f:
        if kind == "fixed_embedded":
            f["prompts"] = np.array([b"ab\x00cd", b"ok"], "S8")
        elif kind == "fixed_all_nul":
            f["prompts"] = np.array([b"\x00\x00\x00", b"x"], "S3")
        elif kind == "fixed_utf8_embedded":
            _fixed_utf8(f, "prompts", np.array(["caf\u00e9\x00\u2615".encode(), b"x"], "S12"))
        elif kind == "fixed_padded":
            _fixed_utf8(f, "prompts", np.array([b"hi", b"there"], "S40"))
        elif kind == "fixed_lead":
            f["prompts"] = np.array([b"\x00lead", b"\x00"], "S6")
    return p, TINY_HF, f"input: NUL bytes in prompts ({kind})"


def m_in_text_utf8(rng, d):
    p = Path(d) / "in.h5"
    bad = rng.choice([b"\xff\xfe", b"caf\xe9", b"\xc0\xaf", b"\xed\xa0\x80", b"trunc\xe2\x82", b"\x80",
                      b"\xf4\x90\x80\x80"])
    enc = rng.choice(["utf-8", "ascii"])
    texts = [t.encode() for t in BASE_TEXTS]
    texts[rng.randrange(len(texts))] = bad
    hp = h5()
    if rng.random() < 0.3:
        with hp.File(p, "w") as f:
            f["prompts"] = np.array(texts, dtype=f"S{max(map(len, texts))}")
    else:
        write_texts(p, texts, encoding=enc)
    return p, TINY_HF, f"input: invalid UTF-8 {bad!r} in prompts ({enc})"


def m_in_text_misc(rng, d):
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["empty_strings", "whitespace", "very_long", "special_only", "int_prompts", "strings_2d",
                       "emoji", "zero_rows", "control_chars", "scalar_string"])
    with hp.File(p, "w") as f:
        if kind == "empty_strings":
            f.create_dataset("prompts", data=["", "x", ""], dtype=hp.string_dtype())
        elif kind == "whitespace":
            f.create_dataset("prompts", data=[" ", "\n\n", "\t"], dtype=hp.string_dtype())
        elif kind == "very_long":
            f.create_dataset("prompts", data=["word " * rng.choice([30, 200, 20000]), "ok"], dtype=hp.string_dtype())
        elif kind == "special_only":
            f.create_dataset("prompts", data=["<|endoftext|>", "<|endoftext|><|endoftext|>"], dtype=hp.string_dtype())
        elif kind == "int_prompts":
            f["prompts"] = np.arange(4, dtype=np.int32)
        elif kind == "strings_2d":
            f.create_dataset("prompts", data=[["a", "b"], ["c", "d"]], dtype=hp.string_dtype())
        elif kind == "emoji":
            f.create_dataset("prompts", data=["🦄🦄🦄", "\U0010ffff", "ﬁ"], dtype=hp.string_dtype())
        elif kind == "zero_rows":
            f.create_dataset("prompts", (0,), dtype=hp.string_dtype())
        elif kind == "control_chars":
            f.create_dataset("prompts", data=["\x01\x02\x1b[31m", "\r\n\x7f"], dtype=hp.string_dtype())
        elif kind == "scalar_string":
            f.create_dataset("prompts", data="just one", dtype=hp.string_dtype())
    return p, TINY_HF, f"input: text prompts ({kind})"


def m_in_both(rng, d):
    p = Path(d) / "in.h5"
    hp = h5()
    kind = rng.choice(["tokens_broken_text_ok", "tokens_ok_text_broken", "both_empty"])
    with hp.File(p, "w") as f:
        if kind == "tokens_broken_text_ok":
            f["prompt_tokens"] = np.ones((2, 2), np.float32)
            f.create_dataset("prompts", data=["a", "b"], dtype=hp.string_dtype())
        elif kind == "tokens_ok_text_broken":
            f["prompt_tokens"] = np.ones((2, 2), np.int32)
            f["prompts"] = np.ones(3, np.float64)
        else:
            f.create_dataset("prompt_tokens", (0,), dtype=hp.vlen_dtype(np.int32))
            f.create_dataset("prompts", (0,), dtype=hp.string_dtype())
    return p, TINY_HF, f"input: both datasets ({kind})"


def m_in_not_hdf5(rng, d):
    kind = rng.choice(["text", "empty", "directory", "missing", "safetensors", "npz", "random_bytes", "h5_magic_only",
                       "userblock"])
    p = Path(d) / "in.h5"
    if kind == "text":
        p.write_text("Hello\nworld\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "directory":
        p.mkdir()
    elif kind == "missing":
        pass
    elif kind == "safetensors":
        shutil.copy(TINY_HF / "model.safetensors", p)
    elif kind == "npz":
        shutil.copy(FIXTURES / "tiny_expected.npz", p)
    elif kind == "random_bytes":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([10, 1000, 5000]))))
    elif kind == "h5_magic_only":
        p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(rng.choice([0, 8, 100])))
    elif kind == "userblock":
        hp = h5()
        with hp.File(p, "w", userblock_size=512) as f:
            f["prompt_tokens"] = np.ones((2, 3), np.int32)
        with open(p, "r+b") as f:
            f.write(b"garbage in the user block")
    return p, TINY_HF, f"input: not an HDF5 prompts file ({kind})"


# ---- model mutators

BAD_VALUES = [-1, 0, "12", "abc", 2.5, "INF", "NAN", "-INF", None, [], {}, True, False, 10 ** 30, 2 ** 63, "",
              -(10 ** 30), [64], 1e-300]
CONFIG_KEYS = ["n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
               "activation_function", "eos_token_id", "n_inner", "scale_attn_by_inverse_layer_idx", "model_type",
               "num_hidden_layers", "hidden_size", "max_position_embeddings"]


def _dump_config(cfg):
    """json.dumps, with the strings 'INF'/'-INF'/'NAN' written as the numbers 1e999, -1e999 and NaN."""
    text = json.dumps(cfg, indent=2)
    return text.replace('"INF"', "1e999").replace('"-INF"', "-1e999").replace('"NAN"', "NaN")


def m_cfg_types(rng, d):
    m = copy_model(d)
    cfg = json.loads((m / "config.json").read_text())
    keys = rng.sample(CONFIG_KEYS, rng.choice([1, 1, 2]))
    for k in keys:
        cfg[k] = rng.choice(BAD_VALUES)
    (m / "config.json").write_text(_dump_config(cfg))
    return _tok_input(d), m, "config.json: " + ", ".join(f"{k}={cfg[k]!r}" for k in keys)


def m_cfg_bytes(rng, d):
    m = copy_model(d)
    path = m / "config.json"
    raw = path.read_bytes()
    kind = rng.choice(["bitflip", "truncate", "empty", "invalid_utf8", "bom", "array", "string", "deep",
                       "missing", "directory", "duplicate_keys", "huge_number_text"])
    if kind == "bitflip":
        flip_bits(path, rng, rng.choice([1, 3, 10]))
    elif kind == "truncate":
        path.write_bytes(raw[:rng.randrange(len(raw))])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "invalid_utf8":
        path.write_bytes(raw.replace(b'"gpt2"', b'"gpt\xff2"'))
    elif kind == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + raw)
    elif kind == "array":
        path.write_text("[1, 2, 3]")
    elif kind == "string":
        path.write_text('"gpt2"')
    elif kind == "deep":
        path.write_text("[" * 100000 + "]" * 100000)
    elif kind == "missing":
        path.unlink()
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    elif kind == "duplicate_keys":
        path.write_bytes(raw.replace(b'"n_layer": 2', b'"n_layer": 2, "n_layer": 7'))
    elif kind == "huge_number_text":
        path.write_bytes(raw.replace(b'"n_layer": 2', b'"n_layer": 1' + b"0" * 5000))
    return _tok_input(d), m, f"config.json: {kind}"


def m_cfg_mismatch(rng, d):
    m = copy_model(d)
    cfg = json.loads((m / "config.json").read_text())
    change = rng.choice([("vocab_size", 999), ("vocab_size", 50257), ("n_positions", 64), ("n_positions", 4),
                         ("n_positions", 2), ("n_positions", 1), ("n_positions", 4096), ("n_layer", 1),
                         ("n_layer", 3), ("n_head", 8), ("n_head", 3), ("n_embd", 128), ("n_inner", 128),
                         ("n_inner", -5), ("eos_token_id", -1), ("eos_token_id", 5000), ("eos_token_id", 2 ** 40),
                         ("activation_function", "relu"), ("activation_function", "gelu"),
                         ("layer_norm_epsilon", -1.0), ("model_type", "llama"), ("n_layer", 10 ** 6),
                         ("n_positions", 10 ** 12), ("vocab_size", 10 ** 12)])
    cfg[change[0]] = change[1]
    (m / "config.json").write_text(json.dumps(cfg))
    return _tok_input(d), m, f"config.json: {change[0]}={change[1]} (weights unchanged)"


def m_st_bitflip(rng, d):
    m = copy_model(d)
    path = m / "model.safetensors"
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    region = rng.choice(["size", "header", "data"])
    lo, hi = {"size": (0, 8), "header": (8, 8 + n), "data": (8 + n, path.stat().st_size)}[region]
    k = rng.choice([1, 2, 8, 32])
    flip_bits(path, rng, k, lo, hi)
    return _tok_input(d), m, f"model.safetensors: {k} bit flips in the {region}"


def m_st_truncate(rng, d):
    m = copy_model(d)
    path = m / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = rng.choice([0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(raw) - 4, len(raw) - 1, rng.randrange(len(raw))])
    path.write_bytes(raw[:cut])
    return _tok_input(d), m, f"model.safetensors: truncated to {cut} of {len(raw)} bytes"


def m_st_header(rng, d):
    m = copy_model(d)
    path = m / "model.safetensors"
    header, data = st_parts(path)
    names = tensor_names(header)
    name = rng.choice(names)
    e = header[name]
    kind = rng.choice(["dtype_name", "dtype_i32", "dtype_f16", "dtype_bf16", "dtype_f64", "shape_swap",
                       "shape_neg", "shape_huge", "shape_bigint", "shape_nested", "shape_str", "shape_scalar",
                       "offsets_past_end", "offsets_reversed", "offsets_missing", "offsets_float", "entry_list",
                       "header_list", "metadata_list", "size_huge", "size_zero", "size_odd", "not_json",
                       "dtype_bool", "shape_float", "offsets_neg", "size_minus_1"])
    size_field, pad = None, True
    if kind == "dtype_name":
        e["dtype"] = rng.choice(["F33", "f32", "", "Q8"])
    elif kind == "dtype_i32":
        e["dtype"] = "I32"
    elif kind == "dtype_f16":
        e["dtype"] = "F16"
    elif kind == "dtype_bf16":
        e["dtype"] = "BF16"
    elif kind == "dtype_f64":
        e["dtype"] = "F64"
    elif kind == "dtype_bool":
        e["dtype"] = "BOOL"
    elif kind == "shape_swap":
        e["shape"] = list(reversed(e["shape"])) + ([1] if len(e["shape"]) == 1 else [])
    elif kind == "shape_neg":
        e["shape"] = [-s for s in e["shape"]]
    elif kind == "shape_huge":
        e["shape"] = [2 ** 40] + e["shape"][1:]
    elif kind == "shape_bigint":
        e["shape"] = [2 ** 70, 0]
    elif kind == "shape_nested":
        e["shape"] = [e["shape"]]
    elif kind == "shape_str":
        e["shape"] = [str(s) for s in e["shape"]]
    elif kind == "shape_float":
        e["shape"] = [s + 0.5 for s in e["shape"]]
    elif kind == "shape_scalar":
        e["shape"] = []
    elif kind == "offsets_past_end":
        e["data_offsets"] = [len(data) - 4, len(data) - 4 + (e["data_offsets"][1] - e["data_offsets"][0])]
    elif kind == "offsets_reversed":
        e["data_offsets"] = list(reversed(e["data_offsets"]))
    elif kind == "offsets_neg":
        a, b = e["data_offsets"]
        e["data_offsets"] = [a - 10 ** 6, b - 10 ** 6]
    elif kind == "offsets_missing":
        del e["data_offsets"]
    elif kind == "offsets_float":
        e["data_offsets"] = [float(x) + 0.5 for x in e["data_offsets"]]
    elif kind == "entry_list":
        header[name] = [e["dtype"], e["shape"]]
    elif kind == "header_list":
        header = [header]
    elif kind == "metadata_list":
        header["__metadata__"] = ["x", 1]
    elif kind == "size_huge":
        size_field = 2 ** 63
    elif kind == "size_zero":
        size_field = 0
    elif kind == "size_minus_1":
        size_field = 2 ** 64 - 1
    elif kind == "size_odd":
        pad = False
    elif kind == "not_json":
        header = b"{not json" + bytes([rng.randrange(256) for _ in range(8)])
    st_write(path, header, data, pad=pad, size_field=size_field)
    return _tok_input(d), m, f"model.safetensors header: {kind} ({name})"


def m_st_values(rng, d):
    m = copy_model(d)
    path = m / "model.safetensors"
    header, data = st_parts(path)
    name = rng.choice(tensor_names(header))
    a, b = header[name]["data_offsets"]
    arr = np.frombuffer(data[a:b], "<f4").copy()
    val = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45, 0.0])
    idx = rng.randrange(len(arr)) if rng.random() < 0.7 else slice(None)
    arr[idx] = val
    data = data[:a] + arr.tobytes() + data[b:]
    st_write(path, header, data)
    return _tok_input(d), m, f"model.safetensors: {name}[{'all' if isinstance(idx, slice) else idx}] = {val}"


def m_st_tensors(rng, d):
    m = copy_model(d)
    path = m / "model.safetensors"
    header, data = st_parts(path)
    names = tensor_names(header)
    kind = rng.choice(["remove", "rename", "extra", "lm_head_ok", "lm_head_wrong_shape", "strip_prefix_mixed",
                       "duplicate_after_strip", "attn_bias_buffer", "empty_header"])
    name = rng.choice(names)
    if kind == "remove":
        del header[name]
    elif kind == "rename":
        header[name + "_x"] = header.pop(name)
    elif kind == "extra":
        header["transformer.h.9.mlp.c_fc.weight"] = dict(header[name])
    elif kind == "lm_head_ok":
        header["lm_head.weight"] = dict(header["transformer.wte.weight"])
    elif kind == "lm_head_wrong_shape":
        header["lm_head.weight"] = dict(header[name])
    elif kind == "strip_prefix_mixed":
        header[name[len("transformer."):]] = header.pop(name)
    elif kind == "duplicate_after_strip":
        header[name[len("transformer."):]] = dict(header[name])
    elif kind == "attn_bias_buffer":
        header["transformer.h.0.attn.bias"] = dict(header[name])
    elif kind == "empty_header":
        header = {}
    st_write(path, header, data)
    return _tok_input(d), m, f"model.safetensors tensors: {kind} ({name})"


def m_model_files(rng, d):
    kind = rng.choice(["no_weights", "pickle_only", "index_malformed", "index_missing_shard", "index_traversal",
                       "nonexistent", "empty_dir", "config_as_model", "weights_dir", "symlink_loop",
                       "index_ok", "unreadable_weights"])
    m = copy_model(d)
    model = m
    if kind == "no_weights":
        (m / "model.safetensors").unlink()
    elif kind == "pickle_only":
        (m / "model.safetensors").rename(m / "pytorch_model.bin")
    elif kind.startswith("index"):
        (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
        idx = {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}
        if kind == "index_malformed":
            text = rng.choice(['{"weight_map": [1, 2]}', "{", '{"weight_map": {"a": 5}}', "[]",
                               '{"weight_map": {"a": null}}'])
        elif kind == "index_missing_shard":
            idx["weight_map"]["x"] = "model-00002-of-00002.safetensors"
            text = json.dumps(idx)
        elif kind == "index_traversal":
            idx["weight_map"]["x"] = "../../../etc/passwd"
            text = json.dumps(idx)
        else:
            text = json.dumps(idx)
        (m / "model.safetensors.index.json").write_text(text)
    elif kind == "nonexistent":
        model = Path(d) / "no-such-model"
    elif kind == "empty_dir":
        model = Path(d) / "empty"
        model.mkdir()
    elif kind == "config_as_model":
        model = m / "config.json"
    elif kind == "weights_dir":
        (m / "model.safetensors").unlink()
        (m / "model.safetensors").mkdir()
    elif kind == "symlink_loop":
        (m / "model.safetensors").unlink()
        os.symlink(m / "model.safetensors", m / "model.safetensors")
    elif kind == "unreadable_weights":
        (m / "model.safetensors").unlink()
        os.symlink("/proc/self/mem", m / "model.safetensors")
    return _tok_input(d), model, f"model folder: {kind}"


def m_flat_bin(rng, d):
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import flat_size
    full = 4 * flat_size(PRESETS["gpt2"])
    kind = rng.choice(["empty", "small", "off_by_4", "plus_4", "odd_size", "tiny_model_flat"]
                      + (["exact_nan", "exact_zeros"] if HEAVY else []))
    p = Path(d) / "model.bin"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "small":
        p.write_bytes(bytes(rng.randrange(1, 100000)))
    elif kind == "tiny_model_flat":  # the tiny model's weights written flat: a size no preset has
        from gpt2job.model import hf_dir
        from gpt2job.model.weights import save_flat_file
        save_flat_file(hf_dir.load(str(TINY_HF)), str(p))
    else:
        size = {"off_by_4": full - 4, "plus_4": full + 4, "odd_size": full - 1, "exact_nan": full,
                "exact_zeros": full}[kind]
        with open(p, "wb") as f:                     # sparse: no disk space used
            f.truncate(size)
            if kind == "exact_nan":
                f.seek(rng.randrange(0, size // 4) * 4)
                f.write(np.array([np.nan], "<f4").tobytes())
    return _tok_input(d), p, f"flat .bin: {kind}"


MUTATORS = [m_in_bitflip, m_cfg_types, m_st_header, m_in_truncate, m_cfg_bytes, m_st_bitflip, m_in_wrong_dtype,
            m_cfg_mismatch, m_st_truncate, m_in_shape, m_st_values, m_in_missing, m_st_tensors, m_in_token_values,
            m_model_files, m_in_text_nul, m_flat_bin, m_in_text_utf8, m_in_overwrite, m_in_text_misc,
            m_in_compressed_flip, m_in_both, m_in_not_hdf5,
            # the cheap and rich ones again, so they get a larger share
            m_in_bitflip, m_st_header, m_cfg_types, m_st_bitflip, m_in_overwrite, m_in_wrong_dtype, m_st_tensors]


# ---------------------------------------------------------------- running one case

@dataclass
class Result:
    index: int
    mutator: str
    description: str = ""
    outcome: str = ""
    exit_code: object = None
    seconds: float = 0.0
    stderr: str = ""
    traceback: str = ""
    files: list = field(default_factory=list)


def _cached_tokenizer():
    """Load the tokenizer once in this (parent) process; forked cases share it (saves 0.15 s each)."""
    import functools
    import gpt2job.cluster.master as job
    from gpt2job.model.tokenizer import load_tokenizer
    if not getattr(job.load_tokenizer, "_fuzz_cached", False):
        cached = functools.lru_cache(maxsize=4)(load_tokenizer)
        cached._fuzz_cached = True
        job.load_tokenizer = cached
        if VOCAB_DIR:
            cached(VOCAB_DIR)


def _classify(code, err, files, out_path):
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("gpt2job: error:")]
    if code == 0:
        try:
            import h5py
            with h5py.File(out_path, "r") as f:
                ok = int(f.attrs.get("finished", 0)) == 1 and bool(np.all(f["done"][()] == 1))
        except Exception:
            ok = False
        return "success" if ok else "bad_success"
    if code == 2:
        if len(errors) == 1 and "Traceback" not in err and any(str(p) in errors[0] for p in files):
            return "clear"
        if (len(errors) == 1 and "--vocab-dir" in errors[0] and "tiktoken could not load" in errors[0]
                and not VOCAB_DIR):
            return "no_vocab"
        return "unclear"
    return "other_exit"


def _child(i, mutator, seed, workdir, wfd):
    """In the forked child: build the case, run gpt2job's main() in this process, report through wfd."""
    res = {"description": "", "exit_code": None, "stderr": "", "traceback": "", "files": [], "phase": "build"}
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)   # HDF5's C-level messages; gpt2job's own go to sys.stderr below
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        rng = random.Random(f"{seed}:{i}")
        d = Path(workdir) / f"case{i:04d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        inp, model, desc = mutator(rng, d)
        res["description"] = desc
        res["files"] = [str(inp), str(model)]
        os.write(wfd, json.dumps({"description": desc, "files": res["files"]}).encode() + b"\n")  # known if it hangs
        out = d / "out.h5"
        argv = ["run", str(inp), str(out), "--model", str(model), "--max-new-tokens", "2", "--backend", "numpy",
                "--progress-interval", "1000"]
        if VOCAB_DIR:
            argv += ["--vocab-dir", VOCAB_DIR]
        res["argv"] = argv
        res["phase"] = "run"
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        from gpt2job.cli import main
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            res["traceback"] = traceback.format_exc()
            code = "traceback"
        res["exit_code"] = code
        res["stderr"] = sys.stderr.getvalue()
        if code != "traceback":
            res["outcome"] = _classify(code, res["stderr"], res["files"], out)
    except BaseException:
        res["traceback"] = traceback.format_exc()
        res["exit_code"] = "traceback"
    data = json.dumps(res, default=str).encode() + b"\n"
    while data:
        data = data[os.write(wfd, data):]
    os._exit(0)


def run_cases(indices, seed, workdir, timeout=60.0, jobs=2, keep="failures", progress=None):
    """Run the given case indices, `jobs` at a time, each in a forked child. Returns [Result]."""
    import h5py  # noqa: F401 -- load before forking, so children don't
    import gpt2job.cli  # noqa: F401
    import gpt2job.cluster.master  # noqa: F401
    _cached_tokenizer()
    pending = list(indices)
    running = {}   # pid -> (Result, read fd, start, chunks)
    results = []
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            mut = MUTATORS[i % len(MUTATORS)]
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _child(i, mut, seed, workdir, w)
            os.close(w)
            running[pid] = (Result(i, mut.__name__), r, time.monotonic(), [])
        fds = {v[1]: pid for pid, v in running.items()}
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            chunk = os.read(fd, 1 << 20)
            pid = fds[fd]
            if chunk:
                running[pid][3].append(chunk)
                continue
            res, _, t0, chunks = running.pop(pid)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            res.seconds = time.monotonic() - t0
            _finish(res, b"".join(chunks), status)
            results.append(res)
            if progress:
                progress(res)
        now = time.monotonic()
        for pid, (res, fd, t0, chunks) in list(running.items()):
            if now - t0 > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(fd)
                running.pop(pid)
                res.seconds = now - t0
                res.outcome = "hang"
                first = _last_json(b"".join(chunks))
                res.description, res.files = first.get("description", ""), first.get("files", [])
                results.append(res)
                if progress:
                    progress(res)
    if keep == "failures":
        for res in results:
            if res.outcome in ("clear", "success"):
                shutil.rmtree(Path(workdir) / f"case{res.index:04d}", ignore_errors=True)
    results.sort(key=lambda r: r.index)
    return results


def _last_json(raw):
    for line in reversed(raw.splitlines()):
        try:
            return json.loads(line.decode())
        except ValueError:
            continue
    return {}


def _finish(res, raw, status):
    d = _last_json(raw)
    if "exit_code" not in d:
        res.description, res.files = d.get("description", ""), d.get("files", [])
        res.outcome = "crash"
        res.exit_code = f"wait status {status}" + (
            f" (signal {os.WTERMSIG(status)})" if os.WIFSIGNALED(status) else "")
        return
    res.description = d.get("description", "")
    res.exit_code = d.get("exit_code")
    res.stderr = d.get("stderr", "")
    res.traceback = d.get("traceback", "")
    res.files = d.get("files", [])
    if res.traceback:
        res.outcome = "traceback" if d.get("phase") == "run" else "build_error"
    else:
        res.outcome = d.get("outcome", "other_exit")


OUTCOMES = ["clear", "success", "no_vocab", "unclear", "bad_success", "other_exit", "traceback", "crash", "hang",
            "build_error"]


def summary_table(results):
    counts = {o: 0 for o in OUTCOMES}
    by_mut = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        by_mut.setdefault(r.mutator, {}).setdefault(r.outcome, 0)
        by_mut[r.mutator][r.outcome] += 1
    lines = [f"{'outcome':<12} {'cases':>6}"]
    lines += [f"{o:<12} {counts[o]:>6}" for o in OUTCOMES if counts[o] or o in ("clear", "success", "traceback", "hang")]
    lines.append(f"{'total':<12} {len(results):>6}")
    lines.append("")
    short = {"clear": "clear", "success": "ok", "no_vocab": "novoc", "unclear": "unclr", "bad_success": "badok", "other_exit": "exit?",
             "traceback": "tb", "crash": "crash", "hang": "hang", "build_error": "build"}
    cols = [o for o in OUTCOMES if counts[o]]
    lines.append(f"{'mutator':<22}" + "".join(f"{short[o]:>7}" for o in cols))
    for m in sorted(by_mut):
        lines.append(f"{m:<22}" + "".join(f"{by_mut[m].get(o, 0):>7}" for o in cols))
    return "\n".join(lines), counts


GOOD = ("clear", "success", "no_vocab")


def main():
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--light", action="store_true", help="leave out the cases that load a 500 MB flat file")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", help="where the cases' files go (default: a temporary folder)")
    ap.add_argument("--json-out", help="write every case's outcome here")
    a = ap.parse_args()
    global HEAVY
    HEAVY = not a.light
    workdir = a.workdir or tempfile.mkdtemp(prefix="gpt2job-fuzz-")
    results = run_cases(range(a.cases), a.seed, workdir, timeout=a.timeout, jobs=a.jobs)
    table, _ = summary_table(results)
    print(table)
    bad = [r for r in results if r.outcome not in GOOD]
    for r in bad:
        print(f"\ncase {r.index} {r.mutator}: {r.description}\n  outcome {r.outcome}, exit {r.exit_code}, "
              f"files {r.files}\n" + "\n".join("  " + line for line in
                                                 (r.traceback or r.stderr).strip().splitlines()[-8:]))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{"index": r.index, "mutator": r.mutator, "outcome": r.outcome} for r in results], f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
