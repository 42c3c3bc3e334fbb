"""A Hugging Face checkpoint folder (what save_pretrained writes): config.json, model.safetensors or its shards
with model.safetensors.index.json, and generation_config.json's end token. Checked before anything is loaded: every
tensor the config needs, of its shape and a float type, and none that GPT-2 does not have."""
import json
import os
import re

import numpy as np

from gpt2job import errors
from gpt2job.errors import UserError
from gpt2job.model import safetensors_io
from gpt2job.model.config import config_from_hf_dict
from gpt2job.model.params import GPT2Params, global_shapes, layer_shapes
from gpt2job.model.safetensors_io import PICKLE_FIX

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_config(directory, warn=False):
    """config.json as a GPT2Config. warn: a line on stderr where no row can end at an end-of-text id (one outside
    the vocabulary: transformers accepts it too), and where generation_config.json names other end tokens, which
    transformers' generate() stops at and this job does not."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError("missing", path, "config.json", "save the model with save_pretrained, which writes it")
    except IsADirectoryError:
        raise UserError("is a folder, not a file", path, "config.json", "give the folder save_pretrained wrote")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"not valid JSON ({str(e)[:120] or type(e).__name__})", path, "config.json",
                        "re-save or repair the config")
    if not isinstance(d, dict):
        raise UserError("not a JSON object", path, "config.json", "re-save or repair the config")
    cfg = config_from_hf_dict(d, path)
    eos = (cfg.eos_token_id, *cfg.more_eos_token_ids)
    if not warn:
        return cfg
    bad = [i for i in eos if not 0 <= i < cfg.vocab_size]
    if bad:
        errors.warn(f"{path}: eos_token_id {bad[0]} is outside the vocabulary 0.."
                    f"{cfg.vocab_size - 1}: no row ends at it (write the model's end-of-text id there)")
    other = _generation_eos(directory)
    if other is not None and sorted(other) != sorted(eos):
        ids = " ".join(str(i) for i in other if i not in eos)
        errors.warn(f"{os.path.join(directory, 'generation_config.json')}: eos_token_id "
                    f"{other if len(other) > 1 else other[0]} is not config.json's ({eos[0]}): rows end at "
                    f"config.json's; add --stop-token-ids {ids} to end them there too, as transformers' "
                    "generate() would")
    return cfg


def _generation_eos(directory):
    """generation_config.json's eos_token_id as a list of ids, or None (no such file, or no valid ids in it)."""
    try:
        with open(os.path.join(directory, "generation_config.json"), encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    eos = eos if isinstance(eos, list) else [eos]
    ok = eos and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)
    return eos if ok else None


def _broken_link(path):
    """A link to a file that is not there (what an interrupted Hugging Face download leaves in its cache)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError("is a link to a file that is not there (an interrupted download?)", path, "--model",
                        "download the model again")


def safetensors_files(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    for p in (single, index):
        _broken_link(p)
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
            _broken_link(p)
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


def _key(name):
    """A tensor's name without the 'transformer.' prefix; None for the published checkpoints' causal-mask buffers."""
    key = name[len("transformer."):] if name.startswith("transformer.") else name
    return None if _BUFFER.search(key) else key


def tensor_index(directory):
    """name (without the 'transformer.' prefix) -> (dtype, shape, file) from the safetensors headers."""
    index = {}
    for path in safetensors_files(directory):
        for name, info in safetensors_io.read_header(path)[0].items():
            key = _key(name)
            if key is None:
                continue
            if key in index:   # `transformer.h.0...` beside `h.0...`, or a tensor in two shards: which one is meant?
                raise UserError(f"two tensors are {key} (one in {os.path.basename(index[key][2])}, one named {name} "
                                f"in {os.path.basename(path)})", path, name, "keep one of them: re-save the model")
            index[key] = (info["dtype"], tuple(info["shape"]), path)
    return index


def check_tensors(index, cfg, directory):
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
    more = [k for k in extra if (m := re.match(r"h\.(\d+)\.", k)) and int(m.group(1)) >= cfg.n_layer]
    if more:
        raise UserError(f"checkpoint has layers the config does not use ({', '.join(more[:3])}"
                        f"{', ...' if len(more) > 3 else ''})", src, "n_layer",
                        "use the config.json saved with these weights")
    if extra:    # e.g. an adapter's (LoRA) tensors not merged into the weights
        raise UserError(f"checkpoint has tensors GPT-2 does not have ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''})", src, extra[0],
                        "save the plain GPT-2 weights (an adapter: merge it first, merge_and_unload)")


def _finite(arr):
    """No NaN or infinity in arr. A sum is finite unless an element is not (or the sum overflows: then each
    element is looked at); a third faster than isfinite(arr).all() over GPT-2 XL's 6 GB."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(arr.sum())) or bool(np.isfinite(arr).all())


def load(directory):
    """The checkpoint's parameters (checked against its config first: check_tensors)."""
    cfg = read_config(directory)
    check_tensors(tensor_index(directory), cfg, directory)
    tensors = {}
    for path in safetensors_files(directory):
        for name, arr in safetensors_io.load(path).items():
            if (key := _key(name)) is not None:
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
    return p


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
