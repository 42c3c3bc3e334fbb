import sys, os; sys.path.insert(0, os.getcwd())
import torch; torch.zeros(1, device="cuda")
import pycuda.driver as drv
drv.init(); ctx = drv.Device(0).retain_primary_context(); ctx.push()
from gpt2job.backends.cuda.kernels import Kernels
from gpt2job.backends.cuda.options import KernelOptions
vs = sys.argv[1].split(",")
k = Kernels(0, KernelOptions(f16_variants=tuple(vs)))
print(os.getcwd(), "cluster_slots", k.cluster_slots, flush=True)
def t(fn, reps=20):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): fn()
    b.record(); b.synchronize()
    return a.elapsed_time(b) / reps * 1e3
for name, N, K, mode, half in (("qkv", 2304, 768, 0, True), ("attn_out", 768, 768, 3, False), ("mlp_up", 3072, 768, 1, True), ("mlp_down", 768, 3072, 3, False)):
    for M in (2048, 8192, 32768):
        A = torch.randn(M, K, device="cuda").half(); W = (torch.randn(N, K, device="cuda") / K ** 0.5).half()
        C = torch.zeros(M, N, device="cuda", dtype=torch.half if half else torch.float32)
        bias = torch.randn(N, device="cuda")
        outs = {}
        line = f"{name:8s} {M:6d}"
        for v in vs:
            fn = lambda v=v: k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, C.data_ptr(), N, bias.data_ptr(), M, N, K, mode, half, variant=v)
            C.zero_(); fn(); torch.cuda.synchronize(); outs[v] = C.clone()
            line += f"  {v} {t(fn):7.1f}"
        same = all(torch.equal(outs[v], outs[vs[0]]) for v in vs)
        print(line, "same" if same else "DIFFER", flush=True)
ctx.pop()
