"""Backends turn a chunk of prompts into completions on one device: `numpy` (the CPU reference,
backends/numpy_backend.py), `cuda` (our kernels, backends/cuda/) and `synthetic` (tests and benchmarks: deterministic
tokens without a model, backends/synthetic.py), each a base.Backend (the interface a worker drives). This module
holds the machine facts a backend choice needs, and make_backend. pycuda is imported only by backends/cuda.
"""
import glob
import importlib.util
import os
import re

from gpt2job.errors import UserError


# ---------------------------------------------------------------- what this machine has

def gpu_count():
    """GPUs visible to this process, without initialising CUDA (so a GPU can still be chosen)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        if not ids:
            return 0
        return len(ids) if _driver_present() else 0
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


def _driver_present():
    return any(re.fullmatch(r"/dev/nvidia\d+", p) for p in glob.glob("/dev/nvidia*"))


def pycuda_available():
    return importlib.util.find_spec("pycuda") is not None


def resolve_backend(name):
    """'auto' -> 'cuda' when a GPU and pycuda are here, else 'numpy'; other names as given."""
    if name == "auto":
        return "cuda" if gpu_count() > 0 and pycuda_available() else "numpy"
    return name


def start_backend(name, gpu_slot=0):
    """What a backend's build can begin before the worker reads its weights: the CUDA backend's kernel compiles (in
    the background: cuda/prebuild.py compile_ahead). Returns what to cancel() if the build fails, or None (nothing
    for the other backends, or where the CUDA backend cannot run)."""
    if resolve_backend(name) == "cuda" and pycuda_available():
        from gpt2job.backends.cuda.prebuild import compile_ahead   # lazy: pycuda is imported only there
        return compile_ahead(gpu_slot)
    return None


def make_backend(name, params, settings, dtype="float32", gpu_slot=0, share_gpus=False):
    """Build the backend a worker runs: 'numpy', 'cuda', 'auto' (cuda when a GPU and pycuda are here), or
    'synthetic' (params is then the model's config alone: no weights are loaded)."""
    asked, name = name, resolve_backend(name)
    if name == "synthetic":
        from gpt2job.backends.synthetic import SyntheticBackend
        return SyntheticBackend(getattr(params, "config", params), settings)
    if name == "numpy" and dtype != "float32":
        # decided here, on the node that computes: a CPU-only master may serve GPU workers. The NumPy backend
        # computes float32 only: running it would record float16 in the output's settings for float32 results.
        why = "--backend numpy" if asked == "numpy" else (
            "--backend auto found no GPU on this node" if gpu_count() == 0 else
            "--backend auto found a GPU but no pycuda on this node")
        raise UserError(f"{dtype} runs only on the cuda backend, and {why}", None, "--dtype",
                        "use --dtype float32 for the CPU, or run on GPU nodes with pycuda "
                        "(pip install 'gpt2job[gpu]')")
    if name == "numpy":
        from gpt2job.backends.numpy_backend import NumpyBackend
        return NumpyBackend(params, settings)
    if not pycuda_available():
        raise UserError("pycuda is not installed", None, "--backend cuda",
                        "pip install 'gpt2job[gpu]' on the GPU nodes, or use --backend numpy")
    from gpt2job.backends.cuda.backend import CudaBackend   # lazy: pycuda is imported only there
    return CudaBackend(params, settings, dtype=dtype, gpu_slot=gpu_slot, share_gpus=share_gpus)
