"""How long a message waits for a polling receiver (gpt2job's ranks poll with Iprobe and sleep between polls):

  mpirun -np 2 python3 benchmarks/mpi_probe_latency.py [BYTES] [MOST_SLEEP_S] [--once]

Rank 0 sends BYTES (default 655,360: W1's chunk message) with Isend and spins on Test; rank 1 polls with Iprobe,
sleeping 0.1 ms, doubling to MOST_SLEEP_S (default 0.0005, the workers' Backoff; 0: spin) between polls, then
receives: the workers' own Backoff and probe_twice (gpt2job.cluster.channel: a poll probes again when the first
Iprobe finds nothing); --once probes once, as before session 47. Prints the medians over 30 messages of "probe"
(send started -> the probe saw it) and "recv" (-> the data received), in ms.
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2job.cluster.channel import Backoff, probe_twice  # noqa: E402


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip())
        return
    if MPI.COMM_WORLD.Get_size() != 2:
        sys.exit("run it with two ranks: mpirun -np 2 python3 benchmarks/mpi_probe_latency.py [BYTES] [MOST_SLEEP_S]")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 655360
    most = float(args[1]) if len(args) > 1 else 0.0005
    twice = "--once" not in sys.argv
    comm, st = MPI.COMM_WORLD, MPI.Status()
    rank, buf, res = comm.Get_rank(), np.ones(n // 8, np.int64), []
    for _ in range(30):
        comm.Barrier()
        if rank == 0:
            time.sleep(0.01)               # the receiver is asleep at its longest pause by now
            t0 = time.time()
            req = comm.Isend(buf, dest=1, tag=1)
            while not req.Test():
                pass
            comm.send(t0, dest=1, tag=2)
        else:
            backoff = Backoff(most)

            def probe():
                return comm.Iprobe(source=0, tag=1, status=st)
            while not (probe_twice(probe) if twice else probe()):
                if most:
                    backoff.sleep()
            tp = time.time()
            out = np.empty(st.Get_count(MPI.INT64_T), np.int64)
            comm.Recv(out, source=0, tag=1)
            t1 = time.time()
            t0 = comm.recv(source=0, tag=2)
            res.append(((tp - t0) * 1e3, (t1 - t0) * 1e3))
    if rank == 1:
        probe_ms, recv_ms = np.median(np.array(res), axis=0)
        print(f"{n} bytes, sleeps up to {most * 1e3:.1f} ms, {'two probes' if twice else 'one probe'} a poll: "
              f"probe {probe_ms:.3f} ms, recv {recv_ms:.3f} ms")


if __name__ == "__main__":
    main()
