"""Every environment variable that sets gpt2job up, declared once: name, type, default, meaning (the MPI launchers'
rank variables, which say where a rank runs, are read by cluster/devices.py; CUDA_VISIBLE_DEVICES, the GPUs a
process sees, by backends/__init__.py's gpu_count). Read them only
through this module (`envs.get("GPT2JOB_TRACE")`, which keeps each value for the process), with one truth rule for
switches: 1/true/yes/on and 0/false/no/off (any case); unset or empty is the default; anything else is a user
error naming the variable. `check_environment()` parses every one that is set when a command starts (a bad value is
an error before any work, also where the job would never read it), and names GPT2JOB_* variables that are not
declared here (a misspelt name would otherwise do nothing, silently).

Users choose things with flags; these variables are for the cluster set-up (cache paths, lock waits), for
benchmarks (kernel A/B switches that never change results; the CUDA backend gathers them into one options
object recorded in the output's summary) and for tests (fault injection).
"""
import math
import os
from dataclasses import dataclass
from typing import Any

from gpt2job.errors import UserError


@dataclass(frozen=True)
class Var:
    name: str
    kind: str          # "bool", "int", "float", "str"
    default: Any
    meaning: str
    choices: tuple = ()     # str: the values allowed (besides unset or empty)
    least: float = None     # int, float: the smallest value allowed


VARS = {v.name: v for v in (
    # ---- set-up
    Var("GPT2_VOCAB_DIR", "str", "", "folder with GPT-2's vocab.bpe and encoder.json (as --vocab-dir)"),
    Var("HF_HUB_CACHE", "str", "", "Hugging Face hub cache, where --model NAME is looked up (huggingface_hub's)"),
    Var("HF_HOME", "str", "", "Hugging Face home: the hub cache is HF_HOME/hub (default ~/.cache/huggingface)"),
    Var("HF_HUB_OFFLINE", "bool", False, "never download a --model NAME missing from the cache"),
    Var("GPT2JOB_PYCUDA_CACHE", "str", "", "kernel cache root (default ~/.cache/gpt2job/pycuda)"),
    Var("GPT2JOB_LOCK_WAIT", "float", 30.0, "seconds a run waits for another writer of the same output", least=0),
    Var("GPT2JOB_LAUNCH_TIME", "float", 0.0,
        "when the job was launched (run_inference.sh sets it; 0: the process's own start), for time to ready"),
    Var("GPT2JOB_TRACE", "bool", False, "timing lines on stderr: chunks handed out, received, computed, stored"),
    # ---- kernel A/B switches (benchmarks; same results, other speed)
    Var("GPT2JOB_F16_VARIANTS", "str", "", "fp16 product tile variants to compile: names, comma-separated, or all"),
    Var("GPT2JOB_ARGMAX_VARIANT", "str", "", "the fp16 variant of the greedy LM head with the argmax epilogue"),
    Var("GPT2JOB_F32_BK", "str", "", "fp32 product k-slice: 8 or 16 (default: chosen per shape)", ("8", "16")),
    Var("GPT2JOB_FUSE_ARGMAX", "bool", True, "fp16 LM head choosing in its epilogue (greedy; rule-6 sampling)"),
    Var("GPT2JOB_PREFIX_SHARE", "bool", True, "prompts of a chunk that start alike compute that prefix once"),
    Var("GPT2JOB_PREFILL_ATTN", "bool", True, "fp16 prefill attention on tensor cores (head size 64)"),
    Var("GPT2JOB_TMA_STAGED", "bool", True,
        "fp16 products on the staged-epilogue and ping-pong TMA kernels where picked"),
    Var("GPT2JOB_TMA_PERSISTENT", "bool", False, "persistent twins of the TMA kernels where compiled"),
    Var("GPT2JOB_CUDA_GRAPHS", "bool", True, "decode steps replayed as CUDA graphs"),
    Var("GPT2JOB_GRAPH_PDL", "bool", True, "the replayed decode steps' kernels launched while the one before ends "
        "(programmatic dependent launch, Hopper on)"),
    Var("GPT2JOB_MERGE_CHUNKS", "bool", True, "a GPU worker computes the chunks it holds as one batch of up to "
        "its batch size, as a bigger --chunk-size would"),
    # ---- tests and benchmarks
    Var("GPT2JOB_FAULT", "str", "",
        "tests only: RANK:K:MODE[,...] makes rank RANK fail on its K-th chunk (0: start-up; chunks merged into one "
        "batch count once), MODE raise|hang|exit|kill|cuda (faults.py)"),
    Var("GPT2JOB_SHARED", "str", "", "tests and benchmarks: the shared/ folder (default ../shared)"),
    Var("GPT2JOB_SEED_WORKLOAD", "str", "", "benchmarks: the seed workload's folder or input.bin"),
    Var("GPT2JOB_WRITER", "str", "auto",
        "tests and benchmarks: who writes the output file: thread, process, or auto (a process from 100,000 rows)",
        ("thread", "process", "auto")),
)}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_values = {}


def _parse(var, raw):
    if var.kind == "str":
        if not var.choices or raw.strip() in var.choices:
            return raw
        raise UserError(f"{raw!r} is not one of {', '.join(var.choices)} ({var.meaning})", None, var.name,
                        f"unset it or give one of {', '.join(var.choices)}")
    if var.kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    else:
        try:
            value = int(raw) if var.kind == "int" else float(raw)
            if not math.isfinite(value):   # (nan, inf: a time to ready of nan s)
                value = None
        except ValueError:
            value = None
        if value is not None:
            if var.least is not None and not value >= var.least:
                raise UserError(f"{raw!r} is below {var.least:g} ({var.meaning})", None, var.name,
                                f"unset it or give a {var.kind} of at least {var.least:g}")
            return value
    raise UserError(f"{raw!r} is not a valid {var.kind} ({var.meaning})", None, var.name,
                    f"unset it or give a {'switch: 1 or 0' if var.kind == 'bool' else var.kind}")


def get(name):
    """The value of a declared variable (its default when unset), parsed once per process."""
    if name not in _values:
        var = VARS[name]
        raw = os.environ.get(name)
        _values[name] = var.default if raw is None or raw.strip() == "" else _parse(var, raw)
    return _values[name]


def check_environment():
    """Parse every declared variable that is set (a bad value: the UserError get() would raise later; the values are
    not kept: get() reads them when asked, as before); returns the GPT2JOB_* names set that are not declared, sorted,
    each with the declared name it is closest to, if any ("GPT2JOB_PREFIXSHARE (GPT2JOB_PREFIX_SHARE?)")."""
    import difflib
    for name, var in VARS.items():
        raw = os.environ.get(name)
        if raw is not None and raw.strip() != "":
            _parse(var, raw)
    unknown = sorted(n for n in os.environ if n.startswith("GPT2JOB_") and n not in VARS)
    tails = {n[len("GPT2JOB_"):]: n for n in VARS if n.startswith("GPT2JOB_")}   # (compared past the common prefix)
    return [n + "".join(f" ({tails[m]}?)" for m in difflib.get_close_matches(n[len("GPT2JOB_"):], tails, 1))
            for n in unknown]
