"""Compile time of each kernel module of the default set, one at a time, with nvcc's default options and with extra
ones (default `-split-compile=0`: the NVVM optimizer and ptxas work on a module's kernels in parallel threads), and
whether every kernel's machine code (its ELF `.text.<kernel>` section) comes out byte for byte the same, and the
size of the module's largest kernel (a kernel whose code the SM has not cached fetches it as it runs: RESULTS.md,
session 28). Runs on any machine with nvcc (no GPU): a cold node's time to ready is set by its longest module
compile (RESULTS.md, session 27), so the max column is the one that matters on a many-core node.

  python3 benchmarks/compile_times.py [--extra=-split-compile=0] [--variants tma128pp,...] [--json FILE]
"""
import argparse
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def text_sections(elf):
    """{section name: bytes} of the .text.* sections of an ELF64 little-endian file (a cubin)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = heads[shstrndx]
    out = {}
    for h in heads:
        name_off, off, size = h[0], h[4], h[5]
        end = elf.index(b"\0", names[4] + name_off)
        name = elf[names[4] + name_off:end].decode()
        if name.startswith(".text."):
            out[name] = elf[off:off + size]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", default="-split-compile=0", help="nvcc options added to every module's")
    ap.add_argument("--variants", default="", help="fp16 tile variants (default: kernels.F16_DEFAULT)")
    ap.add_argument("--json", default="")
    ap.add_argument("--tma-split", action="store_true",
                    help="instead: each TMA tile's two kernels compiled as one module and as two (GEMM_OUT_HALF, as "
                         "kernels.module_jobs does), times and whether each kernel's machine code is the same")
    a = ap.parse_args()
    if a.tma_split:
        return tma_split(tuple(v for v in a.variants.split(",") if v))
    from gpt2job.backends.cuda import cuda_src_dir
    from gpt2job.backends.cuda.nvcc import nvcc_cubin
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, module_jobs
    src = cuda_src_dir()
    variants = tuple(v for v in a.variants.split(",") if v) or F16_DEFAULT
    extra = tuple(a.extra.split())
    rows = []
    print(f"{'module':28s} {'default s':>9s} {'extra s':>8s}  kernels  largest KB  machine code", flush=True)
    for key, fname, defs, arch in module_jobs(variants):
        with open(os.path.join(src, fname)) as fh:
            text = fh.read()
        times, cubins = [], []
        for opts in (("-std=c++17", *defs), ("-std=c++17", *extra, *defs)):
            t = time.perf_counter()
            cubins.append(nvcc_cubin(text, arch, opts, [src]))
            times.append(time.perf_counter() - t)
        a_, b_ = (text_sections(c) for c in cubins)
        same = a_ == b_
        largest = max(len(v) for v in a_.values()) / 1024   # the machine code of its largest kernel (default options)
        rows.append({"module": key, "default_s": round(times[0], 2), "extra_s": round(times[1], 2),
                     "kernels": len(a_), "largest_kernel_kb": round(largest, 1), "text_identical": same,
                     "extra": a.extra})
        print(f"{key:28s} {times[0]:9.1f} {times[1]:8.1f}  {len(a_):7d}  {largest:10.0f}  "
              f"{'identical' if same else 'DIFFERENT'}", flush=True)
    d = [r["default_s"] for r in rows]
    e = [r["extra_s"] for r in rows]
    print(f"{'sum':28s} {sum(d):9.1f} {sum(e):8.1f}\n{'max (the critical path)':28s} {max(d):9.1f} {max(e):8.1f}  "
          f"machine code identical in {sum(r['text_identical'] for r in rows)} of {len(rows)} modules")
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def tma_split(variants):
    from gpt2job.backends.cuda import cuda_src_dir
    from gpt2job.backends.cuda.nvcc import nvcc_cubin
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, F16_TILES
    src = cuda_src_dir()
    with open(os.path.join(src, "gemm_tma.cu")) as fh:
        text = fh.read()

    def build(defs):
        t = time.perf_counter()
        return text_sections(nvcc_cubin(text, "sm_90a", ("-std=c++17", *defs), [src])), time.perf_counter() - t
    print(f"{'tile':10s} {'one module s':>12s} {'outh s':>7s} {'outf s':>7s}  each kernel's machine code", flush=True)
    same_all = True
    for t in (F16_TILES[v] for v in variants or F16_DEFAULT if F16_TILES[v].family == "tma"):
        (one, t1), (h, th), (f, tf) = build(t.defines), build(t.module(True)[1]), build(t.module(False)[1])
        same = all(one.get(".text." + t.kernel(o)) == part.get(".text." + t.kernel(o)) is not None and len(part) == 1
                   for o, part in ((True, h), (False, f)))
        same_all &= same
        print(f"{t.name:10s} {t1:12.1f} {th:7.1f} {tf:7.1f}  {'identical' if same else 'DIFFERENT'}", flush=True)
    print("every kernel's machine code identical" if same_all else "DIFFERENCES")


if __name__ == "__main__":
    main()
