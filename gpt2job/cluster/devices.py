"""What the MPI launcher told this process (started by one or not, its ranks), read from the environment before
MPI or CUDA is initialised; and which GPU a worker rank uses (node_worker_index: its index among its node's worker
ranks, found through MPI at start-up)."""
import os

# set by Open MPI, PMIx launchers, MPICH/Intel MPI (hydra) and Slurm's PMI: present -> started by an MPI launcher
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")
WORLD_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")

LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                   "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                   "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE")


def _first_int(names, default):
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return default


def started_by_mpi():
    return any(v in os.environ for v in MPI_ENV_VARS)


def world_rank():
    """This process's rank in the job, from the launcher's environment; None without a launcher."""
    return _first_int(WORLD_RANK_VARS, None)


def local_rank():
    """This process's rank among the ranks on its node (0 without a launcher)."""
    return _first_int(LOCAL_RANK_VARS, 0)


def local_size():
    return _first_int(LOCAL_SIZE_VARS, 1)


def node_worker_index(comm):
    """(index of this rank among the worker ranks on its node, worker ranks on the node); rank 0, the master, is
    not counted (its own worker may take a GPU after these: job.master_gpu_slot). Collective over comm: every rank
    calls it once at start-up."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks = node.allgather(comm.Get_rank())
    node.Free()
    workers = sorted(r for r in ranks if r != 0)
    me = comm.Get_rank()
    return (workers.index(me) if me != 0 else None), len(workers)
