"""The benchmark tools' own logic, on the CPU: what they compute from a job's output is what they say."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
job_ends = pytest.importorskip("job_ends")

LOG = """\
gpt2job trace 1000.0000 master: 1 of 1 workers ready, handing out chunks
gpt2job trace 1000.0000 master: chunk 0 (137 prompts) to rank 1
gpt2job trace 1000.0010 master: chunk 1 (137 prompts) to rank 1
gpt2job trace 1000.0020 rank 1: chunk 0 received
gpt2job trace 1000.0030 rank 1: chunk 1 received
gpt2job trace 1000.0500 rank 1: chunk 0 computed in 20.0 ms, sent in 0.1 ms, back at 1000.0410
gpt2job trace 1000.0500 rank 1: chunk 0 device timeline (ms since start): upload 1.0-2.0, compute 2.0-30.0, \
origin 999.9900, first_launch 15.000, prefill_ms 6.000, decode_ms 7.000
gpt2job trace 1000.0600 master: chunk 0 result from rank 1, received 1000.0450
gpt2job trace 1000.0800 rank 1: chunk 1 computed in 40.0 ms, sent in 0.1 ms, back at 1000.0750
gpt2job trace 1000.0800 rank 1: chunk 1 device timeline (ms since start): upload 20.0-21.0, compute 31.0-80.0, \
origin 999.9900, first_launch 32.000
gpt2job trace 1000.0810 master: chunk 1 result from rank 1, received 1000.0800
"""


def test_job_ends_splits_a_worker_s_span_into_start_between_inside_and_end():
    """First chunk out at 1000.000, its first kernel at 999.990 + 15 ms, the GPU idle 2 ms between the batches
    (30 -> 32 ms), the last kernel at 999.990 + 80 ms, the completions back 5 ms later and the last result at the
    master 10 ms after the last kernel."""
    r = job_ends.analyse(LOG)[1]
    assert r["batches"] == 2
    assert r["span"] == pytest.approx(80.0)
    assert r["inside"] == pytest.approx(15.0 + 48.0)
    assert r["between"] == pytest.approx(2.0)
    assert r["prefill"] == pytest.approx(6.0) and r["decode"] == pytest.approx(7.0)   # (the second batch has none)
    assert r["start"] == pytest.approx(5.0) and r["recv"] == pytest.approx(2.0)
    assert r["end"] == pytest.approx(10.0) and r["back"] == pytest.approx(5.0)
    assert r["start"] + r["inside"] + r["between"] + r["end"] == pytest.approx(r["span"])


def test_job_ends_reads_logs_of_trees_without_the_new_fields():
    old = "\n".join(line.split(", back at")[0].replace(", origin 999.9900", "") for line in LOG.splitlines())
    r = job_ends.analyse(old)[1]
    assert r["inside"] == pytest.approx(63.0) and r["start"] is None and r["end"] is None and r["back"] is None
