"""Export a model spec (default random:gpt2, GPT-2 124M with seeded random weights) as a Hugging Face
checkpoint directory (config.json + model.safetensors), so our engine, transformers and the compact PyTorch
engine all run the very same weights.

  python3 benchmarks/export_weights.py DIR [--model random:gpt2]

transformers loads it with GPT2LMHeadModel.from_pretrained(DIR) (tied LM head, no pad token: the scripts
pass pad_token_id=50256). A DIR that already holds config.json + model.safetensors for the same spec is kept.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402,F401  (puts the repository on sys.path)
from gpt2job.model.hf_dir import save_hf_dir
from gpt2job.model.weights import fingerprint, load_params


def export(model, directory):
    """MODEL's weights as a Hugging Face folder at directory, kept where it holds them already (the same MODEL and
    the same weights there: a checkpoint replaced at the same path is exported again)."""
    stamp = os.path.join(directory, "exported_from.json")
    source = fingerprint(model)
    if os.path.isfile(stamp) and os.path.isfile(os.path.join(directory, "model.safetensors")):
        with open(stamp) as f:
            held = json.load(f)
        if held.get("model") == model and held.get("source_fingerprint") == source:
            print(f"{directory}: already holds {model}", flush=True)
            return directory
    params = load_params(model)
    save_hf_dir(params, directory)
    with open(stamp, "w") as f:
        json.dump({"model": model, "fingerprint": params.fingerprint, "source_fingerprint": source}, f)
    print(f"exported {model} to {directory}", flush=True)
    return directory


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--model", default="random:gpt2")
    a = ap.parse_args()
    export(a.model, a.dir)


if __name__ == "__main__":
    main()
