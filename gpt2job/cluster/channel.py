"""How the master and its workers talk: one small interface, two transports.

Master side (what MpiChannel, ThreadChannel and Mux each offer): send_chunk (encode_ahead: its buffer made before),
send_stop, poll (every message waiting), take_reports (the progress reports poll set aside), progress (moves MPI's
sends on), wait, flush, forget (a rank gone), owns_process; abort (MpiChannel, Mux), join (ThreadChannel, Mux).
  * MpiChannel: the worker ranks 1..N-1. Chunks and results travel as int64 buffers (Isend/Recv; the master
    never blocks on one worker); hello, error and stop are small pickled messages.
  * ThreadChannel: the master's own worker thread (rank 0 computing), through two queues.
  * Mux: both at once (a node with more GPUs than worker ranks).
Worker side (what MpiMasterLink and QueueMasterLink each offer): receive, send_hello, send_result, send_error,
send_progress, in_flight, finish, wait_for_stop: the two ends of the above.
Message kinds the master receives: ("hello", info dict), ("result", Completions, compute_us, time received), ("error",
info), ("failed", why: the rank's process died; only an MPI with fault tolerance, ULFM, says so) from poll(); and
progress reports, (rank, chunk id, tokens of the chunk generated so far), from take_reports(): kept apart from poll's
messages, so that code waiting for results or errors (the end of a job) never mistakes one for them. A worker sends them
every ~0.5 s at most (one per chunk of its batch), never waiting (skipped while MAX_REPORTS_IN_FLIGHT are in flight)."""
import queue
import time

import numpy as np

from gpt2job.chunks import decode_chunk, decode_completions, encode_chunk, encode_completions
from gpt2job.cluster.ulfm import STOP_AFTER_DEATH, dead_ranks, process_failure

TAG_WORK = 1      # master -> worker: int64 chunk buffer
TAG_STOP = 2      # master -> worker: pickled reason string
TAG_HELLO = 3     # worker -> master: pickled dict (host, backend, time to ready, preferred chunk size)
TAG_RESULT = 4    # worker -> master: int64 completions buffer
TAG_ERROR = 5     # worker -> master: pickled dict (rank, host, chunk, error, traceback)
TAG_PROGRESS = 6  # worker -> master: int64 [chunk id, tokens of it generated so far]
MAX_REPORTS_IN_FLIGHT = 4   # a worker with this many progress sends unfinished skips the next report

STOP = object()   # what a worker's receive() returns when the master says stop


class Backoff:
    """Sleeps that grow from 0.1 ms to `most` while nothing happens: a polite wait that still answers fast
    (a blocking MPI probe would spin a core that the computing ranks of a small node need)."""

    def __init__(self, most=0.0005):
        self.most, self.pause = most, 0.0001

    def sleep(self):
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, self.most)


def probe_twice(probe):
    """probe() and, finding nothing, once more: Open MPI's Iprobe looks for a match before it moves incoming messages
    on, so one that came while we slept is seen by the second call, not a sleep later (benchmarks/RESULTS.md)."""
    return probe() or probe()


# ---------------------------------------------------------------- master side

class MpiChannel:
    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.status = MPI.Status()
        self.ranks = list(range(1, comm.Get_size()))
        self.sends = []          # (request, buffer, rank, the rank's first chunk?) in flight
        self.fed = set()         # ranks sent a chunk
        self.abandoned = []      # sends to forgotten ranks: never waited for, kept alive for MPI
        self.encoded = {}        # chunk id -> its buffer, encoded ahead of time
        self.reports = []        # (rank, chunk id, tokens so far) received, not taken yet
        # ULFM (mpirun --with-ft ulfm): a dead rank makes MPI calls that involve it raise these error classes
        # instead of mpirun ending the job; each dead rank is told once to the master as ("failed", why)
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.failed = set()      # ranks known dead
        self.news = []           # ("failed" messages) for the next poll
        self.any_source = True   # False: failures cannot be acknowledged (ulfm.dead_ranks): probe rank by rank

    def encode_ahead(self, chunks):
        self.encoded.update((c.chunk_id, encode_chunk(c)) for c in chunks)

    def send_chunk(self, rank, chunk):
        buf = self.encoded.pop(chunk.chunk_id, None)
        if buf is None:
            buf = encode_chunk(chunk)
        self._send(lambda: self.comm.Isend(buf, dest=rank, tag=TAG_WORK), buf, rank, rank not in self.fed)
        self.fed.add(rank)
        if len(self.sends) > 1 and self._sent(self.sends[0]):   # the oldest moves now, not after a window of many
            self.sends.pop(0)

    def send_stop(self, rank, why="stop"):
        self._send(lambda: self.comm.isend(why, dest=rank, tag=TAG_STOP), None, rank)

    def _send(self, isend, buf, rank, first=False):
        """No send to a dead rank: the master learns of the death at its next poll; the chunk goes elsewhere."""
        if rank in self.failed:
            return
        try:
            self.sends.append((isend(), buf, rank, first))
        except self.MPI.Exception as e:
            self.news += self.dead_after(e)

    def forget(self, rank):
        """A retired rank: its sends in flight may never be received (a hung rank), so they are not waited for."""
        self.abandoned += [x for x in self.sends if x[2] == rank]
        self.sends = [x for x in self.sends if x[2] != rank]

    def poll(self):
        """Every message already here, received before any is handled (storing a result takes a while: each
        completion is timed when it reached the master, not after the ones before it were stored)."""
        msgs, st = [], self.status
        while True:
            try:
                if not self._probe(st):
                    break
                self._receive(st, msgs)
            except self.MPI.Exception as e:   # a dead rank (ULFM); any other error ends the job as before
                self.news += self.dead_after(e)
        msgs, self.news = msgs + self.news, []
        return msgs

    def _probe(self, st):
        ranks = [self.MPI.ANY_SOURCE] if self.any_source else [r for r in self.ranks if r not in self.failed]
        return probe_twice(lambda: any(self.comm.Iprobe(source=r, tag=self.MPI.ANY_TAG, status=st) for r in ranks))

    def _receive(self, st, msgs):
        src, tag = st.Get_source(), st.Get_tag()
        if tag == TAG_RESULT:
            buf = np.empty(st.Get_count(self.MPI.INT64_T), dtype=np.int64)
            self.comm.Recv(buf, source=src, tag=TAG_RESULT)
            msgs.append((src, "result", *decode_completions(buf), time.time()))
        elif tag == TAG_PROGRESS:
            buf = np.empty(2, dtype=np.int64)
            self.comm.Recv(buf, source=src, tag=TAG_PROGRESS)
            self.reports.append((src, int(buf[0]), int(buf[1])))
        elif tag in (TAG_HELLO, TAG_ERROR):
            msgs.append((src, "hello" if tag == TAG_HELLO else "error", self.comm.recv(source=src, tag=tag)))
        else:
            self.comm.recv(source=src, tag=tag)

    def dead_after(self, e):
        """MPI raised e: the ("failed", why) messages of the ranks found dead since the last time; e again when it
        is no process failure or names no new dead rank (nothing to retire: the job cannot go on)."""
        if not process_failure(self.MPI, e):
            raise e
        dead, self.any_source = dead_ranks(self.MPI, self.comm, self.ranks)
        dead -= self.failed
        if not dead:
            raise e
        self.failed |= dead
        return [(r, "failed", f"its process died ({e.Get_error_string().strip()})") for r in sorted(dead)]

    def take_reports(self):
        reports, self.reports = self.reports, []
        return reports

    def progress(self):
        """Move the sends on (a chunk in flight moves only while the master calls into MPI)."""
        self.sends = [x for x in self.sends if not self._sent(x)]

    def _sent(self, send):
        try:
            return send[0].Test()
        except self.MPI.Exception as e:   # to a rank now dead (ULFM): never waited for again
            if send[2] not in self.failed:
                self.news += self.dead_after(e)
            self.abandoned.append(send)
            return True

    def wait(self):
        self.progress()
        time.sleep(0.0001 if self.sends else 0.0005)

    def flush(self, seconds=10.0, firsts=False):
        """Wait (at most `seconds`) for the sends in flight (firsts: each worker's first chunk only: its GPU waits),
        polling back to back for 20 ms (a send moves only inside MPI calls: a large one lags at the loop's pace)."""
        start = time.monotonic()
        self.progress()
        while any(x[3] or not firsts for x in self.sends) and time.monotonic() < start + seconds:
            if time.monotonic() > start + 0.02:
                time.sleep(0.001)
            self.progress()

    def owns_process(self, rank):
        return rank in self.ranks

    def abort(self, code):
        self.comm.Abort(code)


class ThreadChannel:
    """The master's own worker, a thread of this process (rank 0)."""

    def __init__(self, worker_thread):
        self.worker = worker_thread
        self.ranks = [0]
        self.held = []           # a message wait() took off the queue, handed out by the next poll()
        self.reports = []        # progress reports, for take_reports()

    def encode_ahead(self, chunks):
        pass

    def send_chunk(self, rank, chunk):
        self.worker.inbox.put(chunk)

    def send_stop(self, rank, why="stop"):
        self.worker.inbox.put(STOP)

    def forget(self, rank):
        pass

    def poll(self):
        msgs, self.held = self.held, []
        while True:
            try:
                msgs.append((0, *self.worker.outbox.get_nowait()))
            except queue.Empty:
                break
        self.reports += [m for m in msgs if m[1] == "progress"]
        return [m for m in msgs if m[1] != "progress"]

    def take_reports(self):
        reports, self.reports = [(rank, chunk_id, tokens) for rank, _, chunk_id, tokens in self.reports], []
        return reports

    def progress(self):
        pass

    def wait(self):
        """Nothing else to serve: sleep until the thread says something (at most 0.2 s)."""
        try:
            self.held.append((0, *self.worker.outbox.get(timeout=0.2)))
        except queue.Empty:
            pass

    def flush(self, seconds=10.0, firsts=False):
        pass

    def owns_process(self, rank):
        return False     # a hung thread ends with the process

    def join(self, timeout):
        self.worker.join(timeout=timeout)


class Mux:
    """The master's workers as one channel: the MPI worker ranks and/or the master's own thread."""

    def __init__(self, channels=()):
        self.channels = []
        self.by_rank = {}
        for c in channels:
            self.add(c)

    def add(self, channel):
        self.channels.append(channel)
        self.by_rank.update((r, channel) for r in channel.ranks)

    @property
    def ranks(self):
        return sorted(self.by_rank)

    def encode_ahead(self, chunks):
        for c in self.channels:
            c.encode_ahead(chunks)

    def send_chunk(self, rank, chunk):
        self.by_rank[rank].send_chunk(rank, chunk)

    def send_stop(self, rank, why="stop"):
        self.by_rank[rank].send_stop(rank, why)

    def forget(self, rank):
        self.by_rank[rank].forget(rank)

    def poll(self):
        return [m for c in self.channels for m in c.poll()]

    def take_reports(self):
        return [r for c in self.channels for r in c.take_reports()]

    def progress(self):
        for c in self.channels:
            c.progress()

    def wait(self):
        # with MPI ranks: its short sleep (the thread's messages wait for the next poll); else block on the thread
        if self.channels:
            self.channels[0].wait()

    def flush(self, seconds=10.0, firsts=False):
        for c in self.channels:
            c.flush(seconds, firsts)

    def join(self, timeout):
        for c in self.channels:
            if isinstance(c, ThreadChannel):
                c.join(timeout)

    def owns_process(self, rank):
        return self.by_rank[rank].owns_process(rank)

    def abort(self, code):
        next(c for c in self.channels if isinstance(c, MpiChannel)).abort(code)


# ---------------------------------------------------------------- worker side

class MpiMasterLink:
    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.status = MPI.Status()
        self.sending = []        # (request, buffer) of the results in flight (a merged batch's: all at once)
        self.reporting = []      # (request, buffer) of progress reports in flight

    def receive(self, block):
        """The next chunk, STOP, or None when nothing is waiting (only when not block)."""
        if block:   # idle: the last result goes out at once (a large send moves only inside MPI calls)
            self.finish()
        if not self._wait_for_message(block):
            return None
        if self.status.Get_tag() == TAG_WORK:
            buf = np.empty(self.status.Get_count(self.MPI.INT64_T), dtype=np.int64)
            self.comm.Recv(buf, source=0, tag=TAG_WORK)
            return decode_chunk(buf)
        self.peer_died = self.comm.recv(source=0, tag=self.status.Get_tag()) == STOP_AFTER_DEATH   # (ULFM)
        return STOP

    def _wait_for_message(self, block):
        backoff = Backoff()
        while not probe_twice(lambda: self.comm.Iprobe(source=0, tag=self.MPI.ANY_TAG, status=self.status)):
            if not block:
                return False
            backoff.sleep()
        return True

    def send_hello(self, info):
        self.comm.send(info, dest=0, tag=TAG_HELLO)

    def send_error(self, info):
        self.finish()
        self.comm.send(info, dest=0, tag=TAG_ERROR)

    def send_result(self, comp, compute_us):
        buf = encode_completions(comp, compute_us)
        self.sending.append((self.comm.Isend(buf, dest=0, tag=TAG_RESULT), buf))

    def send_progress(self, chunk_id, tokens):
        """Tokens of the chunk generated so far, to the master; never waits (none while MAX_REPORTS_IN_FLIGHT are)."""
        self.reporting = [x for x in self.reporting if not x[0].Test()]
        if len(self.reporting) >= MAX_REPORTS_IN_FLIGHT:
            return
        buf = np.array([chunk_id, tokens], dtype=np.int64)
        self.reporting.append((self.comm.Isend(buf, dest=0, tag=TAG_PROGRESS), buf))

    def in_flight(self):
        """Is a result send still in flight? Testing it moves it on (a large message goes out only while this
        rank calls into MPI: without this it waited for the next decode step: benchmarks/RESULTS.md)."""
        self.sending = [x for x in self.sending if not x[0].Test()]
        return bool(self.sending)

    def finish(self):
        for request, _ in self.sending:
            request.Wait()
        self.sending = []

    def wait_for_stop(self):
        """After reporting a failure: drop any queued work until the master says stop."""
        while self.receive(block=True) is not STOP:
            pass


class QueueMasterLink:
    """The worker end of a ThreadChannel."""

    def __init__(self, inbox, outbox):
        self.inbox, self.outbox = inbox, outbox

    def receive(self, block):
        try:
            return self.inbox.get(block)
        except queue.Empty:
            return None

    def send_hello(self, info):
        self.outbox.put(("hello", info))

    def send_error(self, info):
        self.outbox.put(("error", info))

    def send_result(self, comp, compute_us):
        self.outbox.put(("result", comp, compute_us, time.time()))

    def send_progress(self, chunk_id, tokens):
        self.outbox.put(("progress", chunk_id, tokens))

    def in_flight(self):
        return False

    def finish(self):
        pass

    def wait_for_stop(self):
        pass
