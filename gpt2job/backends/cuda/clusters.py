"""How many clusters of a kernel fit on the GPU at once (cuOccupancyMaxActiveClusters), for the persistent grids of
the cluster kernels (gemm_tma.cu, the "c" variants): a grid with more clusters than that runs the rest in a second
wave, and each of them then holds up the product by a whole cluster's share of tiles. PyCUDA has no binding for the
call and does not expose a function's CUfunction handle, so the cubin is loaded once more through ctypes (into the
current context) to ask, then unloaded."""
import ctypes

_MAX_DYNAMIC_SHARED = 8      # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class _LaunchConfig(ctypes.Structure):    # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


def max_active_clusters(cubin, kernels, threads, cluster, n_sm):
    """{name: clusters of `cluster` CTAs of `threads` threads that run at once} for kernels [(name, dynamic shared
    memory bytes)] of the cubin (bytes); None for a kernel the driver could not answer for."""
    lib = ctypes.CDLL("libcuda.so.1")
    mod = ctypes.c_void_p()
    if lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(bytes(cubin))) != 0:
        return {name: None for name, _ in kernels}
    out = {}
    try:
        for name, smem in kernels:
            fn, n = ctypes.c_void_p(), ctypes.c_int(0)
            cfg = _LaunchConfig(cluster * n_sm, 1, 1, threads, 1, 1, smem, None, None, 0)
            ok = (lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()) == 0
                  and lib.cuFuncSetAttribute(fn, _MAX_DYNAMIC_SHARED, ctypes.c_int(smem)) == 0
                  and lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), fn, ctypes.byref(cfg)) == 0)
            out[name] = n.value if ok and n.value > 0 else None
    finally:
        lib.cuModuleUnload(mod)
    return out
