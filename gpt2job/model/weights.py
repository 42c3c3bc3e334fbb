"""Loading GPT-2 weights: Hugging Face checkpoint directories, the old system's flat float32 file,
and seeded random weights of the real shapes (`random:gpt2`, `random:gpt2-medium`, ...).

Model files are never unpickled: only safetensors and raw float32 are read.
"""
import difflib
import hashlib
import json
import os

import numpy as np

from gpt2job.model.safetensors_io import PICKLE_FIX, is_pickle, looks_like_safetensors
from gpt2job.model.config import PRESETS, GPT2Config, validate_config
from gpt2job.errors import UserError
from gpt2job.model import hf_dir, hub
from gpt2job.model.params import LAYER_TENSORS, GPT2Params, global_shapes, layer_shapes

CHECKPOINT_FIX = "give a directory with config.json and model.safetensors, a flat .bin file, or random:gpt2"


# ---------------------------------------------------------------- model spec -> (config, loader)

def parse_random_spec(spec):
    """'random:gpt2' / 'random:gpt2-xl:7' / 'random:n_layer=2,n_head=4,n_embd=64,vocab_size=1000:3'."""
    body = spec[len("random:"):]
    name, _, seed = body.partition(":")
    try:
        seed = int(seed) if seed else 0
        if not 0 <= seed < 2 ** 63:
            raise ValueError
    except ValueError:
        raise UserError(f"seed {seed!r} is not an integer in 0..2^63-1", spec, "--model", "write random:gpt2:SEED")
    if name in PRESETS:
        return PRESETS[name], seed
    fields = {}
    known = [k for k in GPT2Config.__dataclass_fields__ if k != "more_eos_token_ids"]   # (read from a config's list)
    for item in filter(None, name.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise UserError(f"unknown model {name!r}", spec, "--model",
                            f"use one of {', '.join('random:' + p for p in PRESETS)} or random:n_layer=2,n_embd=64,...")
        if k not in known:
            close = difflib.get_close_matches(k, known, 1)
            raise UserError(f"unknown config field {k!r} (known: {', '.join(known)})", spec, "--model",
                            f"write {close[0]}={v}" if close else
                            "write random:FIELD=VALUE,... with known fields, e.g. random:n_layer=2,n_head=2,n_embd=32")
        fields[k] = _field_value(spec, k, v)
    cfg = GPT2Config(**fields)
    validate_config(cfg, spec)
    return cfg, seed


def _field_value(spec, k, v):
    kind = type(getattr(GPT2Config(), k))
    try:
        if kind is bool:
            if v.lower() not in ("1", "0", "true", "false"):
                raise ValueError(v)
            return v.lower() in ("1", "true")
        return kind(v)
    except ValueError:
        what = "a switch (1/0, true/false)" if kind is bool else "a number" if kind is float else "an integer"
        raise UserError(f"{k}={v!r} is not {what}", spec, "--model", f"give {k} {what}")


def load_config(spec, warn=False):
    """The model's config without reading its weights (what the master needs); warn: say what the job will
    not do as transformers would (hf_dir.read_config)."""
    spec = hub.resolve(spec)
    if spec.startswith("random:"):
        return parse_random_spec(spec)[0]
    if os.path.isdir(spec):
        cfg = hf_dir.read_config(spec, warn)
        hf_dir.check_tensors(hf_dir.tensor_index(spec), cfg, spec)   # the headers only: a bad folder stops the job
        return cfg
    if not os.path.isfile(spec):
        raise UserError("no such file or directory", spec, "--model", CHECKPOINT_FIX)
    return _flat_config(spec)


def load_params(spec):
    """Load the full parameter set named by `spec` (see module doc)."""
    spec = hub.resolve(spec)
    if spec.startswith("random:"):
        cfg, seed = parse_random_spec(spec)
        p = random_params(cfg, seed)
        p.fingerprint = fingerprint(spec)
        return p
    if os.path.isdir(spec):
        p = hf_dir.load(spec)
        p.fingerprint = fingerprint(spec)
        return p
    if os.path.isfile(spec):
        return load_flat_file(spec)
    raise UserError("no such file or directory", spec, "--model", CHECKPOINT_FIX)


def describe(spec):
    """--model as the starting line names it: random weights say that they are not a trained model."""
    return f"{spec} (seeded random weights, not a trained model)" if spec.startswith("random:") else spec


def fingerprint(spec):
    """A cheap identity of the model (config + sampled file bytes) for the resume check."""
    spec = hub.resolve(spec)
    if spec.startswith("random:"):
        cfg, seed = parse_random_spec(spec)
        return "random:" + hashlib.sha256(json.dumps([cfg.to_dict(), seed], sort_keys=True).encode()).hexdigest()[:32]
    h = hashlib.sha256()
    try:
        files = [spec] if os.path.isfile(spec) else sorted(
            os.path.join(spec, f) for f in os.listdir(spec)
            if (f == "config.json" or f.endswith(".safetensors")) and os.path.isfile(os.path.join(spec, f)))
        for path in files:
            h.update(os.path.basename(path).encode())
            h.update(_sample_file(path))
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", getattr(e, "filename", None) or spec, "--model",
                        CHECKPOINT_FIX)
    return "sha256:" + h.hexdigest()[:32]


def _sample_file(path, blocks=64, block=65536):
    size = os.path.getsize(path)
    out = [str(size).encode()]
    with open(path, "rb") as f:
        if size <= blocks * block:
            out.append(f.read())
        else:
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                out.append(f.read(block))
    return hashlib.sha256(b"".join(out)).digest()


# ---------------------------------------------------------------- random weights

def random_params(cfg: GPT2Config, seed=0):
    """Seeded weights of the real shapes: N(0, 0.02) matrices and embeddings, small random biases and
    layer-norm parameters near 1, so the model's activations look like a trained model's in scale."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    layers = []
    for _ in range(cfg.n_layer):
        layer = {}
        for name, shape in layer_shapes(cfg).items():
            if name.endswith("weight") and name.startswith("ln"):
                layer[name] = 1.0 + normal(shape, 0.1)
            elif name.endswith("bias"):
                layer[name] = normal(shape, 0.02)
            else:
                layer[name] = normal(shape, 0.02)
        layers.append(layer)
    return GPT2Params(
        config=cfg,
        wte=normal((cfg.vocab_size, cfg.n_embd), 0.02),
        wpe=normal((cfg.n_positions, cfg.n_embd), 0.01),
        layers=layers,
        ln_f_w=1.0 + normal((cfg.n_embd,), 0.1),
        ln_f_b=normal((cfg.n_embd,), 0.02),
    )


# ---------------------------------------------------------------- the old system's flat float32 file

def _layer_order(n_layer):
    """Layers in sorted-name order: 0, 1, 10, 11, 2, ..., 9 for 12 layers."""
    return sorted(range(n_layer), key=str)


def flat_size(cfg):
    per_layer = sum(int(np.prod(s)) for s in layer_shapes(cfg).values())
    return cfg.n_layer * per_layer + sum(int(np.prod(s)) for s in global_shapes(cfg).values())


def _flat_config(path):
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "--model", CHECKPOINT_FIX)
    for name, cfg in PRESETS.items():
        if size == 4 * flat_size(cfg):
            return cfg
    kind = _file_kind(path)
    if kind == "pickle":
        raise UserError("is a pickle file (PyTorch's torch.save or pytorch_model.bin): pickle refused, gpt2job "
                        "never unpickles model files", path, "--model", PICKLE_FIX)
    if kind == "safetensors" or os.path.basename(path) in ("config.json", "model.safetensors.index.json"):
        raise UserError(f"is {'a safetensors file' if kind else 'a file of a checkpoint folder'}: give the folder "
                        "that holds it with its config.json", path, "--model",
                        f"--model {os.path.dirname(os.path.abspath(path))}")
    raise UserError(f"size {size} bytes matches no GPT-2 flat parameter file "
                    f"(GPT-2 124M is {4 * flat_size(PRESETS['gpt2'])} bytes of float32)", path, "file size",
                    "the file is truncated or not a flat float32 GPT-2 file; copy it again")


def _file_kind(path):
    """'pickle' (a pickle stream or PyTorch's zip archive), 'safetensors' or None, from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if is_pickle(head):
        return "pickle"
    if looks_like_safetensors(head):
        return "safetensors"
    return None


def load_flat_file(path, cfg=None):
    """The old C++ system's parameter file: float32, per layer the 12 tensors in sorted-name order,
    layers in sorted-name order, then ln_f.bias, ln_f.weight, wpe, wte. The config is GPT-2's, found
    from the file size (124M is the old system's; the other published sizes are recognised too)."""
    if cfg is None:
        cfg = _flat_config(path)
    elif os.path.getsize(path) != 4 * flat_size(cfg):
        raise UserError(f"size {os.path.getsize(path)} bytes, expected {4 * flat_size(cfg)}", path, "file size",
                        "the file is truncated or for another model size")
    data = np.fromfile(path, dtype="<f4")
    pos = 0

    def take(shape):
        nonlocal pos
        n = int(np.prod(shape))
        arr = data[pos:pos + n].reshape(shape)
        pos += n
        return arr

    layers = [None] * cfg.n_layer
    shapes = layer_shapes(cfg)
    for i in _layer_order(cfg.n_layer):
        layers[i] = {n: take(shapes[n]) for n in LAYER_TENSORS}
    g = global_shapes(cfg)
    ln_f_b, ln_f_w = take(g["ln_f.bias"]), take(g["ln_f.weight"])
    wpe, wte = take(g["wpe.weight"]), take(g["wte.weight"])
    if not np.isfinite(data).all():
        raise UserError("contains NaN or infinite values", path, "parameters", "the file is corrupt; copy it again")
    p = GPT2Params(config=cfg, wte=wte, wpe=wpe, layers=layers, ln_f_w=ln_f_w, ln_f_b=ln_f_b)
    p.fingerprint = fingerprint(path)
    return p


def save_flat_file(params, path):
    """Write params in the old system's flat layout (tests and benchmarks)."""
    cfg = params.config
    with open(path, "wb") as f:
        for i in _layer_order(cfg.n_layer):
            for n in LAYER_TENSORS:
                f.write(np.ascontiguousarray(params.layers[i][n], "<f4").tobytes())
        for a in (params.ln_f_b, params.ln_f_w, params.wpe, params.wte):
            f.write(np.ascontiguousarray(a, "<f4").tobytes())
