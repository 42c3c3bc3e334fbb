"""GPT-2 model configuration (architecture hyper-parameters) and the published size presets."""
import math
from dataclasses import dataclass, asdict

from gpt2job.errors import UserError

EOT_TOKEN = 50256  # <|endoftext|> in the GPT-2 vocabulary

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False
    eos_token_id: int = EOT_TOKEN
    n_inner: int = 0  # 0 means 4 * n_embd
    more_eos_token_ids: tuple = ()   # a config's eos_token_id list past its first: each ends a row as EOS does

    @property
    def d_head(self):
        return self.n_embd // self.n_head

    @property
    def d_mlp(self):
        return self.n_inner or 4 * self.n_embd

    def to_dict(self):
        d = asdict(self)
        if not d["more_eos_token_ids"]:   # (as before the field: random models keep their fingerprint)
            del d["more_eos_token_ids"]
        return d


PRESETS = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}


def config_from_hf_dict(d, path="config.json"):
    """Build a GPT2Config from a Hugging Face config.json dictionary, refusing what we cannot run."""
    def get(*names, default=None):
        for n in names:
            if n in d and d[n] is not None:
                return d[n]
        return default

    def integer(name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"must be an integer, got {value!r}", path, name, "write integer sizes as in GPT-2's config.json")
        return value

    def boolean(name, value):
        if not isinstance(value, bool):
            raise UserError(f"must be true or false, got {value!r}", path, name, "write a JSON boolean")
        return value

    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"must be a positive number, got {value!r}", path, name, "fix the model config")
        return float(value)

    eos = get("eos_token_id", default=EOT_TOKEN)
    more = ()
    if isinstance(eos, list):  # some configs list several end tokens (transformers stops at any); GPT-2 has one
        eos, more = (eos[0], tuple(integer("eos_token_id", e) for e in eos[1:])) if eos else (EOT_TOKEN, ())
    if boolean("scale_attn_weights", get("scale_attn_weights", default=True)) is not True:
        raise UserError("scale_attn_weights false (attention scores not divided by sqrt(head size)) is not supported",
                        path, "scale_attn_weights", "give a GPT-2 checkpoint (GPT-2 scales them)")
    mt = d.get("model_type", "gpt2")
    if mt != "gpt2":
        raise UserError(f"model_type is {mt!r}, only 'gpt2' is supported", path, "model_type",
                        "give a GPT-2 checkpoint")
    cfg = GPT2Config(
        n_layer=integer("n_layer", get("n_layer", "num_hidden_layers", default=12)),
        n_head=integer("n_head", get("n_head", "num_attention_heads", default=12)),
        n_embd=integer("n_embd", get("n_embd", "hidden_size", default=768)),
        n_positions=integer("n_positions", get("n_positions", "max_position_embeddings", default=1024)),
        vocab_size=integer("vocab_size", get("vocab_size", default=50257)),
        layer_norm_epsilon=number("layer_norm_epsilon", get("layer_norm_epsilon", default=1e-5)),
        activation_function=str(get("activation_function", default="gelu_new")),
        scale_attn_by_inverse_layer_idx=boolean("scale_attn_by_inverse_layer_idx",
                                                get("scale_attn_by_inverse_layer_idx", default=False)),
        eos_token_id=integer("eos_token_id", eos),
        n_inner=integer("n_inner", get("n_inner", default=0) or 0),
        more_eos_token_ids=more,
    )
    # reorder_and_upcast_attn is the same function up to rounding: attention scores are float32 here anyway
    validate_config(cfg, path)
    return cfg


def validate_config(cfg, path):
    limits = {"n_layer": 1000, "n_head": 1024, "n_embd": 1 << 16, "n_positions": 1 << 20, "vocab_size": 1 << 24}
    for name, most in limits.items():
        if not 0 < getattr(cfg, name) <= most:
            raise UserError(f"{name} must be in 1..{most}, got {getattr(cfg, name)}", path, name,
                            "fix the model config")
    if not (math.isfinite(cfg.layer_norm_epsilon) and cfg.layer_norm_epsilon > 0):
        raise UserError(f"layer_norm_epsilon must be a positive number, got {cfg.layer_norm_epsilon}", path,
                        "layer_norm_epsilon", "fix the model config")
    if cfg.n_inner < 0:
        raise UserError(f"n_inner must be >= 0, got {cfg.n_inner}", path, "n_inner", "fix the model config")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}", path, "n_head",
                        "fix the model config")
    if cfg.activation_function not in SUPPORTED_ACTIVATIONS:
        raise UserError(f"activation_function {cfg.activation_function!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})", path, "activation_function",
                        "use a GPT-2 checkpoint with gelu_new")
