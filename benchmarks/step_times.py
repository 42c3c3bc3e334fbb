"""Each step of a W1 chunk on the GPU (the prefill, then every decode step), in-process, as the runner computes it
(CUDA graphs and the picks as they are), and the gap before each step: the runner's own per-step events (the
device timeline sums them). A few chunks in one process, one line each; the step times show how a step's GPU time
moves within a chunk and between chunks (RESULTS.md, session 49: 5.6-6.7 ms for the same 8,192-row step).

  python3 benchmarks/step_times.py [--chunks 3] [--dtype float16] [--out DIR]

Honours the GPT2JOB_* switches (e.g. GPT2JOB_PREFIX_SHARE=0: every prefill token computed). JSON lines to
OUT/step_times.jsonl. Needs a GPU and pycuda.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, base_record  # noqa: E402
from kernels_bench import w1_chunk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    from gpt2job.backends.base import compute
    from gpt2job.backends.cuda import runner
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings
    os.makedirs(a.out, exist_ok=True)
    plans = []
    post_init = runner.ChunkPlan.__post_init__

    def keep(plan):   # the runner's plans, whose phases hold each step's (start, end) events
        post_init(plan)
        plans.append(plan)
    runner.ChunkPlan.__post_init__ = keep
    be = CudaBackend(random_params(PRESETS["gpt2"], 0), GenerationSettings(max_new_tokens=8, ignore_eos=True),
                     dtype=a.dtype)
    try:
        be.warm_up()
        chunk = w1_chunk()
        for i in range(a.chunks):
            plans.clear()
            t = time.perf_counter()
            compute(be, chunk)
            wall = 1e3 * (time.perf_counter() - t)
            ph = plans[0].phases
            steps = [round(end.time_since(start), 3) for _, start, end in ph]
            gaps = [round(ph[j][1].time_since(ph[j - 1][2]), 3) for j in range(1, len(ph))]
            append_jsonl(os.path.join(a.out, "step_times.jsonl"), base_record(
                bench="step_times", dtype=a.dtype, chunk=i, wall_ms=round(wall, 2), steps_ms=steps, gaps_ms=gaps))
            print(f"chunk {i}: wall {wall:.1f} ms; prefill {steps[0]:.2f} ms; decode steps (ms) "
                  + " ".join(f"{s:.2f}" for s in steps[1:]) + "; gaps before each step (ms) "
                  + " ".join(f"{g:.2f}" for g in gaps), flush=True)
    finally:
        runner.ChunkPlan.__post_init__ = post_init
        be.close()


if __name__ == "__main__":
    main()
