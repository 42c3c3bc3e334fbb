"""Where a traced job's worker span goes (GPT2JOB_TRACE=1 jobs' output, e.g. `small_chunks.py --keep-logs`):

  python3 benchmarks/job_ends.py [--medians] LOG [LOG ...]

The summary's busy % is a worker's GPU time over its span, from its first chunk sent to its last result received
by the master. Per worker rank this splits the span into
  start    first chunk sent -> the first batch's first GPU launch; "recv" of it: until the worker had received
           its first chunk, the rest preparing the first batch (receiving more, planning, uploading)
  between  the GPU idle between batches (a batch's last GPU work -> the next batch's first launch)
  inside   the batches' own GPU spans (first launch -> last GPU work): what busy % counts; of it the GPU time of
           prefill and of decode steps (their events' spans, summed: "inside" less both is the GPU idle inside batches)
  end      the last batch's last GPU work -> its last result received by the master; "back" of it: until the
           worker's loop had the batch's completions, the rest splitting, sending and the master receiving
from the master's lines (chunk handed out, result received) and the worker's device timelines (CUDA events, put on
the wall clock by their `origin`: the time.time() at the backend's first event; the ranks share a node's clock).
Logs of trees before 1530bbb (no per-result master lines) give nothing; where the origin has 3 decimals (the trees
of session 40's calls) start, end and "back" are +-0.5 ms. One line per log and rank, in ms; with
--medians one per configuration and case (logs named NAME-REPEAT.log, as small_chunks.py --keep-logs writes them),
each column the median over the repeats. A chunk computed in halves (out of memory) has a timeline line per
half (trees from session 41): each counts as a batch, the gap between them as GPU idle between batches.
"""
import re
import statistics
import sys

TRACE = re.compile(r"gpt2job trace (\d+\.\d+) (.*)$")
SENT = re.compile(r"master: chunk (-?\d+) \(\d+ prompts\) to rank (\d+)")
RECEIVED = re.compile(r"rank (\d+): chunk (-?\d+) received$")
COMPUTED = re.compile(r"rank (\d+): chunk (-?\d+) computed in .* back at (\d+\.\d+)")
RESULT = re.compile(r"master: chunk (-?\d+) result from rank (\d+), received (\d+\.\d+)")
TIMELINE = re.compile(r"rank (\d+): chunk (-?\d+) device timeline \(ms since start\): (.*)$")


def fields(text):
    out = {}
    for item in text.split(", "):
        name, _, v = item.partition(" ")
        x = [float(t) for t in re.findall(r"\d+(?:\.\d+)?", v)]
        out[name] = tuple(x) if len(x) == 2 else (x[0] if x else None)
    return out


def analyse(text):
    """{rank: {"span", "start", "recv", "between", "inside", "prefill", "decode", "end", "back", "batches"} in ms}."""
    first_sent, last_recv, batches, first_in, back = {}, {}, {}, {}, {}
    for line in text.splitlines():
        m = TRACE.search(line)
        if not m:
            continue
        t, msg = float(m.group(1)), m.group(2)
        if (s := SENT.match(msg)):
            first_sent.setdefault(int(s.group(2)), t)
        elif (r := RESULT.match(msg)):
            rank = int(r.group(2))
            last_recv[rank] = max(last_recv.get(rank, 0.0), float(r.group(3)))
        elif (g := RECEIVED.match(msg)):
            first_in.setdefault(int(g.group(1)), t)
        elif (c := COMPUTED.match(msg)):
            back[int(c.group(1))] = float(c.group(3))
        elif (d := TIMELINE.match(msg)):
            f = fields(d.group(3))
            if "compute" in f:
                batches.setdefault(int(d.group(1)), []).append(f)
    res = {}
    for rank, fs in sorted(batches.items()):
        if rank not in first_sent or rank not in last_recv:
            continue
        spans = sorted((f.get("first_launch", f["compute"][0]), f["compute"][1], f.get("origin")) for f in fs)
        inside = sum(b - a for a, b, _ in spans)
        between = sum(max(0.0, n[0] - p[1]) for p, n in zip(spans, spans[1:]))
        span = 1e3 * (last_recv[rank] - first_sent[rank])
        row = {"span": span, "inside": inside, "between": between, "batches": len(spans), "start": None, "end": None,
               "prefill": sum(f.get("prefill_ms") or 0.0 for f in fs),
               "decode": sum(f.get("decode_ms") or 0.0 for f in fs),
               "recv": None, "back": None}
        origin = spans[0][2]
        if origin:
            row["start"] = origin * 1e3 + spans[0][0] - first_sent[rank] * 1e3
            row["end"] = last_recv[rank] * 1e3 - (origin * 1e3 + spans[-1][1])
            if rank in first_in:
                row["recv"] = 1e3 * (first_in[rank] - first_sent[rank])
            if rank in back:
                row["back"] = back[rank] * 1e3 - (origin * 1e3 + spans[-1][1])
        res[rank] = row
    return res


def main():
    args = sys.argv[1:]
    medians = "--medians" in args
    rows = []
    for path in (p for p in args if p != "--medians"):
        with open(path) as f:
            for rank, r in analyse(f.read()).items():
                rows.append((re.sub(r"-\d+\.log$", "", path.rsplit("/", 1)[-1]) if medians else path, rank, r))
    if medians:
        groups = {}
        for name, rank, r in rows:
            groups.setdefault((name, rank), []).append(r)
        rows = [(name, rank, {k: statistics.median(x[k] for x in rs) if all(x[k] is not None for x in rs) else None
                              for k in rs[0]}) for (name, rank), rs in groups.items()]
    print(f"{'log':<44} {'rank':>4} {'batches':>7} {'span ms':>8} {'inside':>8} {'prefill':>8} {'decode':>8} "
          f"{'start':>7} {'(recv)':>7} "
          f"{'between':>7} {'end':>7} {'(back)':>7} {'busy %':>6}")
    for path, rank, r in rows:
        fmt = lambda x: f"{x:.1f}" if x is not None else "-"   # noqa: E731
        print(f"{path[-44:]:<44} {rank:>4} {r['batches']:>7.0f} {r['span']:>8.1f} {r['inside']:>8.1f} "
              f"{r['prefill']:>8.1f} {r['decode']:>8.1f} "
              f"{fmt(r['start']):>7} {fmt(r['recv']):>7} {r['between']:>7.1f} {fmt(r['end']):>7} "
              f"{fmt(r['back']):>7} {100 * r['inside'] / r['span']:>6.1f}")


if __name__ == "__main__":
    main()
