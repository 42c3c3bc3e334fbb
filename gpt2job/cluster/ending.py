"""How a job's master lets its worker ranks go, whatever the job ended in: every rank is told to stop, results still
on their way are received, hung ranks are ended with MPI_Abort, ranks MPI says are dead (ULFM) are left alone, and a
job with no worker left says why. The master owns one Ending (Master.ending) and tells it what it hears from each
rank; a job that fails before it has a master (a refused text input, job.py) makes one of its own."""
import signal
import sys
import threading
import time

from gpt2job.cluster.ulfm import STOP_AFTER_DEATH, end_without_finalize
from gpt2job.errors import Reported, Stopped, UserError, WorkerFailure, exit_code, rerun, say


SAY_WAIT_S = 5.0      # the wait for ranks still starting says so once it has lasted this long (a job with nothing
                      # left ends while its workers still load the model: they stop once ready, a second or two)
QUIET_WAIT_S = 20.0   # ... and this long after a failed job's error line


class Ending:
    def __init__(self, channel, chunk_timeout, log):
        self.channel, self.chunk_timeout, self.log = channel, chunk_timeout, log
        self.startup_timeout = 5 * chunk_timeout   # a rank's start-up (loading weights, compiling kernels) deadline
        self.hung = []             # ranks counted hung: MPI_Abort ends them unless they are heard from again
        self.stopped = set()       # ranks told to stop (each is told once)
        self.heard = set()         # ranks that said they are ready, failed or died: none of them is still starting
        self.peer_died = False     # a rank died (ULFM): every rank ends without MPI_Finalize (ulfm.py)
        self.run_started = None    # start_clock: start-up deadlines count from here (none: from the job's end)
        self.held = []             # lines of start-up failures not said yet (worker_failed)

    # ---- what the master hears while the job runs
    def start_clock(self):
        """The master's loop starts: every rank's start-up deadline counts from now."""
        self.run_started = time.monotonic()

    def late_to_start(self, now):
        """Is it past the ranks' start-up deadline?"""
        return now - self.run_started > self.startup_timeout

    def heard_from(self, rank):
        """The rank said it is ready, or that it failed: it is not starting any more."""
        self.heard.add(rank)

    def count_hung(self, rank):
        """The master gave up on the rank (a deadline passed): MPI_Abort ends it unless it is heard from again."""
        self.hung.append(rank)

    def stop(self, rank):
        if rank not in self.stopped:
            self.stopped.add(rank)
            self.channel.send_stop(rank, STOP_AFTER_DEATH if self.peer_died else "stop")

    def let_go(self, rank):
        """Tell a rank that said it is ready or failed to stop: it waits for that. One counted hung (or left behind at
        start-up) that is heard from after all is then no longer aborted at the end."""
        if rank in self.hung:
            self.hung.remove(rank)
        self.stop(rank)

    def died(self, rank):
        """MPI says the rank's process died (ULFM): nothing is sent to it, not even stop, and no MPI_Abort is needed
        for it at the end (even if it was first thought hung); the survivors end without MPI_Finalize."""
        if rank in self.hung:
            self.hung.remove(rank)
        self.stopped.add(rank)
        self.heard.add(rank)
        self.peer_died = True

    def worker_failed(self, w, where, info, any_ready):
        """A worker's error report: a line (and its traceback, unless a user mistake). A user mistake at start-up is
        held while no worker is ready (any_ready): where every worker fails alike, the job's own error line says it
        once (no_workers_left); once one is ready, or the job ends otherwise, the held lines are said."""
        line = f"worker rank {w.rank} on {w.host} failed during {where}: {info['error']}"
        if info.get("user_error") and where == "start-up" and not any_ready:
            self.held.append(line)
            return
        self.say_held()
        self.log(line)
        if not info.get("user_error"):
            self.log("  " + info.get("traceback", "").strip().replace("\n", "\n  "))

    def say_held(self):
        for line in self.held:
            self.log(line)
        self.held = []

    def no_workers_left(self, workers, kept, n_rows, output, overwrite):
        """The job's error once every worker is retired. kept: the rows kept in output (None: no row was completed,
        and the output is removed); overwrite: the run's --overwrite (what to rerun)."""
        errors = [w.error for w in workers]
        messages = {e["error"] for e in errors if e}
        if all(e and e.get("user_error") and e.get("chunk") is None for e in errors) and len(messages) == 1:
            self.held = []
            return UserError(messages.pop())   # the same mistake everywhere (a bad model file, too few GPUs)
        self.say_held()
        reasons = "; ".join(f"rank {w.rank} on {w.host}: {w.why_retired}" for w in workers)
        msg = f"no worker is left ({reasons}); " + (f"{kept} of {n_rows} rows are complete and kept in {output}"
                                                    if kept is not None else "no row was completed")
        again = rerun(overwrite, resume=kept is not None)
        if all(w.error and w.error.get("user_error") for w in workers):
            return UserError(msg, fix=f"fix the cause above, then {again}")
        return WorkerFailure(f"{msg}; {again}")

    @staticmethod
    def stopped_early(store, output, overwrite):
        """The job's end once the chunks out were done after SIGUSR1 (job.stop_on_sigusr1), with rows left. store: the
        master's OutputStore (nothing completed: the output is removed, as for no_workers_left)."""
        if not store.completed:
            return Stopped("stopped (SIGUSR1) before any row was completed: run the same command again")
        return Stopped(f"stopped (SIGUSR1) once the chunks handed out were done: {int(store.done.sum()):,} of "
                       f"{len(store.done):,} rows are complete and kept in {output}; {rerun(overwrite)}")

    # ---- the end
    def shutdown(self, workers, wait_local=True):
        """Tell every rank to stop, whatever the job ended in: also ranks the master never heard from (a job
        with nothing left to compute never starts its loop, a failed start never learns its workers), else they
        would wait for ever and keep mpirun alive. Hung ranks are ended by abort_hung instead. workers: the master's
        {rank: WorkerState}, read for the chunks still out (not changed)."""
        for r in self.channel.ranks:
            if r not in self.hung:
                self.stop(r)
        # a job ended by an error (a full disk) has results on their way: an MPI worker waits until its result is
        # received, and MPI cannot finish while it does, so they are received (and dropped: the resume computes
        # them) until every live worker has answered for its chunks or chunk_timeout has passed
        out = {r: set(w.outstanding) for r, w in workers.items() if w.outstanding and self.channel.owns_process(r)}
        deadline = time.monotonic() + self.chunk_timeout
        while self._still_computing(out) and time.monotonic() < deadline:
            for rank, kind, *data in self.channel.poll():
                if rank in out:   # a result answers for its chunk; an error or a death for all of the rank's
                    out[rank].discard(data[0].chunk_id) if kind == "result" else out[rank].clear()
                if kind == "failed":
                    self.died(rank)
            self.channel.wait()
        for r in self._still_computing(out):   # MPI_Finalize would wait for their results' sends for ever
            self.log(f"worker rank {r} on {workers[r].host} still computes {len(out[r])} chunk(s) past the job's end")
            self.hung.append(r)
        self.channel.flush()
        if wait_local and 0 not in self.hung:
            self.channel.join(timeout=30)   # the master's own worker: lets its backend free the GPU

    def release_after_error(self, e, workers):
        """The job failed with e, which the caller raises once this returns: shutdown, and where the ranks would keep
        mpirun waiting for ever (hung ones; after a death, in MPI_Finalize; one that hangs in its start-up) say what
        happened first, wait for the ranks still starting (not after Ctrl-C), then end: MPI_Abort for hung ranks,
        without MPI_Finalize after a death, else raise Reported (the error is printed)."""
        self.say_held()
        self.shutdown(workers, wait_local=False)
        waiting = bool(self.starting()) and not isinstance(e, KeyboardInterrupt)
        if not (self.hung_processes() or self.peer_died or waiting):
            return
        if isinstance(e, (UserError, WorkerFailure, Stopped)):
            say(f"{'' if isinstance(e, Stopped) else 'error: '}{e}")
        else:
            import traceback
            traceback.print_exc()
        sys.stderr.flush()
        raise Reported(self.end(exit_code(e), wait=waiting, quiet=True)) from e

    def end(self, code, wait=True, quiet=False):
        """The last of a job's end, once shutdown told every rank to stop: wait for the ranks still starting
        (wait_for_starting), end the hung ones with MPI_Abort(code), and after a death end without MPI_Finalize.
        Returns the exit code when the process may go on to exit: code, or 130 when Ctrl-C cut the wait."""
        if wait and isinstance(self.wait_for_starting(quiet=quiet), KeyboardInterrupt):
            code = 130
        if self.hung_processes():
            self.abort_hung(code)
        if self.peer_died:
            end_without_finalize(code)
        return code

    def hung_processes(self):
        """Hung worker ranks that are processes of their own (a hung thread of the master ends with it)."""
        return [r for r in self.hung if self.channel.owns_process(r)]

    def abort_hung(self, code):
        self.log(f"rank(s) {self.hung_processes()} still hang; ending the job with MPI_Abort({code})")
        sys.stdout.flush()
        sys.stderr.flush()
        self.channel.abort(code)

    def _still_computing(self, out):
        """The ranks with chunks still out (out: {rank: chunk ids}), hung ones aside."""
        return sorted(r for r, ids in out.items() if ids and r not in self.hung)

    def starting(self):
        """Ranks of their own process the master has not heard from (no hello, error or death) and not hung."""
        return [r for r in self.channel.ranks if self.channel.owns_process(r) and r not in self.heard
                and r not in self.hung]

    def wait_for_starting(self, quiet=False):
        """After shutdown, at a job's end: a rank still starting reads its stop once it is ready; one that hangs at
        start-up never does, and mpirun would wait for it for ever. So wait for them until the start-up deadline
        (startup_timeout from the run's start, as Master.check_hung; from now when the job had nothing to run),
        then count the silent ones hung (abort_hung ends them). The wait costs no wall time: mpirun ends only once
        every rank has. A line for the wait once it has lasted SAY_WAIT_S; quiet (after the job's own error line): no
        line for ranks whose start-up failed, and the line for the wait only once it has lasted QUIET_WAIT_S.
        Interrupted (Ctrl-C, an MPI error), the silent ones count hung at once; returns that exception (None when not
        interrupted)."""
        now = time.monotonic()
        deadline, said = (self.run_started if self.run_started is not None else now) + self.startup_timeout, None
        try:
            while self.starting() and time.monotonic() < deadline:
                if said is None and time.monotonic() - now > (QUIET_WAIT_S if quiet else SAY_WAIT_S):
                    said = self.starting()
                    self.log(f"rank(s) {said} still starting: waiting for them to stop (at most "
                             f"{deadline - time.monotonic():.0f} s more, their start-up deadline)")
                for rank, kind, *data in self.channel.poll():
                    if kind not in ("hello", "error", "failed"):
                        continue       # results, reports: only hung ranks still send them; dropped
                    if kind == "failed":
                        self.died(rank)
                        continue
                    self.heard_from(rank)
                    if kind == "error" and not quiet:
                        self.log(f"worker rank {rank} failed during start-up: {data[0].get('error')}")
                    if rank in self.hung:   # ready or failed after its deadline: it waits for its stop
                        self.let_go(rank)
                self.channel.wait()
        except BaseException as e:   # the job is over: end them rather than wait
            for r in self.starting():
                self.log(f"worker rank {r} still starting when the wait was interrupted ({type(e).__name__}); "
                         "ending it")
                self.hung.append(r)
            return e
        for r in self.starting():
            self.log(f"worker rank {r} did not become ready within {self.startup_timeout:.0f} s; ending it")
            self.hung.append(r)
        return None


class CtrlC:
    """Ctrl-C (SIGINT) in the master's loop, raised between two of its turns (check()): raised anywhere, it could drop
    a result just taken off the channel and not yet handled, and shutdown then waited chunk_timeout for it (a test
    hung about 1 run in 20 on a loaded machine). A second Ctrl-C raises at once (a loop that is stuck). Only in the main
    thread, and only where SIGINT has Python's own handler (an ignored one stays ignored)."""

    def __init__(self):
        self.asked, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def check(self):
        if self.asked:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
