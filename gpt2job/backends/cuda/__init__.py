"""The CUDA backend: GPT-2 on one GPU with our own kernels (cuda_src/*.cu, compiled at run time by PyCUDA).

Objects, each calling only the ones below it. Four call functions their owner hands them: StepGraphs
(the decode step it captures, and the memory epochs that tell a captured graph is stale), prefix_share.plan (the KV
grouping, plan.kv_groups in the runner's budget), Device.upload_half (the Model's conversion kernel) and
plan.memory_plan (the backend's estimate and reserved closures: what a chunk of R rows needs). Device
only frees, as it closes, the objects given to Device.own:
  backend.py       CudaBackend: the Backend a worker drives (submit, run, warm_up); builds and ties the others
  score.py         the `score` command's pass on the Runner's prefill (and last_logits for tests)
  runner.py        Runner: a chunk's plan and upload (submit), its KV groups, prefill passes and decode loop (run)
  rows.py          a chunk's per-row settings on the GPU: limits, token selection's parameters, stop checks
  logprobs.py      --logprobs: the log-probabilities' buffers and downloads of a chunk
  graphs.py        StepGraphs: decode steps captured once and replayed as CUDA graphs (the driver API, ctypes)
  model.py         Model: the weights on the GPU, the forward pass, ln_f + LM head + token selection
  device.py        Device: GPU choice, context, streams, memory budget, buffer pool, pinned host buffers
  kernels.py       the kernel registry (one record per kernel and fp16 tile variant) and the launchers
  kernels_select.py  the token-selection kernels' records and launchers (a mixin of Kernels)
  registry.py      the kernel record type (Kernel, register, KERNELS) both of them use
  kcache.py        the node's kernel cache: each module compiled once per node, shared by its ranks
  nvcc.py          one module's compile to a cubin (pycuda's compile, or the same nvcc command line without it)
  picks.py         which fp16 tile variant runs a product of a given shape
  options.py       KernelOptions: the kernel A/B switches (speed, not the model), read from GPT2JOB_* once
  plan.py          pure NumPy: prompt checks, the chunk's upload layout, prefill passes and tiles, KV groups
  prefix_share.py  pure NumPy: which prompt prefixes a chunk computes once
  tensor_maps.py   TMA descriptors of the Hopper products
  prebuild.py      the node's kernel cache filled before the modules load: `build-kernels` (nvcc, no GPU), and a
                   worker's compiles started before it reads its weights (compile_ahead)
Only device.py, kernels.py (Kernels), nvcc.py (compile_cubin) and prebuild.py (through device.init_driver) import
pycuda, each only when called: when a backend is started or built, kernels compile or build-kernels looks for the
node's GPU.
"""
import importlib.util
import os

import gpt2job


def cuda_src_dir():
    """The folder of the kernel sources: the installed package's gpt2job/cuda_src (pip install ., a wheel),
    else the repository's cuda_src/ (a checkout, an editable install)."""
    spec = importlib.util.find_spec("gpt2job.cuda_src")
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(gpt2job.__file__))), "cuda_src"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "common.cuh")):
            return d
    raise FileNotFoundError("the CUDA kernel sources (cuda_src/*.cu) are missing; looked in " + ", ".join(candidates))
