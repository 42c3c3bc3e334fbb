"""Progress as it happens (rough edge 6): the master's accounting of tokens generated so far (completed chunks plus
the in-chunk reports of the chunks still computing), the channel's progress reports, and a job under mpirun that
says what it starts first and ends with its 100% line."""
import io
import queue
import re

import h5py
import numpy as np

from conftest import VOCAB_DIR, run_gpt2job
from gpt2job.files.progress import Progress


def lines(stream):
    return [x for x in stream.getvalue().splitlines() if x.startswith("progress:")]


def test_in_chunk_reports_count_until_the_chunk_counts_and_a_reassigned_chunk_drops_its_report():
    out = io.StringIO()
    p = Progress(10, interval=1e9, stream=out)           # no line until close(): the accounting alone
    p.report(1, 8, rows=4, most=16)                      # chunk 1: 4 prompts, 8 of at most 16 tokens so far
    p.report(2, 3, rows=6, most=24)
    assert p.generated == 11 and p.done == 0
    assert abs(p.fraction() - (4 * 8 / 16 + 6 * 3 / 24) / 10) < 1e-9
    p.report(1, 12, rows=4, most=16)                     # a later report replaces the earlier one
    assert p.generated == 15
    p.update(4, 40, chunk_id=1)                          # chunk 1's result counts: its real 40 tokens, not 12
    assert p.generated == 43 and p.done == 4
    p.drop(2)                                            # chunk 2's worker was retired: its 3 tokens do not count
    assert p.generated == 40
    p.report(2, 30, rows=6, most=24)                     # a report above the chunk's most never passes it
    assert p.fraction() == 0.999                         # and 100% waits for the rows themselves
    p.report(-1, -1, rows=1, most=1)                     # "not known" is no report
    assert -1 not in p.running
    p.update(6, 60, chunk_id=2)
    assert p.done == 10 and p.generated == 100 and p.fraction() == 1.0
    p.close()
    assert len(lines(out)) == 1 and lines(out)[0].startswith("progress: 10/10 prompts (100.0%), 100 tokens generated")


def test_the_percentage_moves_within_a_chunk_but_reaches_100_only_with_every_row_done():
    p = Progress(4, interval=1e9, stream=io.StringIO())
    p.report(7, 64, rows=4, most=64)                     # every token of the chunk is there: not yet its result
    assert p.done == 0 and p.fraction() == 0.999
    p.update(4, 64, chunk_id=7)
    assert p.fraction() == 1.0


def test_resumed_rows_count_as_done_and_the_last_line_is_printed_once():
    out = io.StringIO()
    p = Progress(5, already=3, interval=0.0, stream=out)  # every update prints
    p.update(2, 10)
    p.close()                                            # says the same as the line just printed: not repeated
    got = lines(out)
    assert len(got) == 1 and got[0].startswith("progress: 5/5 prompts (100.0%), 10 tokens generated"), got


def test_a_job_with_nothing_shown_yet_still_ends_with_its_100_percent_line():
    out = io.StringIO()
    p = Progress(3, interval=1e9, stream=out)
    p.last = 1e18                                        # the interval never passes
    p.update(3, 9, chunk_id=0)
    assert lines(out) == []
    p.close()
    assert lines(out)[-1].startswith("progress: 3/3 prompts (100.0%), 9 tokens generated")


def test_thread_channel_keeps_reports_apart_from_results():
    """poll() hands out results, hellos and errors only (the end of a job waits on those); reports are taken apart."""
    from gpt2job.cluster.channel import Mux, QueueMasterLink, ThreadChannel

    class Thread:
        inbox, outbox = queue.Queue(), queue.Queue()
    ch = Mux([ThreadChannel(Thread)])
    link = QueueMasterLink(Thread.inbox, Thread.outbox)
    link.send_hello({"host": "h"})
    link.send_progress(5, 17)
    link.send_progress(5, 40)
    msgs = ch.poll()
    assert [m[1] for m in msgs] == ["hello"]
    assert ch.take_reports() == [(0, 5, 17), (0, 5, 40)]
    assert ch.take_reports() == []


def test_a_job_under_mpirun_starts_with_its_start_line_reports_within_chunks_and_ends_at_100_percent(tmp_path):
    """2 worker ranks, one chunk of 200 prompts each (~1 s of NumPy each): the master hears of tokens before any
    chunk is done, and the last progress line is 100%."""
    rng = np.random.default_rng(0)
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(inp, "w") as f:
        ds = f.create_dataset("prompt_tokens", (400,), dtype=h5py.vlen_dtype(np.int32))
        for i in range(400):
            ds[i] = rng.integers(0, 50000, rng.integers(4, 12)).astype(np.int32)
    p = run_gpt2job(["run", inp, out, "--backend", "numpy", "--model",
                     "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257", "--max-new-tokens", 32, "--ignore-eos",
                     "--chunk-size", 200, "--progress-interval", 0.2]
                    + (["--vocab-dir", VOCAB_DIR] if (VOCAB_DIR / "vocab.bpe").is_file() else []), np_=3, check=0)
    ours = [x for x in p.stderr.splitlines() if x.startswith(("gpt2job:", "progress:"))
            and "no tokenizer" not in x]      # without the vocabulary files: a line saying so comes first
    assert ours[0].startswith("gpt2job: starting: 400 prompts to compute"), p.stderr
    assert "2 workers (3 ranks)" in ours[0] and "backend numpy, dtype float32" in ours[0]
    progress = [x for x in ours if x.startswith("progress:")]
    assert progress[-1].startswith("progress: 400/400 prompts (100.0%), 12,800 tokens generated"), p.stderr
    assert ours.index(progress[-1]) == len(ours) - 1       # nothing of ours after it on stderr
    tokens = [int(re.search(r"\), ([\d,]+) tokens? generated", x)[1].replace(",", "")) for x in progress]
    assert tokens == sorted(tokens)
    within = [x for x in progress if x.startswith("progress: 0/400 prompts") and not re.search(r"\), 0 tokens", x)]
    assert within, f"no report from within a chunk:\n{p.stderr}"
    assert "gpt2job: done. 400 rows" in p.stdout


def test_the_summary_line_says_when_the_output_was_finished_where_its_last_writes_took_a_second_or_more():
    """The summary's wall_s is taken before the output's last rows are written (it is stored in the output): at
    millions of rows the process ended seconds later than the wall it printed."""
    import io
    from gpt2job.files.progress import print_summary
    sm = {"throughput_tokens_per_s": 1000.0, "rows_total": 4, "rows_resumed": 0, "rows_invalid": 0,
          "generated_tokens": 8, "time_to_ready_s": 1.0, "generation_s": 0.5, "wall_s": 12.0, "workers": []}
    for finished, said in ((12.4, "wall 12.00 s\n"), (15.0, "wall 12.00 s (output finished at 15.00 s)\n"),
                           (None, "wall 12.00 s\n")):
        out = io.StringIO()
        print_summary(sm, out, finished_s=finished)
        assert out.getvalue().splitlines()[1].endswith(said.strip()), out.getvalue()
    out = io.StringIO()
    print_summary(dict(sm, throughput_tokens_per_s=None), out, verb="scored")   # (it said "to generate")
    assert "gpt2job: nothing new to score; wall 12.00 s" in out.getvalue(), out.getvalue()
