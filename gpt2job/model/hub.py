"""Models by name: `--model gpt2` (or `openai-community/gpt2`, `gpt2-medium`, ...) is the snapshot folder in the
local Hugging Face cache, found without the network; when it is not there and huggingface_hub is installed (the
`hub` extra) and the machine is online, it is downloaded into that cache first (only config.json, the
safetensors weights and generation_config.json: never pickles). A path that exists is always a path."""
import importlib.util
import os
import re

from gpt2job import envs
from gpt2job.errors import UserError

# the short names GPT-2 was published under, and where they live now on the Hub
ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
           "distilgpt2": "distilbert/distilgpt2"}
FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
         "model-*.safetensors"]
NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_cache():
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if envs.get("HF_HUB_CACHE"):
        return envs.get("HF_HUB_CACHE")
    home = envs.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _complete(folder):
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        f == "model.safetensors" or f == "model.safetensors.index.json" for f in os.listdir(folder))


def snapshots(repo_id):
    """repo_id's cached snapshot folders, its main revision first."""
    out = []
    names = [repo_id] + [short for short, full in ALIASES.items() if full == repo_id]   # legacy cache names too
    for name in names:
        repo = os.path.join(hub_cache(), "models--" + name.replace("/", "--"))
        snaps = os.path.join(repo, "snapshots")
        if not os.path.isdir(snaps):
            continue
        try:
            with open(os.path.join(repo, "refs", "main")) as f:
                main = f.read().strip()
        except OSError:
            main = None
        out += [os.path.join(snaps, rev) for rev in sorted(os.listdir(snaps), key=lambda r: r != main)]
    return out


def cached_snapshot(repo_id):
    """The cached snapshot folder of repo_id with config.json and safetensors weights (main revision first), or
    None."""
    return next((s for s in snapshots(repo_id) if _complete(s)), None)


def pickle_only(repo_id):
    """A cached snapshot of repo_id that has pytorch_model.bin and no safetensors weights (what transformers with
    PyTorch cached before safetensors), or None."""
    return next((s for s in snapshots(repo_id) if os.path.isfile(os.path.join(s, "pytorch_model.bin"))), None)


def resolve(spec):
    """The local path a --model value stands for: itself when it is random:..., or a file or folder that exists;
    else a Hub name's cached (or freshly downloaded) snapshot folder. Raises a one-line UserError otherwise."""
    if not spec.strip():
        raise UserError("is empty", None, "--model", "give a folder with config.json + model.safetensors, a flat "
                        ".bin file, or random:gpt2")
    if spec.startswith("random:") or os.path.exists(spec) or not NAME.fullmatch(spec):
        return spec
    repo_id = ALIASES.get(spec, spec)
    found = cached_snapshot(repo_id)
    if found:
        return found
    fix = ("give a folder with config.json + model.safetensors (for example one saved with "
           "save_pretrained(dir, safe_serialization=True)), or random:gpt2 for random weights")
    pickled = pickle_only(repo_id)
    where = (f"only as pytorch_model.bin in the Hugging Face cache ({pickled}: a pickle, which gpt2job never loads)"
             if pickled else f"not in the Hugging Face cache ({hub_cache()})")
    if pickled:
        fix = ("save it once as safetensors: GPT2LMHeadModel.from_pretrained(NAME).save_pretrained(DIR, "
               "safe_serialization=True) with transformers, then --model DIR")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise UserError(f"no such file or folder, and {repo_id} is {where}; pip install 'gpt2job[hub]' to download "
                        "its safetensors", spec, "--model", fix)
    if envs.get("HF_HUB_OFFLINE"):
        raise UserError(f"no such file or folder, and {repo_id} is {where} while HF_HUB_OFFLINE is set", spec,
                        "--model", fix)
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=FILES, cache_dir=hub_cache())
    except Exception as e:   # offline, unknown repository, no access: one line, whatever the client raised
        raise UserError(f"no such file or folder, and {repo_id} could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})", spec, "--model",
                        fix)
