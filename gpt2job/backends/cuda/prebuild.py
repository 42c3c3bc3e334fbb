"""The node's kernel cache filled before the modules are loaded: `python -m gpt2job build-kernels` (build_kernels),
the modules a job's Kernels loads (the same options, GPT2JOB_F16_VARIANTS included) compiled into this node's kernel
cache (kcache.py) where missing, once per node before a job (nvcc needs no GPU); and compile_ahead, a worker's own
compiles started before it reads its weights."""
import re
import subprocess
import time

from gpt2job.backends.cuda import kcache
from gpt2job.backends.cuda.device import init_driver
from gpt2job.backends.cuda.kcache import compile_modules
from gpt2job.backends.cuda.kernels import choose_variants, module_jobs
from gpt2job.backends.cuda.options import KernelOptions
from gpt2job.errors import UserError


def build_kernels(arch_flag):
    """Compile for --arch (arch_flag), else this node's GPU, else sm_90a; prints one line; returns 0."""
    arch, why = (arch_flag, "--arch") if arch_flag else (gpu_arch(), "this node's GPU")
    if not arch:
        arch, why = "sm_90a", "no GPU seen here: the default"
    m = re.fullmatch(r"sm_(\d+)(\d)a?", arch)
    if m is None:
        raise UserError(f"{arch!r} is not a GPU architecture", field="--arch", fix="give sm_XY, e.g. sm_90a (Hopper)")
    cc = (int(m[1]), int(m[2]))
    if cc < (8, 0):   # the kernels use compute capability 8.0's instructions (README)
        raise UserError(f"{arch} is older than the kernels need (compute capability 8.0 or later)", field="--arch",
                        fix="give the nodes' GPU, sm_80 or later (sm_90a: Hopper)")
    jobs = module_jobs(choose_variants(KernelOptions.from_env(), lambda: cc == (9, 0)), cc)
    try:
        kcache.nvcc_version()
    except RuntimeError as e:   # no nvcc on PATH, or one that does not run
        why = "not found on PATH (the CUDA kernels are compiled by nvcc, CUDA 12+)" if "not found" in str(e) else \
            f"`nvcc --version` failed ({(str(e).split('failed: ', 1)[-1].splitlines() or ['no output'])[0][:120]})"
        raise UserError(why, field="nvcc", fix="put the CUDA toolkit's bin folder on PATH, e.g. module load cuda") \
            from None
    known = nvcc_codes()
    if known and arch.rstrip("a") not in known:
        raise UserError(f"this nvcc cannot compile for {arch}", field="--arch",
                        fix="give one it knows: " + ", ".join(c for c in known if int(c[3:]) >= 80))
    t0 = time.time()
    try:
        folder = kcache.cache_dir()
        _, compiled = compile_modules(jobs, folder)
    except OSError as e:   # a folder not writable, or a file where a folder should be
        raise UserError(f"cannot write the kernel cache ({e.strerror})", path=e.filename, field="GPT2JOB_PYCUDA_CACHE",
                        fix="set GPT2JOB_PYCUDA_CACHE to a folder you can write") from None
    print(f"gpt2job: kernels for {arch} ({why}), {len(jobs)} modules in {folder}: {len(compiled)} compiled, "
          f"{len(jobs) - len(compiled)} already there ({time.time() - t0:.1f} s)")
    return 0


def compile_ahead(gpu_slot):
    """Start compiling, in a background thread, the modules the CUDA backend of this worker's GPU (gpu_slot, as
    Device picks it) will load, so that the compiles of a cold node run while the worker reads its weights (seconds
    for a large checkpoint) instead of after. Returns the kcache.Background (cancel() it when the start fails), or
    None: with a GPU or pycuda missing nothing starts (the backend's build says what is missing). The backend's own
    compile (Kernels) waits for it, then finds the modules in the cache; a failure here is left to that compile,
    which reports it."""
    try:
        drv = init_driver()
        cc = drv.Device(gpu_slot % drv.Device.count()).compute_capability()
        jobs = module_jobs(choose_variants(KernelOptions.from_env(), lambda: cc == (9, 0)), cc)
        folder = kcache.cache_dir()
    except Exception:
        return None
    return kcache.compile_in_background(jobs, folder)


def nvcc_codes():
    """The sm_XY that nvcc can compile for (`nvcc --list-gpu-code`, in its order), or [] where it does not say."""
    try:
        r = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [c for c in r.stdout.split() if re.fullmatch(r"sm_\d+", c)] if r.returncode == 0 else []


def gpu_arch():
    """sm_XY of this node's first GPU (no CUDA context made), or "" without a GPU or a working pycuda."""
    from gpt2job.backends import gpu_count, pycuda_available
    if not gpu_count() or not pycuda_available():
        return ""
    try:
        return "sm_%d%d" % init_driver().Device(0).compute_capability()
    except Exception:   # pycuda without a usable driver: as without a GPU
        return ""
