"""The job: rank 0 is the master (cluster/master.py: reads and validates the input, hands out chunks on
demand, writes results as they arrive); ranks 1..N-1 are workers (cluster/worker.py: one backend each).
With one rank the master computes too, in a thread of its own. They talk through cluster/channel.py.

A text or JSONL input (`run prompts.txt OUT`) is converted by the master alone, into OUT.prompts-HASH.h5 next to
the output (files/conversions.py convert_for_run), before anything else is made: the workers get token chunks over
MPI and never read the conversion, so it needs no shared folder beyond the output's own (a worker opens an HDF5 input
only to see whether it has per-row stop strings, files/row_stops.py may_have_stops)."""
import dataclasses
import os
import signal
import threading

from gpt2job import envs
from gpt2job.backends import gpu_count, pycuda_available
from gpt2job.cluster import faults
from gpt2job.cluster.devices import local_rank, node_worker_index, started_by_mpi, world_rank
from gpt2job.cluster.channel import MpiChannel, Mux
from gpt2job.cluster.ending import Ending
from gpt2job.cluster.master import run_master
from gpt2job.cluster.trace import launch_time
from gpt2job.cluster.worker import run_worker
from gpt2job.errors import UserError, say
from gpt2job.files.output import refuse_foreign
from gpt2job.files.outpaths import after_stop, aside_by_this_run, put_back_unstarted, replaced_note
from gpt2job.files.conversions import convert_for_run, is_text_input, tidy_conversions
from gpt2job.files.score_input import convert_pairs, jsonl_pairs
from gpt2job.settings import JobSettings


def mpi_comm():
    """COMM_WORLD when started by an MPI launcher, else None (a plain one-process run)."""
    if not started_by_mpi():
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


def master_gpu_slot(s: JobSettings, comm, n_node_workers):
    """Which GPU the master's own worker uses, or None when the master only serves.

    One process: it computes (slot = local rank). Under MPI: only with the cuda backend, and only when
    its node has more GPUs than worker ranks, so that with -np equal to the GPU count no GPU idles."""
    if comm is None:
        return local_rank()
    if s.backend in ("numpy", "synthetic") or not pycuda_available():
        return None
    return n_node_workers if gpu_count() > n_node_workers else None


def run_job(s: JobSettings):
    # SIGUSR1 reaches every rank (mpirun, Slurm): the master acts on it (stop_on_sigusr1) from before MPI's set-up,
    # which waits for every rank to start; the other ranks ignore it. So do they Ctrl-C (SIGINT: srun and MPICH's
    # launcher pass it to every rank): the master ends the job, and a worker gone first would leave it waiting
    stop, restore_usr1 = stop_on_sigusr1(act=world_rank() in (None, 0))
    if world_rank() not in (None, 0) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fault_plan = faults.parse_plan(envs.get("GPT2JOB_FAULT"))   # tests only; empty otherwise
        comm = mpi_comm()
        if comm is None or comm.Get_size() == 1:
            return master_with_input(s, None, master_gpu_slot(s, None, 0), fault_plan, stop)
        gpu_slot, n_node_workers = node_worker_index(comm)   # before any rank initialises CUDA
        if comm.Get_rank() == 0:
            return master_with_input(s, comm, master_gpu_slot(s, comm, n_node_workers), fault_plan, stop)
        return run_worker(s, comm, gpu_slot, fault_plan)
    finally:
        restore_usr1()


def master_with_input(s: JobSettings, comm, gpu_slot, fault_plan, stop=None):
    """The master, after converting a text or JSONL input. A refused input releases every worker rank (they are
    starting: each is told to stop) and leaves no file; a job that fails removes its conversion unless the output
    kept names it (conversions.tidy_conversions). SIGTERM meanwhile: say_on_sigterm; stop: stop_on_sigusr1's."""
    converted = created = None
    restore = say_on_sigterm(s.output, s.overwrite)
    ok = False
    try:
        try:
            if os.path.exists(s.output) and os.path.exists(s.input) and os.path.samefile(s.input, s.output):
                raise UserError("is both the input and the output", s.output, "output", "write to another file")
            if is_text_input(s.input):
                refuse_foreign(s.output, s.overwrite)   # (before a conversion that may take minutes)
                if s.score and jsonl_pairs(s.input):   # score: pairs of context and continuation
                    converted, created = convert_pairs(s.input, s.output, log=say)
                else:
                    converted, created = convert_for_run(s.input, s.output, log=say, vocab_dir=s.vocab_dir)
                s = dataclasses.replace(s, input=converted, converted_from=s.input)
        except BaseException as e:
            if comm is not None:   # the workers are starting: each is told to stop (no master is made)
                Ending(Mux([MpiChannel(comm)]), s.chunk_timeout, say).release_after_error(e, {})
            raise
        code = run_master(s, comm, gpu_slot, fault_plan, stop)
        ok = True
        return code
    finally:
        if converted:
            tidy_conversions(s.output, converted, created, ok)
        restore()


def say_on_sigterm(output, overwrite=False):
    """SIGTERM to the master (a batch system's time limit, mpirun passing it on, kill): one line (an --overwrite run
    stopped part-way: first a line naming the output it set aside), then the signal ends the process as it did
    before (what a kill leaves: the rows already written stay, the same command resumes). An --overwrite run that has
    no row of its own yet first puts back the output it set aside, as after Ctrl-C.
    Returns what puts the handler before back (from a thread other than the main one nothing is set: Python sets
    handlers from the main thread alone)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # (another SIGTERM meanwhile: not a second line)
        if overwrite:
            put_back_unstarted(output)   # (the lines below say what OUT holds then)
        try:
            if overwrite and aside_by_this_run(output):
                say(replaced_note(output))
            say(f"terminated (SIGTERM){after_stop(output, overwrite, launch_time())}")
        except OSError:   # stderr gone (a closed pipe): the signal still ends the process
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    before = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def stop_on_sigusr1(act=True):
    """SIGUSR1 to the master (a batch system's warning ahead of its time limit: Slurm's --signal=USR1@SECONDS; mpirun
    or run_inference.sh passing it on): no more chunks are handed out, the master waits for those out and keeps their
    rows, and the job ends (exit 5: errors.Stopped); the same command resumes. act False (another rank): ignored.
    Returns (the Event set then, what puts the handler before back: `python -m gpt2job` ignores SIGUSR1 from its first
    line; or, once one came, ignores it: the same request can come twice, from mpirun and from run_inference.sh). From
    a thread other than the main one nothing is set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop, lambda: None

    def on_usr1(signum, frame):
        if not stop.is_set():
            stop.set()
            try:   # (os.write: a handler may run inside the main thread's own write to stderr)
                os.write(2, b"gpt2job: SIGUSR1: no more chunks are handed out; the job stops once the chunks out are "
                            b"done, their rows kept\n")
            except OSError:
                pass
    before = signal.signal(signal.SIGUSR1, on_usr1 if act else signal.SIG_IGN)
    return stop, lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN if stop.is_set() else before or signal.SIG_DFL)
