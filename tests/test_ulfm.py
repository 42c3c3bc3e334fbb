"""A worker whose process dies under an MPI with fault tolerance (ULFM: Open MPI 5's `mpirun --with-ft ulfm`): MPI
raises MPI_ERR_PROC_FAILED on the master's calls that involve it (an ANY_SOURCE probe, a send), the master retires
that rank at once, its chunks go to the others, nothing more is sent to it, no MPI_Abort is needed for it, and the
job ends normally (exit 0, a clean run's output). Any other MPI error still ends the job as before.

The unit tests drive the master's MPI channel with a fake communicator (no MPI needed). The job test runs only where
mpirun has ULFM, found once per session: a 2-rank program whose rank 1 is killed must see MPI_ERR_PROC_FAILED on
rank 0 (an Open MPI without it ends the whole job instead; that path is the resume, tests/test_faults.py)."""
import functools
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, TINY_HF, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.chunks import Chunk
from gpt2job.cluster import channel as ch
from gpt2job.cluster.workers import Outstanding, WorkerState

PROC_FAILED, PENDING, REVOKED, OTHER = 75, 76, 77, 16


# ---------------------------------------------------------------- a fake mpi4py.MPI and communicator

class FakeMPIError(Exception):
    def __init__(self, cls):
        super().__init__(cls)
        self.cls = cls

    def Get_error_class(self):
        return self.cls

    def Get_error_string(self):
        return {PROC_FAILED: "MPI_ERR_PROC_FAILED: Process Failure", REVOKED: "MPI_ERR_REVOKED"}.get(self.cls, "other")


class FakeGroup:
    def __init__(self, ranks):
        self.ranks = list(ranks)

    def Get_size(self):
        return len(self.ranks)

    def Free(self):
        pass

    @staticmethod
    def Translate_ranks(group, indices, world):
        return [group.ranks[i] for i in indices]


class FakeStatus:
    source = tag = count = None

    def Get_source(self):
        return self.source

    def Get_tag(self):
        return self.tag

    def Get_count(self, datatype):
        return self.count


FAKE_MPI = SimpleNamespace(Exception=FakeMPIError, ERR_PROC_FAILED=PROC_FAILED, ERR_PROC_FAILED_PENDING=PENDING,
                           ERR_REVOKED=REVOKED, ANY_SOURCE=-1, ANY_TAG=-1, ERRORS_RETURN="return", INT64_T="int64",
                           Status=FakeStatus, Group=FakeGroup)


class FakeRequest:
    def __init__(self, comm, dest):
        self.comm, self.dest = comm, dest

    def Test(self):
        if self.dest in self.comm.dead:
            raise FakeMPIError(PROC_FAILED)
        return self.comm.deliver


class FakeComm:
    """MPI_COMM_WORLD as ULFM makes it: a dead rank makes ANY_SOURCE probes fail until it is acknowledged, and every
    named operation on it fail. Without the ULFM calls (ulfm=False) nothing can be acknowledged."""

    def __init__(self, size, ulfm=True):
        self.size, self.dead, self.acked, self.inbox, self.sent = size, [], 0, [], []
        self.deliver = True        # sends complete at their first Test
        self.fail_probe = None     # an error class every probe raises
        self.ack_calls = []
        if ulfm:
            self.Get_failed = lambda: FakeGroup(self.dead)
            self.Ack_failed = self._ack

    def _ack(self, n=None):
        self.ack_calls.append(n)
        self.acked = len(self.dead) if n is None else n
        return self.acked

    def Get_group(self):
        return FakeGroup(range(self.size))

    def Get_size(self):
        return self.size

    def Set_errhandler(self, handler):
        self.errhandler = handler

    def Iprobe(self, source, tag, status=None):
        if self.fail_probe is not None:
            raise FakeMPIError(self.fail_probe)
        if source == FAKE_MPI.ANY_SOURCE and len(self.dead) > self.acked:
            raise FakeMPIError(PROC_FAILED)
        if source in self.dead:
            raise FakeMPIError(PROC_FAILED)
        waiting = [m for m in self.inbox if source in (FAKE_MPI.ANY_SOURCE, m[0])]
        if waiting and status is not None:
            status.source, status.tag, status.count = waiting[0][0], waiting[0][1], 0
        return bool(waiting)

    def recv(self, source, tag):
        m = next(m for m in self.inbox if m[0] == source and m[1] == tag)
        self.inbox.remove(m)
        return m[2]

    def _isend(self, dest, tag):
        if dest in self.dead:
            raise FakeMPIError(PROC_FAILED)
        self.sent.append((dest, tag))
        return FakeRequest(self, dest)

    def Isend(self, buf, dest, tag):
        return self._isend(dest, tag)

    def isend(self, obj, dest, tag):
        return self._isend(dest, tag)


@pytest.fixture
def channel(monkeypatch):
    """MpiChannel(comm) over the fake MPI (MpiChannel imports mpi4py.MPI itself)."""
    monkeypatch.setitem(sys.modules, "mpi4py", SimpleNamespace(MPI=FAKE_MPI))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", FAKE_MPI)
    return ch.MpiChannel


def hello(rank):
    return (rank, ch.TAG_HELLO, {"host": f"h{rank}"})


def chunk(i):
    return Chunk(i, np.array([i], np.int64), np.array([0, 2], np.int64), np.array([5, 6], np.int32))


# ---------------------------------------------------------------- the channel

def test_a_dead_rank_is_reported_once_and_the_others_are_still_heard(channel):
    comm = FakeComm(4)
    c = channel(comm)
    assert comm.errhandler == "return"
    comm.inbox += [hello(1), hello(3)]
    comm.dead.append(2)
    msgs = c.poll()
    assert sorted(m[:2] for m in msgs) == [(1, "hello"), (2, "failed"), (3, "hello")]
    why = next(m[2] for m in msgs if m[1] == "failed")
    assert "died" in why and "MPI_ERR_PROC_FAILED" in why
    assert comm.ack_calls == [1]             # exactly the failures listed, no more
    assert c.poll() == [] and c.failed == {2}
    comm.inbox.append(hello(3))              # ANY_SOURCE works again once acknowledged
    assert [m[:2] for m in c.poll()] == [(3, "hello")]


def test_a_send_to_a_rank_that_died_is_dropped_and_none_is_made_after(channel):
    comm = FakeComm(4)
    c = channel(comm)
    comm.deliver = False
    c.send_chunk(3, chunk(1))
    c.send_stop(1)
    comm.dead.append(3)
    c.progress()                             # the send's Test raises: dropped, never waited for again
    assert [s[2] for s in c.sends] == [1] and [s[2] for s in c.abandoned] == [3]
    assert [m[:2] for m in c.poll()] == [(3, "failed")]
    c.send_chunk(3, chunk(2))
    c.send_stop(3)
    assert comm.sent == [(3, ch.TAG_WORK), (1, ch.TAG_STOP)]
    comm.dead.append(1)
    c.send_chunk(1, chunk(3))                # a send that fails at once: told at the next poll
    assert [m[:2] for m in c.poll()] == [(1, "failed")]
    c.flush(seconds=0.5)
    assert c.sends == []


def test_other_mpi_errors_still_end_the_job(channel):
    comm = FakeComm(3)
    c = channel(comm)
    comm.fail_probe = OTHER
    with pytest.raises(FakeMPIError):
        c.poll()
    comm.fail_probe = REVOKED                # a process-failure class that names no dead rank: nothing to retire
    with pytest.raises(FakeMPIError):
        c.poll()


def test_without_the_ulfm_calls_each_rank_is_probed_by_name(channel):
    comm = FakeComm(4, ulfm=False)           # mpi4py < 4: failures cannot be acknowledged
    c = channel(comm)
    comm.inbox += [hello(1)]
    comm.dead.append(2)
    assert sorted(m[:2] for m in c.poll()) == [(1, "hello"), (2, "failed")]
    assert not c.any_source
    comm.inbox += [hello(3), hello(1)]
    assert sorted(m[:2] for m in c.poll()) == [(1, "hello"), (3, "hello")]


def test_the_failure_classes_are_mpi4py_s(tmp_path):
    """The names looked up exist in this mpi4py (a subprocess: importing mpi4py.MPI initialises MPI)."""
    pytest.importorskip("mpi4py")
    code = ("from mpi4py import MPI\nfrom gpt2job.cluster.ulfm import FAILURE_CLASSES, process_failure\n"
            "assert all(hasattr(MPI, n) for n in FAILURE_CLASSES), [n for n in FAILURE_CLASSES if not hasattr(MPI, n)]\n"
            "assert process_failure(MPI, MPI.Exception(MPI.ERR_PROC_FAILED))\n"
            "assert not process_failure(MPI, MPI.Exception(MPI.ERR_OTHER))\nprint('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    if "AssertionError" in p.stderr and "ERR_PROC" in p.stderr:
        pytest.skip(f"this mpi4py has no ULFM error classes: {p.stderr.strip().splitlines()[-1]}")
    assert p.stdout.strip() == "ok", p.stderr


# ---------------------------------------------------------------- the master

def test_the_master_retires_a_dead_rank_gives_its_chunks_back_and_stops_only_the_others(channel, monkeypatch):
    from gpt2job.cluster.ending import Ending
    from gpt2job.cluster.master import Master
    comm = FakeComm(4)
    m = Master.__new__(Master)               # only the state the failure path touches
    m.s = SimpleNamespace(chunk_timeout=1.0)
    m.channel = ch.Mux([channel(comm)])
    m.workers = {r: WorkerState(rank=r, ready=True) for r in (1, 2, 3)}
    given_back, logs = [], []
    m.sched = SimpleNamespace(give_back=given_back.append)
    m.progress = SimpleNamespace(drop=lambda chunk_id: None)
    monkeypatch.setattr("gpt2job.cluster.master.say", logs.append)
    m.ending, m.dispatching = Ending(m.channel, 1.0, logs.append), False
    m.ending.hung = [2]                      # first thought hung, then dead
    m.workers[2].outstanding = {7: Outstanding(chunk(7), 0.0, 6)}
    comm.dead.append(2)
    for rank, kind, *data in m.channel.poll():
        m.handle(m.workers[rank], kind, *data)
    w = m.workers[2]
    assert w.retired and "died" in w.why_retired and w.outstanding == {}
    assert [c.chunk_id for c in given_back] == [7]
    assert m.ending.hung_processes() == [] and any("rank 2" in x for x in logs)
    m.ending.shutdown(m.workers)
    assert sorted(d for d, tag in comm.sent if tag == ch.TAG_STOP) == [1, 3]


# ---------------------------------------------------------------- a real job under mpirun --with-ft ulfm

PROBE = """
import os, signal, sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
c.Barrier()
if c.Get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
t = time.monotonic()
while time.monotonic() - t < 20:
    try:
        c.Iprobe(source=MPI.ANY_SOURCE)
    except MPI.Exception as e:
        print("ULFM" if e.Get_error_class() == MPI.ERR_PROC_FAILED else e, flush=True)
        os._exit(0)
    time.sleep(0.01)
print("no failure reported", flush=True)
"""


def run_killable(cmd, env, timeout):
    """(returncode or None when it ran past timeout and was killed, stdout, stderr)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, cwd=str(ROOT))
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err


@functools.lru_cache(maxsize=None)
def ulfm_available():
    import shutil
    if not shutil.which("mpirun"):
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    _, out, _ = run_killable(["mpirun", "--with-ft", "ulfm", "-np", "2", "--oversubscribe", sys.executable, "-c",
                              PROBE], job_env(), 60)
    return "ULFM" in out


N = 30


def job_args(inp, out, *extra):
    return ["run", inp, out, "--model", TINY_HF, "--max-new-tokens", 6, "--chunk-size", 2, "--backend", "numpy",
            *extra]


def test_with_ulfm_a_killed_worker_is_retired_and_the_job_ends_normally(tmp_path):
    if not ulfm_available():
        pytest.skip("this mpirun has no ULFM (mpirun --with-ft ulfm does not report a killed rank)")
    rng = np.random.default_rng(1)
    inp = tmp_path / "in.h5"
    write_token_input(inp, [rng.integers(0, 1000, rng.integers(1, 9)) for _ in range(N)])
    run_gpt2job(job_args(inp, tmp_path / "clean.h5"), check=0)
    clean = [t.tolist() for t in read_output(tmp_path / "clean.h5")["tokens"]]
    out = tmp_path / "out.h5"
    cmd = ["mpirun", "--with-ft", "ulfm", "-np", "4", "--oversubscribe", sys.executable, "-m", "gpt2job",
           *map(str, job_args(inp, out))]
    for attempt in range(2):   # Open MPI itself failing to start (conftest.run_gpt2job): once more
        rc, stdout, stderr = run_killable(cmd, job_env(GPT2JOB_FAULT="2:2:kill"), 60)
        if "PMIx server's listener thread failed to start" not in stderr:
            break
    log = stdout + stderr
    assert "worker rank 2 on" in stderr and "its process died" in stderr and "MPI_ERR_PROC_FAILED" in stderr, log
    assert "has not answered in time" not in stderr and "MPI_Abort" not in log, log   # found at once, not hung
    res = read_output(out)
    assert res["attrs"]["finished"] == 1
    assert [t.tolist() for t in res["tokens"]] == clean
    workers = {w["rank"]: w for w in json.loads(res["attrs"]["summary"])["workers"]}
    assert "died" in workers[2]["retired"] and workers[1]["retired"] is None and workers[3]["retired"] is None
    assert sum(w["rows"] for w in workers.values()) == N
    # after a death every rank ends without MPI_Finalize (ulfm.STOP_AFTER_DEATH): Open MPI 5.0 now and then
    # waited in it for ever for the dead rank (rc None here: killed at the deadline), 1 to 4 jobs in 8
    assert rc == 0, log


def test_flushing_the_first_chunks_waits_for_each_worker_s_first_send_only(channel):
    """At the start the master moves each worker's first chunk on at once (their GPUs wait for them); the window's
    other chunks, which a worker holding a full batch takes only at its batch's first pause, are not waited for."""
    import time
    comm = FakeComm(3)
    c = channel(comm)
    comm.deliver = False
    for rank, i in ((1, 1), (2, 2), (1, 3), (2, 4)):
        c.send_chunk(rank, chunk(i))
    assert [(s[2], s[3]) for s in c.sends] == [(1, True), (2, True), (1, False), (2, False)]
    for s in c.sends[:2]:
        s[0].Test = lambda: True            # the workers took their first chunks
    t = time.monotonic()
    c.flush(5.0, firsts=True)
    assert time.monotonic() - t < 1.0
    assert [(s[2], s[3]) for s in c.sends] == [(1, False), (2, False)]
    c.send_chunk(1, chunk(5))               # a later chunk to a worker fed before is no first one
    assert c.sends[-1][3] is False


def test_flushing_the_first_chunks_polls_them_without_sleeping(channel, monkeypatch):
    """A large send moves only while the master calls into MPI: the flush of the first chunks polls back to back for
    its first 20 ms (a sleep(0) between polls took ~0.5 ms on the GPU machine: W1's first chunk arrived in 1-3 ms
    instead of ~0.4), then once a millisecond."""
    import time
    comm = FakeComm(2)
    c = channel(comm)
    comm.deliver = False
    c.send_chunk(1, chunk(1))
    polls = []
    c.sends[0][0].Test = lambda: polls.append(1) or len(polls) >= 50   # taken at the 50th poll
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    c.flush(5.0, firsts=True)
    assert len(polls) == 50 and sleeps == [] and c.sends == []
