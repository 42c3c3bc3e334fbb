"""`python -m gpt2job ...` and the installed `gpt2job` command: the process's set-up, then gpt2job/cli.py."""
import os
import signal
import sys


def _limit_blas_threads():
    """Several ranks on one node must not each start one BLAS thread per core (before numpy loads)."""
    from gpt2job.cluster.devices import local_size
    n = local_size()
    if n > 1:
        per_rank = str(max(1, (os.cpu_count() or 1) // n))
        for t in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(t, per_rank)


def main():
    # SIGUSR1 reaches every rank of a job (mpirun, Slurm): the master acts on it once it is set up (cluster/job.py),
    # the others ignore it; its default action would end a rank that is still importing
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _limit_blas_threads()
    from gpt2job.cli import main as cli_main
    code = cli_main()
    # Python's exit then waits for the threads still ending; a second Ctrl-C there printed a traceback ("Exception
    # ignored in: <module 'threading'>"): end at once instead (completed rows are in the journal already)
    signal.signal(signal.SIGINT, lambda *_: os._exit(code or 130))
    sys.exit(code)


if __name__ == "__main__":
    main()
