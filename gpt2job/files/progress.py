"""What the user sees of a running job: progress (a bar on a terminal, periodic lines in a log) and the summary."""
import resource
import sys
import time

from gpt2job.errors import plural


def peak_rss_mb():
    """This process's peak resident memory in MB: VmHWM (getrusage's maxrss of a process started by another one
    counts that one's memory at the fork), else getrusage."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024)
    except (OSError, StopIteration, ValueError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def fmt_duration(s):
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """The job's progress in prompts and generated tokens, as it happens. Completed chunks count once durable
    (update); a chunk still computing counts with the tokens its worker reported so far (report: every ~0.5 s per
    worker), replaced by its real count when its result counts (update with its chunk id) and dropped when the chunk
    goes to another worker (drop). The percentage is the share of the work done: rows done, plus a running chunk's
    rows in proportion to its tokens so far over its most tokens; it reaches 100% only with every row done.
    Lines are printed at most every `interval` seconds (0.2 s on a terminal, as a bar); close() prints the last one,
    always."""

    def __init__(self, total, already=0, interval=10.0, stream=None, verb="generated"):
        self.total = total
        self.verb = verb           # "scored" for `score` (its tokens are the input's)
        self.done = already
        self.already = already
        self.tokens = 0            # tokens of the results counted
        self.running = {}          # chunk id -> (tokens so far, its rows, its most tokens): chunks still computing
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = None          # (done, generated) of the last line printed

    def begin(self):
        """Work is handed out: the rates and the ETA count from now, not from the job's start-up."""
        self.start = time.monotonic()

    @property
    def generated(self):
        """Tokens generated so far: the results counted and the reports of the chunks still computing."""
        return self.tokens + sum(t for t, _, _ in self.running.values())

    def fraction(self):
        if not self.total:
            return 1.0
        partial = sum(rows * min(t, most) / most for t, rows, most in self.running.values() if most > 0)
        f = (self.done + partial) / self.total
        return min(f, 0.999) if self.done < self.total else 1.0

    def report(self, chunk_id, tokens, rows, most):
        """A worker's report from within a chunk: `tokens` of its `rows` prompts reached the host (at most
        `most`). A later report of the chunk replaces an earlier one."""
        if tokens >= 0:
            self.running[chunk_id] = (int(tokens), int(rows), int(most))
            self.tick()

    def drop(self, chunk_id):
        """The chunk left its worker (retired): what it reported does not count."""
        self.running.pop(chunk_id, None)

    def update(self, rows, tokens, chunk_id=None):
        """A result counts (durable): its new rows and tokens, in place of the chunk's reports."""
        self.running.pop(chunk_id, None)
        self.done += rows
        self.tokens += tokens
        self.tick()

    def tick(self):
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.show(now)

    def line(self, now=None):
        now = time.monotonic() if now is None else now
        el = max(now - self.start, 1e-9)
        generated = self.generated
        f = self.fraction()
        gained = f - (self.already / self.total if self.total else 0.0)
        eta = el * (1.0 - f) / gained if gained > 0 else None
        pct = 100.0 * f
        return pct, (f"{self.done}/{self.total} prompts ({pct:.1f}%), {plural(generated, 'token')} {self.verb}, "
                     f"{generated / el:,.0f} tokens/s, elapsed {fmt_duration(el)}, ETA {fmt_duration(eta)}")

    def show(self, now=None):
        pct, text = self.line(now)
        self.shown = (self.done, self.generated)
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
        else:
            self.stream.write(f"progress: {text}\n")
        self.stream.flush()

    def close(self):
        """The last line, always (a log ends with the final count, 100% when the job finished), unless the line
        just printed says the same."""
        self.running.clear()
        if self.shown != (self.done, self.generated):
            self.show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def print_summary(sm, out=None, verb="generated", finished_s=None, stopped=False):
    """The summary's lines. finished_s: launch to the output finished (its last rows written after the summary,
    whose wall_s is taken before; said where it is later by a second or more). stopped: a job stopped early
    (SIGUSR1), whose own line says which rows are kept: the throughput and each worker's line only."""
    out = out or sys.stdout
    tput = sm["throughput_tokens_per_s"]
    dup = sm.get("duplicate_prompts")   # (rows whose prompt another row has: --num-samples' greedy samples too)
    dup = f", {plural(dup, 'row')} copied from an identical prompt's" if dup else ""
    if not stopped:
        out.write(f"gpt2job: done. {plural(sm['rows_total'], 'row')} ({sm['rows_resumed']:,} resumed, "
                  f"{sm['rows_invalid']:,} invalid{dup}), {plural(sm['generated_tokens'], 'token')} {verb}\n")
    ready = sm["time_to_ready_s"]
    ready = f"time to ready {ready:.2f} s (all ranks)" if ready is not None else "not every rank became ready"
    wall = f"wall {sm['wall_s']:.2f} s" + (f" (output finished at {finished_s:.2f} s)" if finished_s is not None
                                           and finished_s >= sm["wall_s"] + 1 else "")
    computed = sum(w.get("computed_tokens", 0) for w in sm["workers"])
    copies = f" ({computed / sm['generation_s']:,.0f} computed, copies aside)" \
        if tput and sm.get("duplicate_prompts") and sm["generation_s"] > 0 else ""   # copies count as generated
    out.write(f"gpt2job: throughput {tput:,.0f} {verb} tokens/s{copies}; first chunk out -> last result "
              f"{sm['generation_s']:.2f} s; {ready}; {wall}\n" if tput else
              f"gpt2job: nothing new to {'score' if verb == 'scored' else 'generate'}; {wall}\n")
    for w in sm["workers"]:
        extra = f", retired: {w['retired']}" if w.get("retired") else \
            ", not ready when the job ended" if w.get("ready") is False else ""
        busy = f" ({w['busy_percent']:.0f}% busy)" if w.get("busy_percent") is not None else ""
        out.write(f"gpt2job:   rank {w['rank']} on {w['host']} ({w.get('backend', '?')}, {w.get('device', '?')}): "
                  f"{plural(w['rows'], 'row')}, {plural(w['tokens'], 'token')}, {plural(w['chunks'], 'chunk')}, "
                  f"{w['compute_s']:.2f} s computing"
                  f"{busy}{extra}\n")
    out.flush()
