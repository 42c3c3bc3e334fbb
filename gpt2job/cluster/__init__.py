"""The cluster layer: who is master and who works (job.py), the master (master.py) and its chunk queue
(scheduler.py), the worker loop (worker.py), the channel between them (channel.py), test fault plans (faults.py)
and timing lines (trace.py)."""
