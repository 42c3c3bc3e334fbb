"""`python -m gpt2job ...`: see gpt2job/cli.py."""
import os
import sys


def _limit_blas_threads():
    """Several ranks on one node must not each start one BLAS thread per core (before numpy loads)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        n = os.environ.get(var, "")
        if n.isdigit() and int(n) > 1:
            per_rank = str(max(1, (os.cpu_count() or 1) // int(n)))
            for t in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(t, per_rank)
            return


_limit_blas_threads()

from .cli import main  # noqa: E402

sys.exit(main())
