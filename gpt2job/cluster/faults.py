"""Fault injection, for tests: a plan of which rank fails on which chunk, and how. The plan wraps a worker's backend
(inject), so the production worker loop holds no test code. (Real deaths under ULFM: cluster/ulfm.py.)

Plan text (tests pass it in GPT2JOB_FAULT): RANK:K:MODE[,...]: rank RANK fails on its K-th chunk (K=0: during
start-up; chunks a worker merged into one batch count as one) with MODE raise (an exception), hang (stops
answering), exit (the process exits, status 17, without MPI_Finalize), kill (the process is killed: SIGKILL, as by
the kernel's OOM killer or kill -9) or cuda (a real CUDA error in the middle of the chunk: a kernel reads an illegal
address, which loses the GPU context; cuda backend only)."""
import os
import signal
import time

from gpt2job.errors import UserError

MODES = ("raise", "hang", "exit", "kill", "cuda")


class InjectedFault(RuntimeError):
    pass


def parse_plan(text):
    """-> {rank: {chunk number: mode}}"""
    plan = {}
    for item in filter(None, (text or "").split(",")):
        try:
            r, k, mode = item.split(":")
            r, k = int(r), int(k)
        except ValueError:
            r = k = mode = None
        if mode not in MODES:
            raise UserError(f"{item!r} is not RANK:K:MODE with MODE one of {', '.join(MODES)}", None,
                            "GPT2JOB_FAULT", "unset it (it is for tests only)")
        plan.setdefault(r, {})[k] = mode
    return plan


def act(mode, rank, n, backend=None):
    if mode == "cuda":
        return cuda_error(backend, rank, n)
    if mode == "raise":
        raise InjectedFault(f"injected fault on rank {rank}, chunk #{n}")
    if mode == "hang":
        while True:
            time.sleep(60)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(17)


def cuda_error(backend, rank, n):
    """Launch, on the CUDA backend's compute stream, a kernel that reads device address 16 (never mapped): CUDA
    reports an illegal memory access at the next call that waits for the GPU, and the context is lost for good
    (sticky), as after a real kernel fault."""
    kernels, device = getattr(backend, "kernels", None), getattr(backend, "device", None)
    if kernels is None or device is None:
        raise InjectedFault(f"injected fault on rank {rank}, chunk #{n}: mode cuda needs the cuda backend")
    kernels.gather_tokens(device.compute, 16, 16, 16, 1)


class FaultyBackend:
    """A backend that fails as planned on its n-th chunk, else does what the backend it wraps does."""

    def __init__(self, backend, faults, rank):
        self.inner, self.faults, self.rank, self.n = backend, faults, rank, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self):
        self.n += 1
        mode = self.faults.get(self.n)
        if mode == "cuda":
            return (yield from self._cuda_fault())
        if mode is not None:
            act(mode, self.rank, self.n)
        return (yield from self.inner.run())

    def _cuda_fault(self):
        """The chunk with a CUDA error once its first work is on the GPU (its first pause)."""
        steps = self.inner.run()
        try:
            pause = next(steps)
        except StopIteration as done:   # nothing to wait for: wait for the faulty kernel here
            act("cuda", self.rank, self.n, self.inner)
            self.inner.device.compute.synchronize()
            return done.value
        act("cuda", self.rank, self.n, self.inner)
        yield pause
        return (yield from steps)


def inject(backend, plan, rank):
    """The backend as rank `rank` runs it under the plan (start-up faults happen here)."""
    faults = plan.get(rank)
    if not faults:
        return backend
    if 0 in faults:
        act(faults[0], rank, 0, backend)
    return FaultyBackend(backend, faults, rank)
