"""Loaders: both Hugging Face key spellings, fp16 checkpoints, the old flat file, random weights,
and clear errors for corrupt, truncated or mismatched files."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

from conftest import TINY_FP16, TINY_HF, TINY_PUBLISHED
from gpt2job.model import safetensors_io
from gpt2job.model.config import GPT2Config
from gpt2job.errors import UserError
from gpt2job.model.hf_dir import save_hf_dir
from gpt2job.model.weights import flat_size, load_config, load_flat_file, load_params, random_params, save_flat_file


def assert_same_params(a, b):
    assert a.config == b.config
    for x, y in ((a.wte, b.wte), (a.wpe, b.wpe), (a.ln_f_w, b.ln_f_w), (a.ln_f_b, b.ln_f_b)):
        np.testing.assert_array_equal(x, y)
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for k in la:
            np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_both_key_spellings_load_the_same_weights():
    a = load_params(str(TINY_HF))
    b = load_params(str(TINY_PUBLISHED))
    assert a.config.n_layer == 2 and a.config.n_embd == 64 and a.config.vocab_size == 1000
    assert a.lm_head is None  # tied
    assert_same_params(a, b)


def test_fp16_checkpoint_is_widened_to_float32():
    p = load_params(str(TINY_FP16))
    assert p.wte.dtype == np.float32
    ref = load_params(str(TINY_HF))
    np.testing.assert_allclose(p.wte, ref.wte, atol=1e-2)


def test_flat_file_round_trip_with_sorted_layer_order(tmp_path):
    cfg = GPT2Config(n_layer=12, n_head=2, n_embd=8, n_positions=16, vocab_size=50)
    p = random_params(cfg, seed=3)
    path = tmp_path / "params.bin"
    save_flat_file(p, path)
    assert os.path.getsize(path) == 4 * flat_size(cfg)
    q = load_flat_file(str(path), cfg)
    assert_same_params(p, q)
    # layer 10 sits third in the file (order 0, 1, 10, 11, 2, ...): check the raw offset
    per_layer = flat_size(cfg) - sum(a.size for a in (p.wte, p.wpe, p.ln_f_w, p.ln_f_b))
    per_layer //= 12
    raw = np.fromfile(path, dtype="<f4")
    np.testing.assert_array_equal(raw[2 * per_layer: 2 * per_layer + 3 * 8], p.layers[10]["attn.c_attn.bias"])


def test_flat_file_of_the_wrong_size_is_refused(tmp_path):
    path = tmp_path / "params.bin"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(UserError, match="matches no GPT-2 flat parameter file"):
        load_params(str(path))


def test_random_weights_are_seeded_and_real_shaped():
    cfg = load_config("random:gpt2")
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (12, 768, 50257)
    assert load_config("random:gpt2-xl").n_embd == 1600
    a = load_params("random:n_layer=1,n_head=2,n_embd=8,vocab_size=30:5")
    b = load_params("random:n_layer=1,n_head=2,n_embd=8,vocab_size=30:5")
    c = load_params("random:n_layer=1,n_head=2,n_embd=8,vocab_size=30:6")
    assert_same_params(a, b)
    assert not np.array_equal(a.wte, c.wte)
    with pytest.raises(UserError, match="unknown model"):
        load_config("random:gpt5")


def test_save_hf_dir_round_trip(tmp_path):
    p = random_params(GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=40), 1)
    save_hf_dir(p, tmp_path / "m")
    assert_same_params(p, load_params(str(tmp_path / "m")))


@pytest.fixture
def tiny_copy(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(TINY_HF, d)
    return d


def test_truncated_safetensors(tiny_copy):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_params(str(tiny_copy))


def test_garbage_safetensors(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(UserError, match="not valid JSON"):
        load_params(str(tiny_copy))
    (tiny_copy / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(UserError, match="too short"):
        load_params(str(tiny_copy))


def test_missing_tensor_and_shape_mismatch(tiny_copy):
    saved = (tiny_copy / "config.json").read_text()
    cfg = json.loads(saved)
    cfg["n_embd"] = 128      # every tensor there, of the wrong shape
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"shape \(.*\) does not match config.json's"):
        load_params(str(tiny_copy))
    (tiny_copy / "config.json").write_text(saved)
    t = safetensors_io.load(tiny_copy / "model.safetensors")
    t.pop("transformer.h.1.mlp.c_fc.weight")
    safetensors_io.save(tiny_copy / "model.safetensors", t)
    with pytest.raises(UserError, match=r"h\.1\.mlp\.c_fc\.weight.*missing"):
        load_params(str(tiny_copy))


def test_bad_config(tiny_copy):
    (tiny_copy / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_params(str(tiny_copy))
    (tiny_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only 'gpt2'"):
        load_params(str(tiny_copy))
    os.remove(tiny_copy / "config.json")
    with pytest.raises(UserError, match=": missing"):
        load_params(str(tiny_copy))


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(TINY_HF / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not going to be unpickled")
    with pytest.raises(UserError, match="never unpickles"):
        load_params(str(d))


def test_nan_weights_are_refused(tiny_copy):
    t = safetensors_io.load(tiny_copy / "model.safetensors")
    t["transformer.wpe.weight"] = t["transformer.wpe.weight"].copy()
    t["transformer.wpe.weight"][3, 3] = np.nan
    safetensors_io.save(tiny_copy / "model.safetensors", t)
    with pytest.raises(UserError, match="NaN"):
        load_params(str(tiny_copy))


def test_bf16_tensors_are_read():
    import tempfile
    x = np.array([1.0, -2.5, 3.140625], np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        raw = bits.tobytes()
        header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + raw)
        np.testing.assert_array_equal(safetensors_io.load(path)["x"], x)


@pytest.mark.parametrize("head", [b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00",
                                  b"PK\x03\x04\x00\x00\x08\x08\x00\x00"])
def test_a_pickle_file_is_refused_as_a_pickle_not_as_a_short_flat_file(tmp_path, head):
    """torch.save's legacy stream (pickle protocol 2), a plain pickle, and its zip archive (PyTorch >= 1.6)."""
    for path in (tmp_path / "x.pkl", tmp_path / "pytorch_model.bin"):
        path.write_bytes(head + b"\0" * 1000)
        for load in (load_config, load_params):
            with pytest.raises(UserError, match=r"pickle refused.*safe_serialization=True") as e:
                load(str(path))
            assert "truncated" not in str(e.value) and "--model" in str(e.value)
    d = tmp_path / "m"
    shutil.copytree(TINY_HF, d)
    (d / "model.safetensors").write_bytes(head + b"\0" * 1000)   # a pickle under the safetensors name
    with pytest.raises(UserError, match="pickle refused"):
        load_config(str(d))


def test_a_folder_is_checked_by_load_config_from_the_headers(tiny_copy):
    """The master reads only the config and the headers: a bad folder stops the job before anything is written."""
    os.remove(tiny_copy / "model.safetensors")
    with pytest.raises(UserError, match=r"--model: no model.safetensors .*in this folder") as e:
        load_config(str(tiny_copy))
    assert str(e.value).startswith(f"{tiny_copy}: --model:")
    shutil.copy(TINY_HF / "model.safetensors", tiny_copy)
    t = safetensors_io.load(tiny_copy / "model.safetensors")
    t.pop("transformer.h.1.attn.c_proj.bias")
    safetensors_io.save(tiny_copy / "model.safetensors", t)
    with pytest.raises(UserError, match=r"h\.1\.attn\.c_proj\.bias.*missing"):
        load_config(str(tiny_copy))


def test_a_safetensors_file_given_alone_points_at_its_folder():
    with pytest.raises(UserError, match=f"give the folder .*--model {TINY_HF}"):
        load_config(str(TINY_HF / "model.safetensors"))


def test_random_spec_fields_are_named_and_parsed():
    with pytest.raises(UserError, match=r"unknown config field 'n_layers' \(known: n_layer, n_head, .*write n_layer=2"):
        load_config("random:n_layers=2")
    with pytest.raises(UserError, match="n_head='x' is not an integer"):
        load_config("random:n_head=x")
    with pytest.raises(UserError, match="is not a switch"):
        load_config("random:scale_attn_by_inverse_layer_idx=maybe")
    assert load_config("random:n_layer=2,scale_attn_by_inverse_layer_idx=false").scale_attn_by_inverse_layer_idx is False
    assert load_config("random:n_layer=2,scale_attn_by_inverse_layer_idx=1").scale_attn_by_inverse_layer_idx is True
    assert load_config("random:n_layer=2,layer_norm_epsilon=1e-6").layer_norm_epsilon == 1e-6


def test_a_checkpoint_rewritten_during_a_job_changes_neither_weights_nor_faults(tiny_copy):
    """Loaded float32 tensors are views of the memory-mapped file. Saving over the file (safetensors_io.save:
    a new file renamed over it) leaves a loaded job's weights as they were; the NumPy backend, which reads its
    weights for the whole job, owns a copy, so even a rewrite in place (or a truncation, which would fault a view
    with SIGBUS) leaves it alone."""
    from gpt2job.backends.numpy_backend import NumpyBackend
    from gpt2job.settings import JobSettings
    path = os.path.join(tiny_copy, "model.safetensors")
    before = load_params(str(tiny_copy))
    wte = before.wte.copy()
    safetensors_io.save(path, {k: np.zeros_like(v) for k, v in safetensors_io.load(path).items()})
    np.testing.assert_array_equal(before.wte, wte)                 # the old bytes: the file was replaced
    again = load_params(str(tiny_copy))
    backend = NumpyBackend(again, JobSettings(input="a", output="b").generation(again.config.eos_token_id))
    with open(path, "r+b") as f:                                   # rewritten in place, then truncated
        header = f.read(8)
        f.seek(8 + struct.unpack("<Q", header)[0])
        f.write(b"\x01" * 4096)
        f.truncate(os.path.getsize(path) // 2)
    assert not np.any(backend.params.wte) and all(not np.any(v) for v in backend.params.layers[0].values())


def test_a_file_system_without_mmap_reads_the_file_instead(tiny_copy, monkeypatch):
    import mmap

    def no_mmap(*a, **k):
        raise OSError(19, "No such device")
    want = load_params(str(tiny_copy))
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    assert_same_params(load_params(str(tiny_copy)), want)


@pytest.mark.parametrize("header_bytes", [0x280, 0x380, 0x10280])
def test_a_safetensors_header_whose_length_starts_like_a_pickle_is_read(tmp_path, header_bytes):
    """The 8-byte header length 0x0280 is b"\\x80\\x02...", a pickle's start: such files (a shard of 1,408 bytes of
    header, seen) were refused as pickles."""
    import json
    import struct
    from gpt2job.model.safetensors_io import read_header
    data = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (header_bytes - len(header))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    got, start, _ = read_header(str(path))
    assert list(got) == ["w"] and start == 8 + header_bytes


@pytest.mark.parametrize("change, frag", [
    ({"scale_attn_weights": False}, "scale_attn_weights false"),            # was ignored: other logits
    ({"scale_attn_by_inverse_layer_idx": "false"}, "must be true or false"),  # was read as true
    ({"layer_norm_epsilon": -1}, "must be a positive number"),
])
def test_config_fields_we_cannot_honour_are_refused(change, frag):
    from gpt2job.model.config import config_from_hf_dict
    d = json.loads((TINY_HF / "config.json").read_text())
    with pytest.raises(UserError) as e:
        config_from_hf_dict({**d, **change})
    assert frag in str(e.value)


@pytest.mark.parametrize("spec, frag", [("random:gpt2:-1", "seed -1 is not an integer in 0..2^63-1"),
                                        ("random:n_layer=2,n_head=2,n_embd=32,layer_norm_epsilon=-1",
                                         "layer_norm_epsilon must be a positive number")])
def test_random_specs_are_checked_as_config_json_is(spec, frag):
    from gpt2job.model.weights import load_config
    with pytest.raises(UserError) as e:
        load_config(spec)
    assert frag in str(e.value)


def test_a_tensor_missing_from_a_sharded_checkpoint_names_the_index(tmp_path):
    """The line named model.safetensors, which a sharded folder does not have."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(TINY_HF / "config.json", folder / "config.json")
    tensors = safetensors_io.load(str(TINY_HF / "model.safetensors"))
    names = sorted(tensors)
    dropped = next(n for n in names if n.endswith("ln_f.weight"))
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors_io.save(str(folder / shard), {n: tensors[n] for n in part if n != dropped})
        weight_map.update({n: shard for n in part if n != dropped})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as e:
        load_params(str(folder))
    assert str(e.value).startswith(f"{folder / 'model.safetensors.index.json'}: ln_f.weight: tensor missing"), e.value


def test_every_id_of_a_config_s_eos_list_ends_a_row(tmp_path):
    """transformers ends a row at any id of a config's eos_token_id list; only the first ended one here. The list
    is kept when the model is saved; a config of one id keeps its old form (random models their fingerprint)."""
    from conftest import read_output, run_gpt2job, write_token_input
    model = tmp_path / "m"
    shutil.copytree(TINY_HF, model)
    cfg = json.loads((model / "config.json").read_text())
    first = cfg.get("eos_token_id", 50256)
    cfg["eos_token_id"] = [first, 789]   # 789: the tiny model's first greedy token after [1, 2]
    (model / "config.json").write_text(json.dumps(cfg))
    assert load_config(str(model)).more_eos_token_ids == (789,)
    assert "more_eos_token_ids" not in GPT2Config().to_dict()
    inp = tmp_path / "in.h5"
    write_token_input(inp, [[1, 2], [3, 4]])
    base = ["run", inp, "--model", model, "--backend", "numpy", "--max-new-tokens", "6"]
    run_gpt2job([*base[:2], tmp_path / "a.h5", *base[2:], "--ignore-eos"], check=0)
    full = [t.tolist() for t in read_output(tmp_path / "a.h5")["tokens"]]
    assert full[0][0] == 789 and 789 not in full[1][:5], full
    run_gpt2job([*base[:2], tmp_path / "b.h5", *base[2:]], check=0)
    got = read_output(tmp_path / "b.h5")
    assert got["tokens"][0].tolist() == [789] and got["finish"][0] == "stop"
    row1 = full[1][:full[1].index(first) + 1] if first in full[1] else full[1]
    assert got["tokens"][1].tolist() == row1
    saved = tmp_path / "saved"
    save_hf_dir(load_params(str(model)), str(saved))
    assert json.loads((saved / "config.json").read_text())["eos_token_id"] == [first, 789]


def test_checkpoint_folders_a_user_may_have_get_one_line_each(tiny_copy, tmp_path, capsys):
    """A second review's model folders: each was loaded silently wrong, or refused with a line that blamed the wrong
    thing. Now one line that names the file, the tensor or field, and the fix."""
    from gpt2job.model import hf_dir
    st = tiny_copy / "model.safetensors"
    tensors = safetensors_io.load(str(st))
    # both spellings of one tensor: whichever came later in the header was loaded (zeros here gave zero tokens)
    both = dict(tensors, **{"h.0.ln_1.weight": np.zeros_like(tensors["transformer.h.0.ln_1.weight"])})
    safetensors_io.save(str(st), both)
    with pytest.raises(UserError, match=r"h\.0\.ln_1\.weight: two tensors are h\.0\.ln_1\.weight .*keep one of them"):
        load_config(str(tiny_copy))
    # an adapter's tensor left in: blamed on n_layer before
    safetensors_io.save(str(st), dict(tensors, **{"transformer.h.0.attn.c_attn.lora_A": np.zeros((4, 4), np.float32)}))
    with pytest.raises(UserError, match=r"h\.0\.attn\.c_attn\.lora_A: checkpoint has tensors GPT-2 does not have .*merge"):
        load_config(str(tiny_copy))
    # layers past the config's: n_layer, as before
    n = load_config(str(TINY_HF)).n_layer
    safetensors_io.save(str(st), dict(tensors, **{f"transformer.h.{n}.ln_1.weight": tensors["transformer.h.0.ln_1.weight"]}))
    with pytest.raises(UserError, match=r"n_layer: checkpoint has layers the config does not use"):
        load_config(str(tiny_copy))
    # a dtype the format has and this reader does not: "malformed tensor entry ... corrupt" before
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    st.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(UserError, match=r"x: dtype F8_E4M3 is not supported .*float32 or float16"):
        load_config(str(tiny_copy))
    # an interrupted download's link: "no model.safetensors in this folder" before
    st.unlink()
    st.symlink_to(tmp_path / "blob-never-written")
    with pytest.raises(UserError, match=r"model\.safetensors: --model: is a link to a file that is not there"):
        load_config(str(tiny_copy))
    # config.json given as --model: its size was compared with flat files'
    with pytest.raises(UserError, match=r"config\.json: --model: is a file of a checkpoint folder: give the folder"):
        load_config(str(TINY_HF / "config.json"))
    # an end-of-text id outside the vocabulary: rows never ended, silently (transformers takes it too: a warning)
    cfg = json.loads((TINY_HF / "config.json").read_text())
    model = tmp_path / "eos"
    shutil.copytree(TINY_HF, model)
    (model / "generation_config.json").unlink()
    (model / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=cfg["vocab_size"])))
    capsys.readouterr()
    load_config(str(model), warn=True)
    err = capsys.readouterr().err
    assert err == (f"gpt2job: warning: {model / 'config.json'}: eos_token_id {cfg['vocab_size']} is outside the "
                   f"vocabulary 0..{cfg['vocab_size'] - 1}: no row ends at it (write the model's end-of-text id "
                   "there)\n"), err
    # generation_config.json's other end token: transformers' generate() stops there, this job says it does not
    eos = cfg.get("eos_token_id", 50256)
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7]}))
    capsys.readouterr()
    load_config(str(model))
    assert capsys.readouterr().err == ""
    assert hf_dir.read_config(str(model), warn=True).eos_token_id == eos
    err = capsys.readouterr().err
    assert err.startswith("gpt2job: warning: ") and "--stop-token-ids 7 " in err and err.count("\n") == 1, err
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    load_config(str(model), warn=True)
    assert capsys.readouterr().err == ""
