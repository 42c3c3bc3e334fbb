"""Timing lines (GPT2JOB_TRACE=1: where the time between chunks goes) and the job's launch time."""
import functools
import sys
import time

from gpt2job import PROCESS_START, envs
from gpt2job.cluster.devices import world_rank
from gpt2job.errors import UserError, warn

try:
    TRACE = envs.get("GPT2JOB_TRACE")
except UserError:   # a bad value: cli.main's check of the environment says so (exit 2), not this import's traceback
    TRACE = False


def trace(msg):
    if TRACE:
        sys.stderr.write(f"gpt2job trace {time.time():.4f} {msg}\n")
        sys.stderr.flush()


LAUNCH_BEFORE_S = 7 * 86400   # a launch time further back than this before the process started is no launch time


@functools.cache
def launch_time():
    """When the job started: run_inference.sh exports GPT2JOB_LAUNCH_TIME; else this process's start. A value that
    cannot be this job's launch (after the process started, or days before: set by hand, or left from another job)
    is not used, and the master says so once (it made time to ready 1.8e9 s, or the wall time negative)."""
    t = envs.get("GPT2JOB_LAUNCH_TIME")
    if t and not PROCESS_START - LAUNCH_BEFORE_S <= t <= PROCESS_START + 60:   # (+60: clocks of other nodes)
        if world_rank() in (None, 0):
            warn(f"GPT2JOB_LAUNCH_TIME={t:g} is not this job's launch time (a Unix time "
                 "up to 7 days before it started): times count from each process's start")
        t = 0
    return t or PROCESS_START
