"""--model NAME: a Hugging Face cache snapshot, found without the network; a clear line when it is missing."""
import os
import shutil

import pytest

from conftest import TINY_HF, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.errors import UserError
from gpt2job.model import hub


def fake_cache(root, repo="openai-community/gpt2", rev="0123abcd"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    shutil.copytree(TINY_HF, snap)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    return snap


def test_names_resolve_to_the_cached_snapshot(tmp_path, monkeypatch):
    snap = fake_cache(tmp_path)
    monkeypatch.setattr(hub, "hub_cache", lambda: str(tmp_path))
    assert hub.resolve("gpt2") == str(snap)
    assert hub.resolve("openai-community/gpt2") == str(snap)
    assert hub.resolve("random:gpt2") == "random:gpt2"
    assert hub.resolve(str(TINY_HF)) == str(TINY_HF)             # a path that exists is a path
    with pytest.raises(UserError, match=r"not in the Hugging Face cache.*\(fix: give a folder"):
        hub.resolve("gpt2-xl")


def test_a_job_runs_on_a_model_name_from_the_cache(tmp_path):
    cache = tmp_path / "hub"
    fake_cache(cache)
    inp, by_name, by_path = tmp_path / "in.h5", tmp_path / "a.h5", tmp_path / "b.h5"
    write_token_input(inp, [[1, 2, 3], [4]])
    env = job_env(HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1)
    common = ["--backend", "numpy", "--max-new-tokens", "3"]
    run_gpt2job(["run", inp, by_name, "--model", "gpt2", *common], env=env, check=0)
    run_gpt2job(["run", inp, by_path, "--model", TINY_HF, *common], env=env, check=0)
    a, b = read_output(by_name), read_output(by_path)
    assert [t.tolist() for t in a["tokens"]] == [t.tolist() for t in b["tokens"]]
    assert a["attrs"]["model"] == "gpt2" and a["attrs"]["model_fingerprint"] == b["attrs"]["model_fingerprint"]
    p = run_gpt2job(["run", inp, tmp_path / "c.h5", "--model", "gpt2-medium", *common], env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("gpt2job: error:")]
    assert len(errors) == 1 and "gpt2-medium" in errors[0] and "config.json + model.safetensors" in errors[0]
    assert not os.path.exists(tmp_path / "c.h5")


def test_a_name_cached_only_as_a_pickle_says_so(tmp_path, monkeypatch):
    """transformers with PyTorch cached pytorch_model.bin alone for years: "not in the Hugging Face cache" was
    wrong there; the line names the file, why it is not loaded, and how to save it as safetensors."""
    snap = fake_cache(tmp_path)
    (snap / "model.safetensors").rename(snap / "pytorch_model.bin")
    monkeypatch.setattr(hub, "hub_cache", lambda: str(tmp_path))
    monkeypatch.setattr(hub.envs, "get", lambda name: "1" if name == "HF_HUB_OFFLINE" else "")
    with pytest.raises(UserError) as e:
        hub.resolve("gpt2")
    assert f"only as pytorch_model.bin in the Hugging Face cache ({snap}: a pickle" in str(e.value)
    assert "(fix: save it once as safetensors: GPT2LMHeadModel.from_pretrained(NAME)" in str(e.value)
