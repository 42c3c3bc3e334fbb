"""One GPU as the CUDA backend uses it: chosen by the worker's gpu_slot (its index among its node's workers) before
CUDA makes a context, two streams (compute; copy for uploads), the free device memory, a pool of named device
buffers, the pinned host buffers of chunk uploads and of the decode steps, what an allocation failure looks like
(is_oom) and what can be freed after one (release), and the release of it all (close), also of a context a CUDA
error has lost."""
import os

import numpy as np

from gpt2job.errors import UserError


UPLOAD_SCRATCH = "upload_f32"   # Device.upload_half's float32 staging buffer on the GPU (dropped once loaded)


def init_driver():
    """pycuda.driver, initialised (cuInit) the way every use here needs it: every kernel of a module is loaded with
    the module (before the worker reports ready), not at its first launch inside the first chunk (CUDA's default is
    lazy loading), a setting read when CUDA initialises."""
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    import pycuda.driver as drv
    drv.init()
    return drv


class Upload:
    """A pinned host buffer + device buffer pair for one in-flight chunk upload."""

    def __init__(self):
        self.host = None
        self.dev = None
        self.nbytes = 0
        self.busy = False
        self.done_evt = None   # recorded when the copy finished (host buffer reusable)

    def reserve(self, drv, nbytes):
        """Room for at least nbytes (a smaller buffer pair is replaced by one of exactly nbytes). When an allocation
        fails the pair is left empty (nbytes 0), never holding a freed buffer."""
        if self.nbytes >= nbytes:
            return
        self.free()
        self.host = drv.pagelocked_empty(nbytes, np.uint8)
        self.dev = drv.mem_alloc(nbytes)
        self.nbytes = nbytes

    def free(self):
        if self.dev is not None:
            self.dev.free()
        self.host = self.dev = None
        self.nbytes = 0


class Device:
    def __init__(self, gpu_slot=0, share_gpus=False):
        self.drv = drv = init_driver()
        count = drv.Device.count()
        if count == 0:
            raise UserError("no CUDA GPU is visible", None, "backend", "use --backend numpy or run on a GPU node")
        if gpu_slot >= count and not share_gpus:
            raise UserError(f"worker #{gpu_slot + 1} on this node, but the node has only {count} GPU(s)", None,
                            "-np", f"start at most {count} worker(s) per node (the master, rank 0, needs no GPU "
                                   f"of its own: mpirun -np {count + 1} on one node), or pass --share-gpus")
        self.gpu_index = gpu_slot % count
        self.dev = drv.Device(self.gpu_index)
        self.ctx = self.dev.make_context()
        self._owned = []     # objects with device memory of their own (free() before the context goes)
        self._allocs = []    # uploaded arrays (the weights)
        self._bufs = {}      # name -> (allocation, bytes)
        self.pool_epoch = 0  # bumped whenever a pool buffer is allocated or freed (a captured graph is then stale)
        self._uploads = []   # Upload pairs
        self.tok_host = self.step_host = np.empty(0, np.int32)   # pinned by step_buffers
        self.lp_host = None    # pinned: two steps' log-probabilities (--logprobs; logprobs.StepLogprobs)

    def open_streams(self):
        self.compute = self.drv.Stream()
        self.copy = self.drv.Stream()

    def own(self, obj):
        """Free obj (it has .free()) when the device closes, before its other memory."""
        self._owned.append(obj)

    def name(self):
        return self.dev.name()

    def compute_capability(self):
        return "%d.%d" % self.dev.compute_capability()

    # ---------------------------------------------------------------- device memory

    def upload(self, a, dtype=np.float32):
        """A device copy of array a (as dtype, C order), kept until close."""
        a = np.ascontiguousarray(a, dtype=dtype)
        g = self.drv.mem_alloc(max(a.nbytes, 16))
        self.drv.memcpy_htod(g, a)
        self._allocs.append(g)
        return g

    def upload_half(self, a, convert, rows=None):
        """A float16 device array made from float32 array a on the GPU, kept until close: a goes up as float32 into
        the pool's buffer UPLOAD_SCRATCH, then convert(scratch, out, part) rounds it into the new array on the
        compute stream (the host neither converts nor transposes: 6 GB of GPT-2 XL weights took seconds that way).
        rows: when each row of a converts alone, it goes up `rows` rows at a time (out then points at the part's
        first row), so that the scratch stays that small (GPT-2 XL's LM head whole would be 321 MB)."""
        a = np.ascontiguousarray(a, np.float32)
        g = self.drv.mem_alloc(max(a.size * 2, 16))
        self._allocs.append(g)
        step = rows or max(len(a), 1)           # (a is at least 1-D here)
        row = a[0].size if len(a) else 0
        for r0 in range(0, max(len(a), 1), step):
            part = a[r0:r0 + step]
            scratch = self.buf(UPLOAD_SCRATCH, part.nbytes)
            self.compute.synchronize()          # the previous conversion has read the scratch
            self.drv.memcpy_htod(scratch, part)
            convert(scratch, int(g) + 2 * r0 * row, part)
        return g

    def drop(self, name):
        """Free the pool's buffer `name`, if any, once the compute stream's work is done."""
        cur = self._bufs.pop(name, None)
        if cur is not None:
            self.pool_epoch += 1
            self.compute.synchronize()
            cur[0].free()

    def free_memory(self):
        """Bytes of device memory free now."""
        return self.drv.mem_get_info()[0]

    def is_oom(self, e):
        """Whether exception e is an allocation failing for want of memory (device or pinned host: pycuda's
        MemoryError, or an error saying 'out of memory'; NumPy's MemoryError), which computing less at once can
        avoid, unlike other CUDA errors (an illegal address loses the whole context)."""
        drv = self.drv
        if isinstance(e, (drv.MemoryError, MemoryError)):
            return True
        return isinstance(e, drv.Error) and "out of memory" in str(e).lower()

    def buf(self, name, nbytes):
        """The device address of the pool's buffer `name`, grown to at least nbytes (growing waits for the compute
        stream: the old buffer may still be in use)."""
        nbytes = max(int(nbytes), 16)
        cur = self._bufs.get(name)
        if cur is None or cur[1] < nbytes:
            if cur is not None:
                self.compute.synchronize()
                cur[0].free()
                del self._bufs[name]   # (when the allocation below fails, no freed buffer stays in the pool)
            self.pool_epoch += 1
            self._bufs[name] = (self.drv.mem_alloc(nbytes), nbytes)
        return int(self._bufs[name][0])

    def release(self):
        """After an allocation failed: wait for both streams, then free every pool buffer and the uploads not in
        use (the work grows them again, to the sizes it needs)."""
        self.compute.synchronize()
        self.copy.synchronize()
        self.pool_epoch += 1
        for b, _ in self._bufs.values():
            b.free()
        self._bufs = {}
        for u in self._uploads:
            if not u.busy:
                u.free()
        self._uploads = [u for u in self._uploads if u.busy]

    # ---------------------------------------------------------------- pinned host buffers

    def reserve_uploads(self, n, nbytes):
        for _ in range(n):
            u = Upload()
            u.reserve(self.drv, nbytes)
            self._uploads.append(u)

    def take_upload(self, nbytes):
        """A free upload pair with room for nbytes (its previous copy finished), marked busy."""
        u = next((x for x in self._uploads if not x.busy), None)
        if u is None:
            u = Upload()
            self._uploads.append(u)
        if u.done_evt is not None:
            u.done_evt.synchronize()
        if u.nbytes < nbytes:
            u.reserve(self.drv, max(nbytes, 1 << 16) * 5 // 4)
        u.busy = True
        return u

    def step_buffers(self, n, lp_words=0):
        """Pinned host room for two decode steps of n rows: their inputs (step_host, 3 int32 per row: a step's
        upload may still wait for the GPU while the next step's is written; its last two int32 the two steps'
        numbers), their tokens (tok_host) and, with lp_words (--logprobs: logprobs.step_words), their
        log-probabilities (lp_host)."""
        if self.step_host.size < 6 * n + 2:
            self.step_host = self.drv.pagelocked_empty(max(6 * n + 2, 6144), np.int32)
        if self.tok_host.size < 2 * n:
            self.tok_host = self.drv.pagelocked_empty(max(2 * n, 2048), np.int32)
        if lp_words and (self.lp_host is None or self.lp_host.size < 2 * lp_words):
            self.lp_host = self.drv.pagelocked_empty(max(2 * lp_words, 4096), np.float32)

    def upload_step_number(self, p_at, step):
        """Queue step (int32) to device address p_at on the compute stream, from pinned slot step % 2."""
        at = self.step_host[-2 + step % 2:][:1]
        at[0] = step
        self.drv.memcpy_htod_async(p_at, at, self.compute)

    def download_tokens(self, p_out, n, slot):
        """Copy n int32 from the GPU into pinned slot (0 or 1) of tok_host after the compute stream's work so far:
        (start event, end event, host view), the view valid once the end event completed."""
        ev0, ev1 = self.drv.Event(), self.drv.Event()
        ev0.record(self.compute)
        half = self.tok_host.size // 2
        host = self.tok_host[slot * half:slot * half + n]
        self.drv.memcpy_dtoh_async(host, p_out, self.compute)
        ev1.record(self.compute)
        return ev0, ev1, host

    # ---------------------------------------------------------------- the end

    def abandon(self):
        """Drop the context after a failed start (its memory goes with it)."""
        self.ctx.pop()
        self.ctx.detach()
        self.ctx = None

    def close(self):
        """Free everything and drop the context. A context lost to a CUDA error (an illegal address is sticky: every
        later call fails) is only dropped: destroying it frees its memory (freeing buffer by buffer would fail, and
        warn, once per buffer; the buffers' own clean-up skips a dropped context silently)."""
        if self.ctx is None:
            return
        drv = self.drv
        held = (self._owned, self._allocs, self._bufs, self._uploads)   # dropped only once the context is
        self._owned, self._allocs, self._bufs, self._uploads = [], [], {}, []
        try:
            try:
                self.compute.synchronize()
                self.copy.synchronize()
                lost = False
            except drv.Error:
                lost = True
            if not lost:
                owned, allocs, bufs, uploads = held
                for obj in owned:
                    obj.free()
                for a in allocs:
                    a.free()
                for b, _ in bufs.values():
                    b.free()
                for u in uploads:
                    u.free()
        finally:
            ctx, self.ctx = self.ctx, None
            try:
                ctx.pop()
            except drv.Error:
                pass   # a lost context: detach still takes it off pycuda's context stack
            ctx.detach()
            del held
