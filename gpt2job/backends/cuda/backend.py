"""CudaBackend: the Backend a worker drives, on one GPU with our kernels. It builds the parts in order and ties
them, each calling only the ones below it: Device (GPU, context, streams, memory), Kernels (compiled as the
KernelOptions ask), Model (weights, forward pass, head), Runner (chunk plans, uploads, the decode loop).

pycuda is imported when a CudaBackend is built (device.py, kernels.py), so the rest of the package imports
without it. The GPU is chosen from gpu_slot (the worker's index among its node's worker ranks)
before CUDA creates a context. Everything large is allocated before
the worker says it is ready (Runner.fit, warm_up), not inside the first chunk, but for the buffers of settings
that only some rows of the input ask for (rows.option_buffers). Their sizes follow the device memory left after
the weights (plan.memory_plan): the sizes asked for on a GPU with room, smaller ones (and a smaller
preferred chunk, which the worker's hello passes to the master) on a GPU another process fills.
"""
import ctypes
import dataclasses
import time

import numpy as np

from gpt2job.backends.base import Backend
from gpt2job.backends.cuda import prefix_share, score
from gpt2job.backends.cuda.device import Device
from gpt2job.backends.cuda.graphs import StepGraphs
from gpt2job.backends.cuda.kernels import Kernels
from gpt2job.backends.cuda.model import Model, check_config, head_for
from gpt2job.backends.cuda.options import KernelOptions
from gpt2job.backends.cuda.plan import UPLOAD_ROW_BYTES, group_rows, memory_plan, preferred_chunk
from gpt2job.backends.cuda.rows import option_buffers
from gpt2job.backends.cuda.runner import Runner, pool_bytes
from gpt2job.chunks import Chunk
from gpt2job.errors import UserError, warn
from gpt2job.settings import PREFETCH, max_prompt_length


def keep_host_memory(touch=64 << 20):
    """A chunk's preparation (plan.Layout, the share plan, the message it arrives in) makes NumPy arrays of
    megabytes. glibc maps each one fresh (page faults on first touch) and unmaps it when freed, so the first chunk's
    preparation, which the idle GPU waits for, was several times slower than the next ones' (a W2 chunk's layout, in
    benchmarks/RESULTS.md). Arrays up to 32 MiB (glibc's most) now come from the heap, freed heap
    (up to 4 x touch) stays mapped, and `touch` bytes of it are touched once here: for the whole process (in a
    one-process job the master's too). Elsewhere than glibc: nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if not (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 4 * touch)):
            return
    except (OSError, AttributeError):
        return
    parts = [np.ones(16 << 20, np.uint8) for _ in range(touch // (16 << 20))]   # from the heap: below 32 MiB each
    del parts


def head_kind(s, V):
    """The LM head the job's selection takes (GenerationSettings s; model.head_for, Model.head_buffers): `score`
    (score.py) and a job-wide penalty read the logits; otherwise as select picks it for the job's settings."""
    if s.score or s.repetition_penalty != 1:
        return "logits"
    return head_for(s.sampling, V, s.top_logprobs if s.logprobs else None)


class CudaBackend(Backend):
    name = "cuda"
    preferred_chunk = 8192   # prompts per chunk: big batches keep the tensor cores busy

    def __init__(self, params, settings, dtype="float32", gpu_slot=0, share_gpus=False,
                 max_prefill_rows=131072, head_rows=8192, options=None):
        """options: the kernel A/B switches (default: KernelOptions.from_env(), the GPT2JOB_* variables).
        max_prefill_rows: tokens per prefill pass; head_rows: rows per LM head product (both size the buffers)."""
        check_config(params.config, dtype)
        self.device = None
        self.cfg = params.config
        self.settings = settings
        self.dtype = dtype
        self.options = KernelOptions.from_env() if options is None else options
        self.max_prefill_rows = int(max_prefill_rows)
        self.head_rows = int(head_rows)
        self.device = Device(gpu_slot, share_gpus)
        try:
            self._setup(params, share_gpus)
        except BaseException:
            self.device.abandon()
            raise

    def _setup(self, params, share_gpus):
        dev = self.device
        self.kernels = Kernels(self.options)
        if self.kernels.tmaps is not None:
            dev.own(self.kernels.tmaps)
        dev.open_streams()
        self.model = Model(dev, self.kernels, params, self.dtype, self.options, self.head_rows)
        t0 = dev.drv.Event()   # the timeline's origin
        t0.record(dev.compute)
        t0.synchronize()
        t0_wall = time.time()   # the origin in wall-clock time: traced timelines line up with the master's lines
        free = dev.free_memory()
        s = self.settings
        head = head_kind(s, self.model.V)
        # (Runner.options; `score` takes its log-probabilities from the logits, not --logprobs' buffers)
        options = (s.repetition_penalty != 1, s.top_logprobs if s.logprobs and not s.score else None)

        def estimate(rows, head_rows):     # the activations (logits included), a penalty's, --logprobs', rule 6's
            extra = option_buffers(group_rows(rows, head_rows), head_rows, self.model, *options)
            if head == "tempered":
                extra += self.model.tempered_buffers(head_rows)
            return self.model.activation_bytes(rows, head_rows) + sum(n for _, n in extra)
        def reserved(rows, head_rows):     # the pool's buffers and the two chunk uploads (_reserve)
            return pool_bytes(self.model, head, options, rows, head_rows) + 2 * UPLOAD_ROW_BYTES * rows
        mp = memory_plan(free, share_gpus, self.max_prefill_rows, self.head_rows, self.cfg.n_positions, estimate,
                         reserved)
        graphs = None
        if self.options.cuda_graphs:
            tm = self.kernels.tmaps
            pdl = self.options.graph_pdl and dev.dev.compute_capability()[0] >= 9   # griddepcontrol: Hopper on
            graphs = StepGraphs(dev.compute, lambda: (dev.pool_epoch, tm.epoch if tm else 0), pdl=pdl)
            dev.own(graphs)
        self.model.set_head_rows(mp.head_rows)
        self.runner = Runner(dev, self.model, self.kernels, mp.kv_budget, mp.prefill_rows, self.options.prefix_share,
                             t0, share_gpus=share_gpus, head=head, penalty=options[0], logprobs_k=options[1],
                             t0_wall=t0_wall, graphs=graphs)
        self._reserve(free, mp.reduced)

    def _reserve(self, free, reduced):
        """Allocate the large buffers now, before the worker says it is ready (Runner.reserve; shrunk while an
        allocation fails): growing them during the first chunk would put allocations, and the synchronisations that
        come with freeing a smaller buffer, inside the timed generation. Then PREFETCH pinned upload buffers (one a
        batch the worker keeps submitted), of plan.UPLOAD_ROW_BYTES a prefill row (W2's 2,048 prompts of 32-512 tokens
        take 7 MB; a chunk that needs more grows them then, while the GPU may wait)."""
        runner, dev = self.runner, self.device
        try:
            runner.fit()
            dev.reserve_uploads(PREFETCH, UPLOAD_ROW_BYTES * runner.max_prefill_rows)
        except Exception as e:
            if not dev.is_oom(e):
                raise
            raise UserError(f"too little GPU memory: {free / 2 ** 20:,.0f} MiB free after the weights, and buffers "
                            f"of the least sizes ({runner.sizes()}) do not fit ({type(e).__name__}: {e})", None,
                            "GPU memory", "free the GPU (nvidia-smi lists the processes holding it), or run a "
                            "smaller model or fewer ranks per GPU") from e
        self.preferred_chunk = preferred_chunk(type(self).preferred_chunk, self.head_rows, self.model.head_rows)
        # smaller chunks merged up to it (cluster/worker.py); fp16 only: its product rows are bitwise the same for any
        # row count (tests/test_cuda_kernels.py), fp32's split-K follows the row count (plan.split_chunk), and the
        # chunks a batch merges depend on when they arrive
        self.batch_rows = self.preferred_chunk if self.dtype == "float16" else 0
        if reduced or self.model.head_rows < self.head_rows:
            warn(f"GPU {dev.gpu_index} has {free / 2 ** 20:,.0f} MiB free after the "
                 f"weights: buffers reduced to {runner.sizes()}; asking for chunks of at most "
                 f"{self.preferred_chunk:,} prompts")

    @property
    def timeline(self):
        """Per computed chunk, CUDA-event times (Runner)."""
        return self.runner.timeline

    def describe(self):
        dev = self.device
        return {"backend": self.name, "dtype": self.dtype, "device": dev.name(), "gpu_index": dev.gpu_index,
                "compute_capability": dev.compute_capability(), "kernel_options": self.options.describe()}

    def close(self):
        if self.device is not None:
            self.device.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- the Backend interface

    def submit(self, chunk):
        """Check and plan the chunk and start uploading it on the copy stream; returns at once."""
        self._submit(chunk, self.settings)

    def _submit(self, chunk, settings):
        if settings.score:   # `score`: no prefix sharing, no decoding (score.py)
            return score.submit(self.runner, chunk, settings)
        self.runner.submit(chunk, settings)

    def run(self):
        """Compute the oldest submitted chunk: a generator of Pauses that returns its Completions."""
        return score.run(self.runner) if self.settings.score else self.runner.run()

    def warm_up(self):
        """Two 4-token prompts, 2 new tokens (`score`: scored), through every stage (first launches, pinned
        buffers) so that the first real chunk runs at full speed; the worker calls it before it reports ready."""
        keep_host_memory()
        saved = self.settings
        new = max(min(saved.max_new_tokens, 2, self.cfg.n_positions - 1), 0)
        n = max(min(4, max_prompt_length(self.cfg.n_positions, new)), 1)
        chunk = Chunk(-1, np.arange(2, dtype=np.int64), np.array([0, n, 2 * n], np.int64),
                      np.arange(2 * n, dtype=np.int32) % self.cfg.vocab_size)
        self._submit(chunk, dataclasses.replace(saved, max_new_tokens=new, ignore_eos=True))   # the job's own path
        try:
            for _ in self.run():
                pass
        finally:
            self.runner.timeline.clear()
        if self.options.prefix_share and saved.max_new_tokens > 0 and not saved.score:
            # one share plan of a full-size chunk (discarded): NumPy's first pass over arrays this large (fresh
            # memory pages) is several times slower than later ones, and the first chunk has nothing to hide it
            # behind (benchmarks/RESULTS.md)
            rng = np.random.default_rng(0)
            toks = rng.integers(0, self.cfg.vocab_size, (self.preferred_chunk, 16)).astype(np.int32)   # [B, 16]
            toks[::2, :8] = toks[0, :8]
            prefix_share.plan(np.arange(self.preferred_chunk + 1, dtype=np.int64) * 16, toks.reshape(-1),
                              lambda ls: self.runner.kv_groups(ls, saved.max_new_tokens))

    # ---------------------------------------------------------------- tests and checks

    def last_logits(self, prompts):
        """Logits [B, V] float32 at each prompt's last position (prompts: list of 1-D int arrays), computed by the
        real prefill and head (score.last_logits) in this backend's dtype. For tests and fp16-vs-fp32 checks."""
        B = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int64)
        offsets = np.zeros(B + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts]) if B else np.zeros(0, np.int32)
        if B == 0:
            return np.empty((0, self.model.V), np.float32)
        plan = self.runner.prepare(Chunk(-1, np.arange(B, dtype=np.int64), offsets, tokens), self.settings, False)
        try:
            return score.last_logits(self.runner, plan)
        finally:
            self.runner.done_with(plan)
