"""The cluster layer: who is master and who works (job.py), the master (master.py), its chunk queue (scheduler.py) and
how it lets every rank go (ending.py), what the master keeps of each worker and its chunks out (workers.py), the worker
loop (worker.py), the channel between them (channel.py), ranks that died under ULFM (ulfm.py), each rank's role and GPU
slot (devices.py), test fault plans (faults.py) and timing lines (trace.py)."""
