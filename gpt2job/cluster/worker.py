"""A worker: build the backend, say hello, then compute the chunks the master sends until it says stop.

The worker owns its loop. The backend computes a chunk as a generator (Backend.run) that pauses wherever the
host would wait for the device; at each pause the worker does its own work: it takes in the chunks that
arrived and submits them (their preparation and upload overlap the compute), moves its result sends
on, and at most every REPORT_EVERY seconds tells the master how many tokens of the chunk it has generated so far
(Pause.generated: progress within a chunk, for the master's progress line; a send that never waits). The same loop
runs in an MPI worker rank and in the master's own worker thread; only the link differs.

Chunks are the master's unit of work (handing out, journaling, retrying); the GPU's batch is the worker's. A backend
that computes big batches faster (CUDA: the per-row cost of a decode step falls with its rows) says how many rows it
takes at once (batch_rows): the worker then submits the chunks it holds together, up to that many rows, as one batch
(chunks.merge_chunks), and sends each chunk's result on its own. A failed batch is reported as its first chunk's
error; the master hands out again every chunk the worker held."""
import queue
import socket
import threading
import time
import traceback
from collections import deque

from gpt2job import envs
from gpt2job.backends import make_backend, start_backend
from gpt2job.chunks import merge_chunks, split_completions
from gpt2job.cluster import faults
from gpt2job.cluster.ulfm import end_without_finalize
from gpt2job.cluster.channel import STOP, MpiMasterLink, QueueMasterLink
from gpt2job.cluster.trace import TRACE, launch_time, trace
from gpt2job.errors import UserError
from gpt2job.files.row_stops import may_have_stops
from gpt2job.model import stops
from gpt2job.model.weights import load_config, load_params
from gpt2job.settings import PREFETCH, JobSettings

REPORT_EVERY = 0.5      # least seconds between two progress reports of a worker (many decode steps apart)


def build_backend(s: JobSettings, gpu_slot):
    """Load the model and build this rank's backend; gpu_slot picks the GPU among the node's GPUs. The synthetic
    backend (tests and benchmarks) needs the model's config only: no weights are read or generated."""
    ahead = start_backend(s.backend, gpu_slot)   # a cold node's kernel compiles run while the weights are read
    try:
        params = load_config(s.model) if s.backend == "synthetic" else load_params(s.model)
        cfg = getattr(params, "config", params)
        gen = s.generation(cfg.eos_token_id, cfg.more_eos_token_ids)
        backend = make_backend(s.backend, params, gen, dtype=s.dtype, gpu_slot=gpu_slot, share_gpus=s.share_gpus)
    except BaseException:
        if ahead is not None:
            ahead.cancel()   # a failed start ends after the compiles running now, not after the node's whole set
        raise
    backend.warm_up()   # the CUDA backend: first launches before "ready", not in the first chunk
    if s.stop or may_have_stops(s.input):   # the stop strings' token table (~0.5 s), not inside the first chunk
        try:
            stops.prepare(s.vocab_dir, getattr(params, "config", params).vocab_size)
        except UserError:   # no tokenizer here: only a chunk whose rows have stop strings needs it (and says so)
            pass
    return backend


def device_us(backend, chunk_id):
    """The GPU time of the chunk just computed, from the backend's device timeline (Backend.timeline: the span from
    its first launch to its last GPU work, each part of a chunk computed in parts), in us; None without one. It
    is what the worker reports as the chunk's compute time, so the summary's busy % is the GPU's: the host's time
    computing a chunk also counts time the GPU waited between chunks."""
    us = None
    for e in chunk_entries(backend, chunk_id):
        if "first_launch" in e:   # (a part with nothing to generate launched nothing)
            us = (us or 0) + int(1000 * (e["compute"][1] - e["first_launch"]))
    return us


def chunk_entries(backend, chunk_id):
    """The device timeline's entries of the chunk just computed, oldest first: one, or one per part of a chunk
    computed in halves (their chunk id is the chunk's); [] without a timeline."""
    out = []
    for e in reversed(backend.timeline):
        if e.get("chunk_id") != chunk_id:
            break
        out.append(e)
    return out[::-1]


def error_info(rank, e, chunk_id=None):
    return {"rank": rank, "host": socket.gethostname(), "chunk": chunk_id, "user_error": isinstance(e, UserError),
            "error": f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e),
            "traceback": traceback.format_exc(limit=8)}


def batch_rows(backend):
    """The rows this worker computes at once, its chunks merged (0: one chunk at a time)."""
    return int(backend.batch_rows) if envs.get("GPT2JOB_MERGE_CHUNKS") else 0


def hello_info(backend, t0):
    return {"host": socket.gethostname(), "ready_s": time.time() - launch_time(), "init_s": time.time() - t0,
            "preferred_chunk": backend.preferred_chunk, "batch_rows": batch_rows(backend), **backend.describe()}


def by_rows(members, amount):
    """A batch's amount (tokens generated, GPU time) shared out to its chunks, members [(chunk_id, rows)], by their
    rows: [(chunk_id, share)]."""
    total = sum(n for _, n in members)
    return [(chunk_id, amount * n // total) for chunk_id, n in members]


class Loop:
    """The compute loop of one worker: chunks received but not submitted (waiting), batches submitted (in_flight:
    their first chunk's id; members: each batch's chunks, [(chunk_id, rows)], one unless merged)."""

    def __init__(self, backend, link, rank):
        self.backend, self.link, self.rank = backend, link, rank
        self.waiting, self.in_flight, self.members = deque(), deque(), {}
        self.batch_rows = batch_rows(backend)
        self.stopping = False
        self.last_report = time.monotonic()   # the first report comes REPORT_EVERY after the loop starts
        self.reported = None                  # (chunk id, tokens) of the last report

    def take(self, block, limit):
        """Take every message waiting (block: wait for one when there is nothing to compute), then submit chunks
        until `limit` are submitted. With the device idle, a full batch goes at once: the chunks still arriving
        (a window of many small ones, a message each, takes a while to receive) are taken at the batch's first pause."""
        while not self.stopping:
            if self.batch_rows and not self.in_flight and self.waiting_rows() >= self.batch_rows:
                break
            msg = self.link.receive(block and not self.waiting and not self.in_flight)
            if msg is None:
                break
            if msg is STOP:
                self.stopping = True
                break
            self.waiting.append(msg)
            trace(f"rank {self.rank}: chunk {msg.chunk_id} received")
        while self.waiting and len(self.in_flight) < limit:
            chunk = self.next_batch()
            self.in_flight.append(chunk.chunk_id)
            t = time.perf_counter()
            self.backend.submit(chunk)
            ids = [c for c, _ in self.members[chunk.chunk_id]]
            trace(f"rank {self.rank}: chunk {chunk.chunk_id} ({len(chunk.rows)} prompts"
                  f"{', chunks %s as one batch' % ids if len(ids) > 1 else ''}) submitted in "
                  f"{1e3 * (time.perf_counter() - t):.1f} ms")

    def waiting_rows(self):
        return sum(len(c.rows) for c in self.waiting)

    def next_batch(self):
        """The oldest waiting chunk, with the ones after it that fit in batch_rows merged into it."""
        batch = [self.waiting.popleft()]
        rows = len(batch[0].rows)
        while (self.waiting and rows + len(self.waiting[0].rows) <= self.batch_rows
               and (self.waiting[0].params is None) == (batch[0].params is None)):
            batch.append(self.waiting.popleft())
            rows += len(batch[-1].rows)
        self.members[batch[0].chunk_id] = [(c.chunk_id, len(c.rows)) for c in batch]
        return merge_chunks(batch)

    def compute(self):
        """Run the oldest submitted batch; between its steps, submit more work and move the result sends on."""
        steps = self.backend.run()
        while True:
            try:
                pause = next(steps)
            except StopIteration as done:
                return done.value
            if pause.submit:       # the device computes: chunks submitted now upload meanwhile
                self.take(block=False, limit=PREFETCH)
            if pause.generated > 0:
                self.report(pause.generated)
            while not pause.ready() and self.link.in_flight():
                time.sleep(0.0002)

    def report(self, generated):
        """Progress within the chunk computing (the oldest submitted), at most every REPORT_EVERY seconds."""
        now = time.monotonic()
        if now - self.last_report < REPORT_EVERY or not self.in_flight:
            return
        here = (self.in_flight[0], int(generated))
        if here != self.reported:
            self.last_report, self.reported = now, here
            for chunk_id, tokens in by_rows(self.members[here[0]], here[1]):
                self.link.send_progress(chunk_id, tokens)

    def serve(self):
        """Compute until told to stop. Returns None after STOP, or the error report of the exception that ended
        it. With the device idle only one batch is submitted before computing (a second submit would hold the
        idle device back); the rest are submitted at the pauses."""
        try:
            while True:
                self.take(block=True, limit=1)
                if not self.in_flight:              # told to stop, nothing left to compute
                    return None
                t = time.perf_counter()
                comp = self.compute()
                t_back = time.time()
                us = device_us(self.backend, comp.chunk_id)
                if us is None:
                    us = int((time.perf_counter() - t) * 1e6)
                self.in_flight.popleft()
                t = time.perf_counter()
                members = self.members.pop(comp.chunk_id)   # each chunk's result on its own
                for part, (_, part_us) in zip(split_completions(comp, members), by_rows(members, us)):
                    self.link.send_result(part, part_us)
                trace(f"rank {self.rank}: chunk {comp.chunk_id} computed in {us / 1e3:.1f} ms, sent in "
                      f"{1e3 * (time.perf_counter() - t):.1f} ms, back at {t_back:.4f}")
                for entry in chunk_entries(self.backend, comp.chunk_id) if TRACE else ():   # (halves: each)
                    trace(f"rank {self.rank}: chunk {comp.chunk_id} device timeline (ms since start): "
                          + ", ".join(f"{k} {v[0]:.3f}-{v[1]:.3f}" if isinstance(v, tuple) else
                                      f"{k} {v:.6f}" if k == "origin" else f"{k} {v:.3f}"
                                      for k, v in entry.items() if isinstance(v, (tuple, float))))
                if self.stopping and not self.in_flight and not self.waiting:
                    return None
        except Exception as e:
            return error_info(self.rank, e, self.in_flight[0] if self.in_flight else None)


def work(s: JobSettings, link, rank, gpu_slot, fault_plan):
    """Everything a worker does, over its link to the master."""
    t0 = time.time()
    try:
        backend = faults.inject(build_backend(s, gpu_slot), fault_plan, rank)
        link.send_hello(hello_info(backend, t0))
    except Exception as e:
        link.send_error(error_info(rank, e))
        link.wait_for_stop()
        return
    err = Loop(backend, link, rank).serve()
    link.finish()
    if err is not None:
        link.send_error(err)
        link.wait_for_stop()
    backend.close()


def run_worker(s: JobSettings, comm, gpu_slot, fault_plan):
    link = MpiMasterLink(comm)
    work(s, link, comm.Get_rank(), gpu_slot, fault_plan)
    if getattr(link, "peer_died", False):   # the master's stop said a rank died (ULFM): ulfm.STOP_AFTER_DEATH
        end_without_finalize(0)
    return 0


class LocalWorker(threading.Thread):
    """The master's own worker: a thread with its backend, fed through queues. It computes in a
    one-process job, and under MPI when the master's node has a GPU that no worker rank uses."""

    def __init__(self, s: JobSettings, gpu_slot, fault_plan):
        super().__init__(name="gpt2job-local-worker", daemon=True)
        self.s, self.gpu_slot, self.fault_plan = s, gpu_slot, fault_plan
        self.inbox, self.outbox = queue.Queue(), queue.Queue()

    def run(self):
        work(self.s, QueueMasterLink(self.inbox, self.outbox), 0, self.gpu_slot, self.fault_plan)
