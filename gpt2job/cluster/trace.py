"""Timing lines (GPT2JOB_TRACE=1: where the time between chunks goes) and the job's launch time."""
import sys
import time

from gpt2job import PROCESS_START, envs

TRACE = envs.get("GPT2JOB_TRACE")


def trace(msg):
    if TRACE:
        sys.stderr.write(f"gpt2job trace {time.time():.4f} {msg}\n")
        sys.stderr.flush()


def launch_time():
    """When the job started: run_inference.sh exports GPT2JOB_LAUNCH_TIME; else this process's start."""
    return envs.get("GPT2JOB_LAUNCH_TIME") or PROCESS_START
