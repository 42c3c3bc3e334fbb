"""Loading GPT-2 weights: Hugging Face checkpoint directories, the old system's flat float32 file,
and seeded random weights of the real shapes (`random:gpt2`, `random:gpt2-medium`, ...).

Model files are never unpickled: only safetensors and raw float32 are read.
"""
import difflib
import hashlib
import json
import os
import re

import numpy as np

from gpt2job.model import safetensors_io
from gpt2job.model.safetensors_io import PICKLE_FIX, is_pickle, looks_like_safetensors
from gpt2job.model.config import PRESETS, GPT2Config, config_from_hf_dict, validate_config
from gpt2job.errors import UserError
from gpt2job.model import hub
from gpt2job.model.params import LAYER_TENSORS, GPT2Params, global_shapes, layer_shapes

CHECKPOINT_FIX = "give a directory with config.json and model.safetensors, a flat .bin file, or random:gpt2"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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


def load_config(spec):
    """The model's config without reading its weights (what the master needs)."""
    spec = hub.resolve(spec)
    if spec.startswith("random:"):
        return parse_random_spec(spec)[0]
    if os.path.isdir(spec):
        cfg = _read_hf_config(spec)
        _check_tensors(_tensor_index(spec), cfg, spec)   # the headers only: a bad folder stops the job at once
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
        return load_hf_dir(spec)
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


# ---------------------------------------------------------------- Hugging Face directories

def _read_hf_config(directory):
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError("missing", path, "config.json", "save the model with save_pretrained, which writes it")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"not valid JSON ({str(e)[:120] or type(e).__name__})", path, "config.json",
                        "re-save or repair the config")
    if not isinstance(d, dict):
        raise UserError("not a JSON object", path, "config.json", "re-save or repair the config")
    return config_from_hf_dict(d, path)


def _safetensors_files(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"unreadable shard index ({e})", index, "weight_map", "re-save the checkpoint")
        files = []
        for s in shards:
            p = os.path.join(directory, os.path.basename(str(s)))  # never follow paths out of the directory
            if not os.path.isfile(p):
                raise UserError("shard named in the index is missing", p, "weight_map", "copy every shard")
            files.append(p)
        return files
    pickles = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if pickles:
        raise UserError(f"no model.safetensors in this folder, only {pickles[0]}: pickle refused, gpt2job never "
                        "unpickles model files", directory, "--model", PICKLE_FIX)
    raise UserError("no model.safetensors (or model.safetensors.index.json) in this folder", directory, "--model",
                    "give the folder save_pretrained wrote (config.json + model.safetensors), a flat .bin file, "
                    "or random:gpt2")


_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def _tensor_index(directory):
    """name (without the 'transformer.' prefix) -> (dtype, shape, file) from the safetensors headers."""
    index = {}
    for path in _safetensors_files(directory):
        for name, info in safetensors_io.read_header(path)[0].items():
            key = name[len("transformer."):] if name.startswith("transformer.") else name
            if not _BUFFER.search(key):    # causal-mask buffers of the published checkpoints
                index[key] = (info["dtype"], tuple(info["shape"]), path)
    return index


def _check_tensors(index, cfg, directory):
    """Every tensor the config needs is there, float, of its shape; none the config does not use."""
    src = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(src):   # sharded: the index names the tensors
        src = os.path.join(directory, "model.safetensors.index.json")
    g = global_shapes(cfg)
    need = {f"h.{i}.{n}": s for i in range(cfg.n_layer) for n, s in layer_shapes(cfg).items()}
    need.update({k: g[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")})
    if "lm_head.weight" in index:
        need["lm_head.weight"] = g["wte.weight"]
    for key, shape in need.items():
        if key not in index:
            raise UserError("tensor missing from the checkpoint", src, key,
                            "the file does not match config.json; re-save the model")
        dtype, got, path = index[key]
        if got != tuple(shape):
            raise UserError(f"shape {got} does not match config.json's {tuple(shape)}", path, key,
                            "use the config.json saved with these weights")
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"dtype {dtype} is not a float type", path, key, "re-save the model")
    extra = sorted(k for k in index if (k.startswith("h.") or k in ("wte.weight", "wpe.weight")) and k not in need)
    if extra:
        raise UserError(f"checkpoint has tensors the config does not use ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''})", src, "n_layer",
                        "use the config.json saved with these weights")


def _finite(arr):
    """No NaN or infinity in arr. A sum is finite unless an element is not (or the sum overflows: then each
    element is looked at); a third faster than isfinite(arr).all() over GPT-2 XL's 6 GB."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(arr.sum())) or bool(np.isfinite(arr).all())


def load_hf_dir(directory):
    cfg = _read_hf_config(directory)
    _check_tensors(_tensor_index(directory), cfg, directory)
    tensors = {}
    for path in _safetensors_files(directory):
        for name, arr in safetensors_io.load(path).items():
            key = name[len("transformer."):] if name.startswith("transformer.") else name
            if _BUFFER.search(key):
                continue  # causal-mask buffers of the published checkpoints
            tensors[key] = (arr, path)

    def take(key):
        arr, path = tensors.pop(key)
        if not _finite(arr):
            raise UserError("contains NaN or infinite values", path, key, "the weights are corrupt; re-save them")
        return np.ascontiguousarray(arr)

    layers = [{n: take(f"h.{i}.{n}") for n in layer_shapes(cfg)} for i in range(cfg.n_layer)]
    wte = take("wte.weight")
    head = None
    if "lm_head.weight" in tensors:
        head = take("lm_head.weight")
        if np.array_equal(head, wte):
            head = None
    p = GPT2Params(config=cfg, wte=wte, wpe=take("wpe.weight"), layers=layers,
                   ln_f_w=take("ln_f.weight"), ln_f_b=take("ln_f.bias"),
                   lm_head=head)
    p.fingerprint = fingerprint(directory)
    return p


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
    if kind == "safetensors":
        raise UserError("is a safetensors file: give the folder that holds it with its config.json", path,
                        "--model", f"--model {os.path.dirname(os.path.abspath(path))}")
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


def save_hf_dir(params, directory, prefix="transformer."):
    """Write params as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    os.makedirs(directory, exist_ok=True)
    cfg = params.config
    tensors = {f"{prefix}wte.weight": params.wte, f"{prefix}wpe.weight": params.wpe,
               f"{prefix}ln_f.weight": params.ln_f_w, f"{prefix}ln_f.bias": params.ln_f_b}
    for i, layer in enumerate(params.layers):
        for n, a in layer.items():
            tensors[f"{prefix}h.{i}.{n}"] = a
    safetensors_io.save(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    d = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **cfg.to_dict()}
    d["bos_token_id"] = cfg.eos_token_id
    if d.pop("more_eos_token_ids", None):   # written back as the config's list
        d["eos_token_id"] = [cfg.eos_token_id, *cfg.more_eos_token_ids]
    if not d["n_inner"]:
        d["n_inner"] = None
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
