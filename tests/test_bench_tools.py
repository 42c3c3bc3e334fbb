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


def test_issue14_table_gives_each_row_its_median_and_verdict(tmp_path):
    """Medians over the runs, the baselines' ratios, the chunk-size ratios against chunk 8,192, the idle share of the
    ragged small chunks, 2 GPUs against 1, and "met" / "missed by N%" against issue 14's targets."""
    import json
    issue14_table = pytest.importorskip("issue14_table")

    def write(name, recs):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    ours = dict(engine="ours", gpus=1, rc=0)
    write("lfl.jsonl", [dict(ours, workload="warmup", dtype="float16", throughput_tok_s=1.0, warmup=True)]
          + [dict(ours, workload="w1", dtype="float16", throughput_tok_s=t) for t in (700e3, 760e3, 720e3)]
          + [dict(ours, workload="w2", dtype="float16", throughput_tok_s=t) for t in (210e3, 205e3, 215e3)])
    write("baselines.jsonl", [dict(engine="compact", workload="w1", dtype="float16", throughput_tok_s=360e3),
                              *(dict(engine="compact", workload="w2", dtype="float16", throughput_tok_s=t)
                                for t in (50e3, 100e3, 105e3))])
    write("small_chunks.jsonl", [dict(kind="small-chunks", case=f"W3 chunk {n}", tok_s=t, busy_percent=98.0)
                                 for n, t in ((8192, 800e3), (1024, 640e3), (546, 500e3), (137, 100e3))]
          + [dict(kind="small-chunks", case="ragged chunk 512", tok_s=290e3, busy_percent=96.5)])
    write("gpus_ragged.jsonl", [dict(kind="gpus-ragged", tree="new", gpus=2, tok_s=470e3, ratio_to_1=1.89,
                                     workers=[{"busy_percent": 97.9}, {"busy_percent": 98.2}])])
    rows = {r[0]: r for r in issue14_table.rows_of(str(tmp_path))}
    w1 = rows["W1 fp16, every prompt and prefill token computed"]
    assert w1[1].startswith("720,000 (700,000 / 760,000 / 720,000); compact 360,000 (2.00x)")
    assert w1[3] == "missed by 10%"
    assert "compact 100,000 (2.10x)" in rows["W2 fp16, every prompt and prefill token computed"][1]
    assert rows["W2 fp16, every prompt and prefill token computed"][3] == "met"
    assert rows["W3 fp16 `--chunk-size 1024` / 8,192"][1].startswith("0.800") and \
        rows["W3 fp16 `--chunk-size 1024` / 8,192"][3] == "met"
    assert rows["W3 fp16 `--chunk-size 546` / 8,192"][3] == "met"           # 0.625 >= 0.60
    assert rows["W3 fp16 `--chunk-size 137` / 8,192"][3] == "missed by 50%"  # 0.125 against 0.25
    assert rows["GPU idle, ragged prompts, `--chunk-size 512`"][3] == "missed by 17%"   # 3.5% idle against 3%
    assert rows["ragged prompts, default chunking, 2 GPUs / 1"][3] == "met"
    assert "W1 fp32, every prompt and prefill token computed" not in rows   # not measured: no row
