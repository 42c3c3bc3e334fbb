"""The rough edges a new user hit (issue 13): a failed start leaves nothing behind, float16 without a GPU is
refused, greedy runs say the sampling flags do nothing, usage hints and --version, run_inference.sh shows only
our line and handles Ctrl-C, model errors name the real problem, and the prompts command is as strict as run."""
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, TINY_HF, job_env, read_output, require_mpirun, run_gpt2job, write_token_input
from test_inputs import assert_one_clear_line

TINY = ["--model", str(TINY_HF), "--backend", "numpy", "--max-new-tokens", "3"]


def leftovers(out):
    return [p for p in (str(out), f"{out}.journal", f"{out}.lock") if os.path.exists(p)]


def nan_model(tmp_path):
    """A folder whose headers are right (the master accepts it) but whose weights fail to load (on the workers)."""
    from gpt2job.model import safetensors_io
    d = tmp_path / "nan-model"
    d.mkdir()
    (d / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    t = safetensors_io.load(TINY_HF / "model.safetensors")
    t["transformer.wpe.weight"] = t["transformer.wpe.weight"].copy()
    t["transformer.wpe.weight"][0, 0] = np.nan
    safetensors_io.save(d / "model.safetensors", t)
    return d


# ---------------------------------------------------------------- 9: model errors name the real problem

@pytest.mark.parametrize("kind", ["x.pkl", "pytorch_model.bin", "folder of pytorch_model.bin"])
def test_pickle_models_are_refused_as_pickles(tmp_path, kind):
    import pickle
    import zipfile
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    if kind == "x.pkl":
        model = tmp_path / "x.pkl"
        model.write_bytes(pickle.dumps({"wte": [1.0] * 100}, protocol=4))
    else:
        folder = tmp_path / "m" if kind.startswith("folder") else tmp_path
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as z:   # torch.save's format since 1.6
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        model = folder if kind.startswith("folder") else folder / "pytorch_model.bin"
        if kind.startswith("folder"):
            (folder / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    p = run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", model])
    line = assert_one_clear_line(p, str(model), "--model", "pickle refused",
                                 "model.save_pretrained(dir, safe_serialization=True)")
    assert "truncated" not in line and "flat parameter file" not in line


def test_a_folder_without_weights_is_one_line_naming_the_folder(tmp_path):
    inp, folder = tmp_path / "in.h5", tmp_path / "model"
    write_token_input(inp, [[1, 2]])
    folder.mkdir()
    (folder / "config.json").write_bytes((TINY_HF / "config.json").read_bytes())
    p = run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", folder])
    line = assert_one_clear_line(p, f"{folder}: --model: no model.safetensors")
    assert "model.safetensors: no model.safetensors" not in line
    assert sum("no model.safetensors" in x for x in p.stderr.splitlines()) == 1, p.stderr


@pytest.mark.parametrize("spec,frags", [
    ("random:n_layers=2", ["unknown config field 'n_layers'", "known: n_layer, n_head", "write n_layer=2"]),
    ("random:n_layer=two", ["n_layer='two' is not an integer"]),
    ("random:gpt7", ["unknown model 'gpt7'", "random:gpt2-medium"]),
])
def test_random_model_spec_errors_name_the_field(tmp_path, spec, frags):
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2]])
    assert_one_clear_line(run_gpt2job(["run", inp, tmp_path / "out.h5", "--model", spec]), spec, *frags)
