"""A quick fuzz pass (the long one is benchmarks/reliability.py): ~30 mutated input and model files, one of
each kind in benchmarks/fuzz_inputs.py, each run through `gpt2job run`. Every case must end in a clear error
(exit 2, one line naming the file) or a success: no traceback, no hang, no crash. Without the GPT-2 tokenizer
files (../shared/gpt2-vocab or GPT2_VOCAB_DIR) the text-prompt cases end in the tokenizer's own clear error
(outcome no_vocab) and are passed over."""
import json
import subprocess
import sys

from conftest import ROOT

N_CASES = 30


def test_mutated_inputs_and_models_give_clear_errors_or_success(tmp_path):
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_inputs.py"), "--cases", str(N_CASES),
                        "--seed", "1", "--light", "--timeout", "60", "--jobs", "2", "--workdir", str(tmp_path),
                        "--json-out", str(out)], capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(json.loads(out.read_text())) == N_CASES
