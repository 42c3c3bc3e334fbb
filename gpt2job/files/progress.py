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
    def __init__(self, total, already=0, interval=10.0, stream=None):
        self.total = total
        self.done = already
        self.already = already
        self.tokens = 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, rows, tokens):
        self.done += rows
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.show(now)

    def show(self, now=None):
        now = time.monotonic() if now is None else now
        el = max(now - self.start, 1e-9)
        rate = self.tokens / el
        rows_rate = (self.done - self.already) / el
        eta = (self.total - self.done) / rows_rate if rows_rate > 0 else None
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (f"{self.done}/{self.total} prompts ({pct:.1f}%), {rate:,.0f} tokens/s, "
                f"elapsed {fmt_duration(el)}, ETA {fmt_duration(eta)}")
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
        else:
            self.stream.write(f"progress: {text}\n")
        self.stream.flush()

    def close(self):
        """The last line, always (a log ends with the final count, 100% when the job finished)."""
        self.show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def print_summary(sm, out=None):
    out = out or sys.stdout
    tput = sm["throughput_tokens_per_s"]
    dup = sm.get("duplicate_prompts")
    dup = f", {plural(dup, 'duplicate prompt')} computed once" if dup else ""
    out.write(f"gpt2job: done. {plural(sm['rows_total'], 'row')} ({sm['rows_resumed']} resumed, {sm['rows_invalid']} "
              f"invalid{dup}), {plural(sm['generated_tokens'], 'token')} generated\n")
    ready = sm["time_to_ready_s"]
    ready = f"time to ready {ready:.2f} s (all ranks)" if ready is not None else "not every rank became ready"
    out.write(f"gpt2job: throughput {tput:,.0f} generated tokens/s (first chunk out -> last result, "
              f"{sm['generation_s']:.2f} s); {ready}; wall {sm['wall_s']:.2f} s\n" if tput else
              f"gpt2job: nothing new to generate; wall {sm['wall_s']:.2f} s\n")
    for w in sm["workers"]:
        extra = f", retired: {w['retired']}" if w.get("retired") else ""
        busy = f" ({w['busy_percent']:.0f}% busy)" if w.get("busy_percent") is not None else ""
        out.write(f"gpt2job:   rank {w['rank']} on {w['host']} ({w.get('backend', '?')}, {w.get('device', '?')}): "
                  f"{plural(w['rows'], 'row')}, {plural(w['tokens'], 'token')}, {plural(w['chunks'], 'chunk')}, "
                  f"{w['compute_s']:.2f} s computing"
                  f"{busy}{extra}\n")
    out.flush()
