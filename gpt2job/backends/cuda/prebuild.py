"""`python -m gpt2job build-kernels`: the modules a job's Kernels loads (the same options, GPT2JOB_F16_VARIANTS
included), compiled into this node's kernel cache (kcache.py) where missing, once per node before a job; nvcc needs
no GPU."""
import re
import time

from gpt2job.backends.cuda.kcache import cache_dir
from gpt2job.backends.cuda.kernels import choose_variants, compile_modules, module_jobs
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
    try:
        jobs = module_jobs(choose_variants(KernelOptions.from_env(), lambda: cc == (9, 0)), cc)
    except ValueError as e:
        raise UserError(str(e), field="GPT2JOB_F16_VARIANTS", fix="unset it, or name variants of kernels.py") from None
    t0, folder = time.time(), cache_dir()
    _, compiled = compile_modules(jobs, folder)
    print(f"gpt2job: kernels for {arch} ({why}), {len(jobs)} modules in {folder}: {len(compiled)} compiled, "
          f"{len(jobs) - len(compiled)} already there ({time.time() - t0:.1f} s)")
    return 0


def gpu_arch():
    """sm_XY of this node's first GPU (no CUDA context made), or "" without a GPU or a working pycuda."""
    from gpt2job.backends import gpu_count, pycuda_available
    if not gpu_count() or not pycuda_available():
        return ""
    try:
        import pycuda.driver as drv
        drv.init()
        return "sm_%d%d" % drv.Device(0).compute_capability()
    except Exception:   # pycuda without a usable driver: as without a GPU
        return ""
