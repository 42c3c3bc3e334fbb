"""The CUDA backend's kernel A/B switches, in one frozen object built once (KernelOptions.from_env) and passed
down: to the kernel registry (which tiles to compile and pick), the model (fused LM head, prefill attention) and
the runner (shared prefixes). CudaBackend.describe() reports it, so it lands in the job summary. The switches
change speed, not the model: tokens are the same, except where another summation order can turn a near tie
(benchmarks/RESULTS.md has the measurements behind each default)."""
from dataclasses import asdict, dataclass
from typing import Tuple

from gpt2job import envs
from gpt2job.errors import UserError

ALL_TILES = ("all",)   # f16_variants: every fp16 tile variant of the registry


@dataclass(frozen=True)
class KernelOptions:
    f16_variants: Tuple[str, ...] = ()   # fp16 product tiles to compile: () this GPU's default set, ALL_TILES all
    argmax_variant: str = ""             # the fp16 tile of the greedy LM head ("": Kernels.pick_argmax's choice)
    f32_bk: int = 0                      # fp32 product k-slice, 8 or 16 (0: chosen per shape)
    fuse_argmax: bool = True             # fp16 LM head choosing in its epilogue: greedy, rule 6 (no logits written)
    prefix_share: bool = True            # prompts of a chunk that start alike compute that prefix once
    prefill_attn: bool = True            # fp16 prefill attention on tensor cores (head size 64)
    tma_staged: bool = True              # fp16 products on the staged-epilogue TMA kernels where picked
    tma_persistent: bool = False         # the persistent twins of the TMA kernels, where compiled
    cuda_graphs: bool = True             # decode steps replayed as CUDA graphs (graphs.StepGraphs)
    graph_pdl: bool = True               # ... with programmatic dependent launch between their kernels (Hopper on)

    def __post_init__(self):
        if self.f32_bk not in (0, 8, 16):
            raise UserError(f"fp32 k-slice {self.f32_bk!r} is not 8 or 16", None, "GPT2JOB_F32_BK",
                            "unset it, or give 8 or 16")

    @classmethod
    def from_env(cls):
        """The switches as the GPT2JOB_* variables set them (gpt2job/envs.py declares each)."""
        names = envs.get("GPT2JOB_F16_VARIANTS")
        bk = envs.get("GPT2JOB_F32_BK").strip()   # "", 8 or 16 (envs checks)
        return cls(f16_variants=ALL_TILES if names == "all" else tuple(v for v in names.split(",") if v),
                   argmax_variant=envs.get("GPT2JOB_ARGMAX_VARIANT"),
                   f32_bk=int(bk or 0),
                   fuse_argmax=envs.get("GPT2JOB_FUSE_ARGMAX"),
                   prefix_share=envs.get("GPT2JOB_PREFIX_SHARE"),
                   prefill_attn=envs.get("GPT2JOB_PREFILL_ATTN"),
                   tma_staged=envs.get("GPT2JOB_TMA_STAGED"),
                   tma_persistent=envs.get("GPT2JOB_TMA_PERSISTENT"),
                   cuda_graphs=envs.get("GPT2JOB_CUDA_GRAPHS"),
                   graph_pdl=envs.get("GPT2JOB_GRAPH_PDL"))

    def describe(self):
        """The switches as plain data (JSON), for the job summary."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
