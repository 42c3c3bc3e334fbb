"""MPI message tags between the master and its workers. Token data travels as int64 buffers
(gpt2job.chunks encodes them); only small metadata (hello, errors, stop) is pickled."""

TAG_WORK = 1      # master -> worker: int64 chunk buffer
TAG_STOP = 2      # master -> worker: pickled reason string
TAG_HELLO = 3     # worker -> master: pickled dict (host, backend, time to ready, preferred chunk size)
TAG_RESULT = 4    # worker -> master: int64 completions buffer
TAG_ERROR = 5     # worker -> master: pickled dict (rank, host, chunk, error, traceback)
