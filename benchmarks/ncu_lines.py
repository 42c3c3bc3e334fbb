"""Nsight Compute's stall samples of one kernel by CUDA source line: benchmarks/ncu_source.sh's LABEL-sass.tsv
(every SASS instruction's address, samples, executed count) mapped onto the lines of a local `nvcc -lineinfo`
build of the same source (nvdisasm -g), on any machine with nvcc and nvdisasm (no GPU needed). The SASS must be the
same as the device's (same nvcc, flags and arch): the script counts the instructions whose opcodes differ.

  python3 benchmarks/ncu_lines.py LABEL-sass.tsv KERNEL [--source cuda_src/sampling.cu] [--arch sm_90]
                                  [-D GEMM_TMA_BN=128 ...] [--top 40]

nvdisasm: $NVDISASM, else on PATH (pip install nvidia-cuda-nvdisasm puts one under nvidia/cu13/bin).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tool(name):
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        sys.exit(f"ncu_lines: {name} not found (set ${name.upper()})")
    return path


def opcode(sass):
    """The opcode of one SASS instruction's text, without its predicate."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def line_map(source, kernel, arch, defines):
    """{SASS offset: (source line, opcode)} of kernel in a -lineinfo build of source: the runtime build's nvcc command
    line (nvcc.nvcc_cubin) with -lineinfo where ncu_source.sh puts it."""
    from gpt2job.backends.cuda.nvcc import nvcc_cubin
    with open(source) as fh:
        cubin = nvcc_cubin(fh.read(), arch, ("-std=c++17", "-lineinfo", *["-D" + x for x in defines]),
                           [os.path.dirname(os.path.abspath(source))], nvcc=tool("nvcc"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        dis = subprocess.run([tool("nvdisasm"), "-g", "-c", path], capture_output=True, text=True, check=True).stdout
    at = dis.find(f"\t.section\t.text.{kernel},")
    if at < 0:
        sys.exit(f"ncu_lines: no function {kernel} in {source}")
    end = dis.find("\t.section\t.text.", at + 1)
    dis = dis[at:end if end > 0 else len(dis)]
    out, line = {}, None
    for text in dis.splitlines():
        m = re.search(r'//## File ".*?", line (\d+)', text)
        if m:
            line = int(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", text)
        if m:
            out[int(m.group(1), 16)] = (line, opcode(m.group(2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tsv")
    ap.add_argument("kernel")
    ap.add_argument("--source", default=os.path.join(ROOT, "cuda_src", "sampling.cu"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("-D", dest="defines", action="append", default=[])
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    rows = [r.rstrip("\n").split("\t") for r in open(a.tsv) if r.strip()]
    lines = line_map(a.source, a.kernel, a.arch, a.defines)
    base = int(rows[0][0], 16)
    total = sum(float(r[1]) for r in rows) or 1.0
    by_line, differ = collections.Counter(), 0
    for addr, samples, _executed, sass in rows:
        line, op = lines.get(int(addr, 16) - base, (None, ""))
        differ += op != opcode(sass)
        by_line[line] += float(samples)
    src = open(a.source).read().split("\n")
    print(f"{len(rows)} instructions on the device, {len(lines)} here, {differ} opcodes differ "
          f"(the map is only good at 0); {total:.0f} samples")
    print("  % samples  line: source")
    for line, s in by_line.most_common(a.top):
        text = src[line - 1].strip()[:100] if line else "(no line)"
        print(f"  {100 * s / total:6.1f}    {line}: {text}")


if __name__ == "__main__":
    main()
