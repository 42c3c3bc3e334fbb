"""Ranks that died, under an MPI with fault tolerance (ULFM: Open MPI 5's `mpirun --with-ft ulfm`): which ranks MPI
says are dead (for the master's channel), and how the survivors end.

Under ULFM a killed rank is reported to the ranks that talk to it (MPI_ERR_PROC_FAILED); one that exits non-zero
without MPI_Finalize is not (Open MPI 5.0): to the master it is a rank that stopped answering. Without ULFM, Open MPI
ends the whole job when a rank dies; the rerun resumes."""
import os
import sys

FAILURE_CLASSES = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")   # ULFM's, where mpi4py has them


# The stop message after a rank died under ULFM: the ranks that survive end without MPI_Finalize, which Open MPI
# 5.0 sometimes never returns from once a rank is dead (it waits for the dead one; open-mpi/ompi#11404).
STOP_AFTER_DEATH = "stop: a rank died; end without MPI_Finalize"


def end_without_finalize(code):
    """Flush and leave the process at once: no MPI_Finalize (STOP_AFTER_DEATH), no atexit handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_failure(MPI, e):
    """Is the MPI.Exception e a process failure (a rank died, or a communicator was revoked after one)?"""
    return e.Get_error_class() in {getattr(MPI, n) for n in FAILURE_CLASSES if hasattr(MPI, n)}


def dead_ranks(MPI, comm, ranks):
    """-> (ranks of comm that MPI knows dead, whether ANY_SOURCE receives work again). With ULFM's calls (mpi4py >= 4:
    Comm.Get_failed, Comm.Ack_failed) the failures are acknowledged, exactly those listed (one after Get_failed is
    still reported later), and ANY_SOURCE works again; without them each of `ranks` is probed by name, which fails
    for a dead one, and ANY_SOURCE stays broken (the caller probes rank by rank from then on)."""
    if hasattr(comm, "Get_failed") and hasattr(comm, "Ack_failed"):
        group, world = comm.Get_failed(), comm.Get_group()
        try:
            n = group.Get_size()
            comm.Ack_failed(n)
            return (set(MPI.Group.Translate_ranks(group, list(range(n)), world)) if n else set()), True
        finally:
            world.Free()
            group.Free()
    dead = set()
    for r in ranks:
        try:
            comm.Iprobe(source=r, tag=MPI.ANY_TAG)
        except MPI.Exception as e:
            if not process_failure(MPI, e):
                raise
            dead.add(r)
    return dead, False
