"""Backends turn a chunk of prompts into completions on one device: `numpy` (the CPU reference,
backends/numpy_backend.py), `cuda` (our kernels, backends/cuda/) and `synthetic` (tests and benchmarks: deterministic
tokens without a model, backends/synthetic.py). This module holds the interface a worker
drives, the machine facts a backend choice needs, and make_backend. pycuda is imported only by backends/cuda.
"""
import glob
import importlib.util
import os
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator

from gpt2job.chunks import Chunk, Completions
from gpt2job.errors import UserError
from gpt2job.settings import DEFAULT_CHUNK


@dataclass(frozen=True)
class Pause:
    """What Backend.run() yields: the device is computing and the host could wait.

    submit: now is the time to submit further chunks (their preparation and upload overlap this compute).
    ready(): has the device reached the point the host is about to block on? The worker may do its own work
    (send results) until it is; the backend blocks on it once resumed.
    generated: tokens of the chunk being computed that have reached the host so far (progress within a chunk;
    -1: not known at this pause)."""
    submit: bool
    ready: Callable[[], bool]
    generated: int = -1


READY = lambda: True   # noqa: E731  (a Pause whose device point is already reached)


class Backend:
    """What a worker drives: submit(chunk) takes a chunk and returns at once (validation, preparation, upload
    started); run() computes the oldest submitted chunk, as a generator that yields a Pause wherever the host
    would wait for the device and returns the chunk's Completions. Between the steps the worker, not the backend,
    decides what else to do: the backend calls nothing of the worker. Results come in submission order."""
    name = "abstract"
    preferred_chunk = DEFAULT_CHUNK     # prompts per chunk this backend runs well with
    batch_rows = 0                      # rows it computes faster as one batch: the worker merges smaller chunks
                                        # into batches of up to this many (0: one chunk at a time)
    # A device's record of what it computed (the CUDA backend's CUDA events), oldest first: one dict per chunk, or
    # per part of a chunk computed in parts, with "chunk_id" and times in ms since the backend started:
    # "compute" (start, end) and, where the part launched anything, "first_launch". Empty: no device timeline
    # (the worker then reports the host's time computing a chunk).
    timeline = ()

    def warm_up(self):
        """Called once before the worker reports ready: first launches and allocations here, not in the first
        chunk (the CUDA backend); nothing to do for a backend without a device."""

    def submit(self, chunk: Chunk):
        self.__dict__.setdefault("_submitted", deque()).append(chunk)

    def run(self) -> Generator[Pause, None, Completions]:
        return self.generate(self._submitted.popleft())
        yield  # noqa: a generator that never pauses (no device to wait for)

    def generate(self, chunk: Chunk) -> Completions:
        raise NotImplementedError

    def describe(self) -> dict:
        """Small metadata for the job summary (device name, dtype, ...)."""
        return {"backend": self.name}

    def close(self):
        pass


def compute(backend: Backend, chunk: Chunk) -> Completions:
    """Submit one chunk and run it to the end, ignoring the pauses (tests, scripts)."""
    backend.submit(chunk)
    return drive(backend.run())


def drive(steps, on_pause=None):
    """Run a run() generator to its end, calling on_pause(pause) at each pause; returns its Completions."""
    while True:
        try:
            pause = next(steps)
        except StopIteration as done:
            return done.value
        if on_pause is not None:
            on_pause(pause)


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
