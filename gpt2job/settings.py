"""The settings of a job, in one place: what the user chose (JobSettings, identical on every rank) and the parts
a backend needs to generate (GenerationSettings with its SamplingSettings). Plain data: imports nothing of gpt2job.
"""
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import numpy as np

DEFAULT_CHUNK = 64    # prompts per chunk a backend prefers unless it says otherwise (the CPU backend)
# the least temperature that samples: below it a temperature is greedy (0), the flag and a row's own value alike, as
# vLLM does (far below it 1/T times a logit overflows float32: at 1e-39 every worker failed)
MIN_TEMPERATURE = 1e-5
# Batches a worker keeps submitted (cluster/worker.py): the next one is prepared and uploaded while the current one
# computes. The master plans with it (cluster/scheduler.py: chunks built ahead and sent ahead per worker, the least
# number of chunks per worker) and the CUDA backend reserves that many pinned upload buffers (backends/cuda/backend.py).
PREFETCH = 2


def max_prompt_length(n_positions, max_new_tokens):
    """The longest prompt that leaves room for max_new_tokens new tokens: the last new token is never fed
    back, so a prompt of L tokens uses positions 0 .. L + max_new_tokens - 2. max_new_tokens: an int, or an int
    array (each row's own: an array of limits)."""
    if np.ndim(max_new_tokens) > 0:
        return n_positions - np.maximum(np.asarray(max_new_tokens, np.int64), 1) + 1
    return n_positions - max(max_new_tokens, 1) + 1


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self):
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenerationSettings:
    """The job's generation settings on a worker. A chunk's RowParams (chunks.py), when it has them, replace
    max_new_tokens, the sampling settings, repetition_penalty and stop for its rows."""
    max_new_tokens: int = 16
    ignore_eos: bool = False
    eos_token_id: int = 50256
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_token_ids: Tuple[int, ...] = ()   # a generated id in this set ends the row (finish "stop"), besides EOS
    stop: Tuple[str, ...] = ()             # stop strings (vLLM's): the row ends once its text contains one
    repetition_penalty: float = 1.0        # transformers' meaning; 1: off
    vocab_dir: Optional[str] = None        # the tokenizer's files, for stop strings (None: the default places)
    logprobs: bool = False                 # each generated token's log-probability (Completions.logprobs)
    top_logprobs: int = 0                  # and the K most likely tokens of each step (Completions.top_*)
    score: bool = False                    # `score`: no new tokens; each row's tokens 1..L-1 and their logprobs
    more_eos_ids: Tuple[int, ...] = ()     # the model config's other end ids (its eos_token_id list)

    def stop_ids(self):
        """The ids that end a row: EOS (unless ignore_eos; every id of the config's list) and stop_token_ids."""
        eos = set() if self.ignore_eos else {self.eos_token_id, *self.more_eos_ids}
        return tuple(sorted(set(self.stop_token_ids) | eos))


@dataclass(frozen=True)
class JobSettings:
    input: str
    output: str
    converted_from: str = ""   # the user's text or JSONL input that `input` was converted from (job.py), for messages
    model: str = "random:gpt2"
    max_new_tokens: int = 16
    ignore_eos: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "auto"
    dtype: str = "float32"
    chunk_size: int = 0              # 0: k chunks per worker, within the backend's preferred size (scheduler.py)
    vocab_dir: Optional[str] = None
    overwrite: bool = False
    skip_invalid: bool = False
    validate: Optional[str] = None   # --validate ANSWER: the file the finished output is compared with
    validate_tolerance: float = 0.0005
    share_gpus: bool = False
    chunk_timeout: float = 120.0     # the least time a worker gets for a chunk before it is declared hung
    progress_interval: float = 10.0  # seconds between progress lines when not on a terminal
    dedup: bool = True               # greedy: compute identical prompts once (copies get that completion)
    stop: Tuple[str, ...] = ()       # --stop (repeatable)
    stop_token_ids: Tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: bool = False           # --logprobs (implied by --top-logprobs K > 0)
    top_logprobs: int = 0            # --top-logprobs K
    num_samples: int = 1             # --num-samples N: output rows [prompts * N]
    score: bool = False              # `score IN OUT`: log-likelihoods of given tokens (files/score_input.py)
    prepend_eos: bool = False        # score --prepend-eos: <|endoftext|> before each row (its first token is scored)
    layout: str = "vlen"             # --layout: the output's variable-length columns (files/h5flat.py: "flat")

    def generation(self, eos_token_id, more_eos_ids=()):
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos, eos_token_id=eos_token_id,
            more_eos_ids=tuple(more_eos_ids),
            sampling=SamplingSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                      seed=self.seed),
            stop_token_ids=tuple(self.stop_token_ids), stop=tuple(self.stop),
            repetition_penalty=self.repetition_penalty, vocab_dir=self.vocab_dir,
            logprobs=self.logprobs or self.top_logprobs > 0, top_logprobs=self.top_logprobs, score=self.score)

    def result_settings(self):
        """The settings that change the completions: a resume must match them exactly."""
        d = asdict(self)
        keep = ("max_new_tokens", "ignore_eos", "temperature", "top_k", "top_p", "seed", "dtype")
        out = {k: d[k] for k in keep}
        # added after format 2: recorded only when used, so outputs of earlier runs still resume
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = sorted(self.stop_token_ids)
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.logprobs or self.top_logprobs:
            out["logprobs"], out["top_logprobs"] = True, self.top_logprobs
        if self.num_samples != 1:
            out["num_samples"] = self.num_samples
        if self.score:
            out["score"], out["prepend_eos"] = True, self.prepend_eos
        if self.layout != "vlen":    # not the completions, but the file's form: a resume must write the same
            out["layout"] = self.layout
        if self.temperature <= 0:  # greedy: the sampling knobs do not matter
            for k in ("top_k", "top_p", "seed"):
                out.pop(k)
        return out
