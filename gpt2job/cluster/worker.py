"""Worker side of a job: build the backend, then compute chunks as the master sends them.

The same compute loop (serve) runs in an MPI worker rank and in the master's own worker thread."""
import os
import queue
import socket
import sys
import threading
import time
import traceback

import numpy as np

from gpt2job.backends import make_backend
from gpt2job.errors import UserError
from gpt2job.cluster.protocol import TAG_ERROR, TAG_HELLO, TAG_RESULT, TAG_WORK
from gpt2job.chunks import decode_chunk, encode_completions
from gpt2job.settings import JobSettings
from gpt2job.model.weights import load_params

PREFETCH = 2            # chunks out with a worker at once: the next one is there before the current ends


def launch_time():
    """When the job started: run_inference.sh exports it; else this process's start."""
    try:
        return float(os.environ["GPT2JOB_LAUNCH_TIME"])
    except (KeyError, ValueError):
        from gpt2job import PROCESS_START
        return PROCESS_START


def build_backend(s: JobSettings, gpu_slot):
    """Load the model and build this rank's backend; gpu_slot picks the GPU among the node's GPUs."""
    params = load_params(s.model)
    gen = s.generation(params.config.eos_token_id)
    backend = make_backend(s.backend, params, gen, dtype=s.dtype, local_rank=gpu_slot, share_gpus=s.share_gpus)
    if hasattr(backend, "warm_up"):   # the CUDA backend: first launches before "ready", not in the first chunk
        backend.warm_up()
    return backend


class InjectedFault(RuntimeError):
    pass


def injected_fault(rank, chunk_number):
    """Test switch GPT2JOB_FAULT='RANK:K:MODE[,...]': rank RANK fails on its K-th chunk (K=0: during
    start-up) with MODE raise (an exception), hang (stops answering) or exit (the process dies)."""
    for item in filter(None, os.environ.get("GPT2JOB_FAULT", "").split(",")):
        r, k, mode = item.split(":")
        if int(r) == rank and int(k) == chunk_number:
            if mode == "raise":
                raise InjectedFault(f"injected fault on rank {rank}, chunk #{chunk_number}")
            if mode == "hang":
                while True:
                    time.sleep(60)
            if mode == "exit":
                os._exit(17)


def error_info(rank, e, chunk_id=None):
    return {"rank": rank, "host": socket.gethostname(), "chunk": chunk_id, "user_error": isinstance(e, UserError),
            "error": f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e),
            "traceback": traceback.format_exc(limit=8)}


STOP = object()   # what a receive() hands the compute loop when the master says stop
TRACE = bool(os.environ.get("GPT2JOB_TRACE"))


def trace(msg):
    """Timing lines on stderr when GPT2JOB_TRACE is set (where the time between chunks goes)."""
    if TRACE:
        sys.stderr.write(f"gpt2job trace {time.time():.3f} {msg}\n")
        sys.stderr.flush()


def serve(backend, rank, receive, send_result):
    """The compute loop of every worker (an MPI rank, or the master's own thread).

    receive(block) -> a Chunk, STOP, or None when nothing is waiting (only when block is False).
    An idle worker submits one chunk and computes it at once; the next ones are submitted from the backend's
    idle hook while it computes, so their preparation and upload overlap the compute. Returns None after STOP,
    or the error report of the exception that ended it."""
    queue, in_flight = [], []     # received not yet submitted; submitted, oldest first
    stopping = []

    def take_waiting(block=False, from_hook=False):
        """Take every message waiting (block: wait for one when idle) and submit chunks: up to PREFETCH from the
        idle hook (the GPU computes meanwhile), else one at most, and only when none is submitted (the main loop
        calls this with the GPU idle: the chunk to compute next must start now)."""
        while not stopping:
            msg = receive(block and not queue and not in_flight)
            if msg is None:
                break
            if msg is STOP:
                stopping.append(True)
                break
            queue.append(msg)
            trace(f"rank {rank}: chunk {msg.chunk_id} received")
        limit = PREFETCH if from_hook else 1
        while queue and len(in_flight) < limit:
            chunk = queue.pop(0)
            in_flight.append(chunk.chunk_id)
            t = time.perf_counter()
            backend.submit(chunk)
            trace(f"rank {rank}: chunk {chunk.chunk_id} ({len(chunk.rows)} prompts) submitted in "
                  f"{1e3 * (time.perf_counter() - t):.1f} ms")

    backend.idle_hook = lambda: take_waiting(from_hook=True)   # called by the backend while its GPU computes
    n = 0
    try:
        while True:
            take_waiting(block=True)
            if not in_flight:              # told to stop, nothing left to compute
                return None
            n += 1
            injected_fault(rank, n)
            t = time.perf_counter()
            comp = backend.result()
            us = int((time.perf_counter() - t) * 1e6)
            in_flight.pop(0)
            t = time.perf_counter()
            send_result(comp, us)
            trace(f"rank {rank}: chunk {comp.chunk_id} computed in {us / 1e3:.1f} ms, sent in "
                  f"{1e3 * (time.perf_counter() - t):.1f} ms")
            timeline = getattr(backend, "timeline", None)
            if timeline:
                trace(f"rank {rank}: chunk {comp.chunk_id} device timeline (ms since start): "
                      + ", ".join(f"{k} {v[0]:.2f}-{v[1]:.2f}" for k, v in timeline[-1].items()
                                  if isinstance(v, tuple)))
            if stopping and not in_flight and not queue:
                return None
    except Exception as e:
        return error_info(rank, e, in_flight[0] if in_flight else None)


def hello_info(backend, t0):
    return {"host": socket.gethostname(), "ready_s": time.time() - launch_time(), "init_s": time.time() - t0,
            "preferred_chunk": backend.preferred_chunk, **backend.describe()}


def run_worker(s: JobSettings, comm, gpu_slot):
    from mpi4py import MPI
    rank = comm.Get_rank()
    t0 = time.time()
    try:
        backend = build_backend(s, gpu_slot)
        injected_fault(rank, 0)
        comm.send(hello_info(backend, t0), dest=0, tag=TAG_HELLO)
    except Exception as e:
        comm.send(error_info(rank, e), dest=0, tag=TAG_ERROR)
        _wait_for_stop(comm)
        return 0
    status = MPI.Status()

    def receive(block):
        if block:   # idle: the last result goes out at once (a large send moves only inside MPI calls)
            finish_send()
        if not wait_for_message(comm, status, block):
            return None
        if status.Get_tag() == TAG_WORK:
            buf = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
            comm.Recv(buf, source=0, tag=TAG_WORK)
            return decode_chunk(buf)
        comm.recv(source=0, tag=status.Get_tag())
        return STOP

    sending = []   # (request, buffer) of the result in flight: the next chunk computes meanwhile

    def finish_send():
        if sending:
            sending.pop()[0].Wait()

    def send_result(comp, us):
        finish_send()
        buf = encode_completions(comp, us)
        sending.append((comm.Isend(buf, dest=0, tag=TAG_RESULT), buf))

    def progress_send():
        """Move the result in flight on (a large message goes out only while this rank calls into MPI; without
        this it waited for the next decode step, 10-80 ms measured). True when nothing is left to send."""
        if sending and sending[0][0].Test():
            sending.pop()
        return not sending

    backend.poll_hook = progress_send     # called by the backend while it waits for the GPU

    err = serve(backend, rank, receive, send_result)
    finish_send()
    if err is not None:
        comm.send(err, dest=0, tag=TAG_ERROR)
        _wait_for_stop(comm)
    backend.close()
    return 0


def wait_for_message(comm, status, block):
    """Is a message from the master waiting (status filled in)? With block, wait for one, politely:
    a blocking MPI_Probe spins a core, which starves the computing ranks on a small CPU node."""
    from mpi4py import MPI
    pause = 0.0001
    while not comm.Iprobe(source=0, tag=MPI.ANY_TAG, status=status):
        if not block:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.0005)
    return True


def _wait_for_stop(comm):
    """After reporting a failure: drop any queued work until the master says stop."""
    from mpi4py import MPI
    status = MPI.Status()
    while True:
        wait_for_message(comm, status, True)
        if status.Get_tag() == TAG_WORK:
            comm.Recv(np.empty(status.Get_count(MPI.INT64_T), np.int64), source=0, tag=TAG_WORK)
        else:
            comm.recv(source=0, tag=status.Get_tag())
            return


class LocalWorker(threading.Thread):
    """The master's own worker: a thread with its backend, fed through queues. It computes in a
    one-process job, and under MPI when the master's node has a GPU that no worker rank uses."""

    def __init__(self, s: JobSettings, gpu_slot):
        super().__init__(name="gpt2job-local-worker", daemon=True)
        self.s, self.gpu_slot = s, gpu_slot
        self.inbox, self.outbox = queue.Queue(), queue.Queue()

    def run(self):
        t0 = time.time()
        try:
            backend = build_backend(self.s, self.gpu_slot)
            injected_fault(0, 0)
            self.outbox.put(("hello", hello_info(backend, t0)))
        except Exception as e:
            self.outbox.put(("error", error_info(0, e)))
            return
        err = serve(backend, 0, self.receive, lambda comp, us: self.outbox.put(("result", comp, us)))
        if err is not None:
            self.outbox.put(("error", err))
        backend.close()

    def receive(self, block):
        try:
            return self.inbox.get(block)
        except queue.Empty:
            return None
