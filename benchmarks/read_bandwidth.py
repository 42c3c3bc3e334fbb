"""The GPU's read bandwidth as torch reaches it, the ceiling to hold a memory-bound kernel against (RESULTS.md, session 19:
decode attention at W2's shape read 83% of it). One H200 call of this script printed the session's figures; the
third line (128 bytes of every 3,072 through a strided torch sum) measures torch's strided reduction, not the memory.

    python3 benchmarks/read_bandwidth.py
"""
import torch
x = torch.empty(4 << 30, dtype=torch.float16, device="cuda").normal_()   # 8 GiB
def t(fn, reps=10):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2] / 1e3
s = t(lambda: x.sum(dtype=torch.float32))
print(f"read (sum of 8 GiB fp16): {x.numel() * 2 / s / 1e9:.0f} GB/s")
y = torch.empty_like(x[: 1 << 30]); xs = x[: 1 << 30]
s = t(lambda: y.copy_(xs))
print(f"copy 2 GiB -> 2 GiB: {2 * xs.numel() * 2 / s / 1e9:.0f} GB/s (read + write)")
v = x[: (x.numel() // 1536) * 1536].view(-1, 1536)
s = t(lambda: v[:, :64].sum(dtype=torch.float32))
print(f"strided 128 B of every 3072 B: {v.shape[0] * 128 / s / 1e9:.0f} GB/s")
