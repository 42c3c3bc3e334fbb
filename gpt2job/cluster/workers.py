"""What the master keeps of each worker (WorkerState: its chunks out, its counts, its summary line) and of each
chunk out (Outstanding). cluster/master.py changes them, cluster/scheduler.py and cluster/ending.py read them."""
from dataclasses import dataclass, field

from gpt2job.chunks import Chunk
from gpt2job.settings import DEFAULT_CHUNK


@dataclass
class Outstanding:
    chunk: Chunk
    sent_at: float
    new_tokens: int      # upper bound of tokens to generate (its rows' max_new_tokens summed; score: tokens scored)


@dataclass
class WorkerState:
    rank: int
    host: str = "?"
    ready: bool = False
    retired: bool = False
    why_retired: str = ""
    preferred_chunk: int = DEFAULT_CHUNK
    batch_rows: int = 0                            # rows it computes as one batch, its chunks merged (0: a chunk)
    outstanding: dict = field(default_factory=dict)   # chunk_id -> Outstanding
    last_heard: float = 0.0                        # its last hello, result or progress report (hung() counts from it)
    rows: int = 0
    tokens: int = 0                                # delivered: copies of deduplicated prompts included
    computed_tokens: int = 0                       # computed by this worker (its speed)
    chunks: int = 0
    compute_s: float = 0.0
    info: dict = field(default_factory=dict)      # the worker's hello: backend, device, timings
    error: dict = None                             # what it reported when it failed
    first_sent: float = None                       # when its first chunk went out (time.time())
    last_result: float = None                      # when its last result reached the master

    def busy_percent(self):
        """Its compute time (a GPU worker's: its chunks' GPU time, worker.device_us) as a share of its span from the
        first chunk sent to the last result received: what is missing was spent waiting for work or for its results
        to reach the master, or the GPU waiting for the host."""
        if self.first_sent is None or self.last_result is None or self.last_result <= self.first_sent:
            return None
        return round(min(100.0, 100.0 * self.compute_s / (self.last_result - self.first_sent)), 1)

    def seconds_per_token(self):
        return self.compute_s / self.computed_tokens if self.computed_tokens else None

    def summary(self):
        """Its line of the job summary's `workers`."""
        return {"rank": self.rank, "host": self.host, "rows": self.rows, "tokens": self.tokens, "chunks": self.chunks,
                "computed_tokens": self.computed_tokens,   # (tokens: with the copies of greedy dedup's prompts)
                "compute_s": round(self.compute_s, 3), "busy_percent": self.busy_percent(),
                "retired": self.why_retired or None, "ready": self.ready,
                **{k: self.info.get(k) for k in ("backend", "device", "gpu_index", "compute_capability", "dtype",
                                                 "ready_s", "init_s", "kernel_options", "batch_rows")
                   if k in self.info}}
