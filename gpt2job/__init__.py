"""gpt2job: batch GPT-2 text generation over MPI, one worker per GPU (or CPU), HDF5 in and out."""
import time

__version__ = "0.2.0"
PROCESS_START = time.time()
