"""One module's compile to a cubin: what pycuda.compiler.compile runs, with or without pycuda (kcache.py keeps the
results)."""
import importlib.util
import os
import subprocess
import tempfile


def compile_cubin(text, arch, options, include_dirs):
    """The cubin of `text`: pycuda.compiler.compile without its cache (what Kernels always ran), else, where pycuda
    cannot load (no pycuda, no CUDA driver), the same nvcc command line run here."""
    try:
        import pycuda.driver   # noqa: F401  (pycuda.compiler.compile needs it)
        from pycuda.compiler import compile as pycuda_compile
    except ImportError:
        return nvcc_cubin(text, arch, options, include_dirs)
    return pycuda_compile(text, no_extern_c=True, arch=arch, options=list(options), include_dirs=list(include_dirs),
                          cache_dir=False)


def nvcc_cubin(text, arch, options, include_dirs, nvcc="nvcc"):
    """pycuda.compiler.compile(text, no_extern_c=True, arch=arch, options=options, include_dirs=include_dirs,
    cache_dir=False) without pycuda: `nvcc --cubin OPTIONS -arch ARCH -I... kernel.cu` in a temporary folder (with
    pycuda's header folder as the last -I where pycuda is installed), the same command line: the same bytes."""
    dirs = list(include_dirs)
    spec = importlib.util.find_spec("pycuda")   # finds, does not import
    if spec is not None and spec.origin:
        dirs.append(os.path.abspath(os.path.join(spec.origin, os.path.pardir, "cuda")))
    with tempfile.TemporaryDirectory(prefix="gpt2job-nvcc-") as d:
        with open(os.path.join(d, "kernel.cu"), "w") as fh:
            fh.write(text)
        cmd = [nvcc, "--cubin", *options, "-arch", arch, *["-I" + i for i in dirs], "kernel.cu"]
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        out = os.path.join(d, "kernel.cubin")
        if r.returncode != 0 or not os.path.isfile(out):
            raise RuntimeError(f"nvcc failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        with open(out, "rb") as fh:
            return fh.read()
