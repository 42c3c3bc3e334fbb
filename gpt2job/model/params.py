"""The in-memory GPT-2 parameter set: float32 NumPy arrays in Hugging Face's Conv1D layout (x @ W + b)."""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from gpt2job.model.config import GPT2Config

# The 12 per-layer tensors, in sorted-name order (the order of the old system's flat file).
LAYER_TENSORS = (
    "attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias", "attn.c_proj.weight",
    "ln_1.bias", "ln_1.weight", "ln_2.bias", "ln_2.weight",
    "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "mlp.c_proj.weight",
)


def layer_shapes(cfg: GPT2Config):
    """Expected shape of each per-layer tensor."""
    C, M = cfg.n_embd, cfg.d_mlp
    return {
        "attn.c_attn.bias": (3 * C,), "attn.c_attn.weight": (C, 3 * C),
        "attn.c_proj.bias": (C,), "attn.c_proj.weight": (C, C),
        "ln_1.bias": (C,), "ln_1.weight": (C,), "ln_2.bias": (C,), "ln_2.weight": (C,),
        "mlp.c_fc.bias": (M,), "mlp.c_fc.weight": (C, M),
        "mlp.c_proj.bias": (C,), "mlp.c_proj.weight": (M, C),
    }


def global_shapes(cfg: GPT2Config):
    C = cfg.n_embd
    return {"ln_f.bias": (C,), "ln_f.weight": (C,), "wpe.weight": (cfg.n_positions, C),
            "wte.weight": (cfg.vocab_size, C)}


@dataclass
class GPT2Params:
    config: GPT2Config
    wte: np.ndarray                 # [V, C]
    wpe: np.ndarray                 # [P, C]
    layers: List[dict]              # per layer: name in LAYER_TENSORS -> array
    ln_f_w: np.ndarray              # [C]
    ln_f_b: np.ndarray              # [C]
    lm_head: Optional[np.ndarray] = None  # [V, C]; None means tied to wte
    fingerprint: str = ""   # weights.fingerprint of what they were loaded from

    @property
    def head(self):
        return self.wte if self.lm_head is None else self.lm_head

    def in_memory(self):
        """These parameters with every array owned by the process. Loaded tensors may be views of the memory-mapped
        checkpoint: whoever reads them for the whole job (the NumPy backend) copies them, so that a file replaced,
        rewritten or truncated during the job neither changes its weights nor faults it."""
        def own(a):
            return None if a is None else np.array(a, copy=True)
        return GPT2Params(self.config, own(self.wte), own(self.wpe),
                          [{k: own(v) for k, v in layer.items()} for layer in self.layers],
                          own(self.ln_f_w), own(self.ln_f_b), own(self.lm_head), self.fingerprint)

