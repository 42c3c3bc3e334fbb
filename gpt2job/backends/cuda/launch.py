"""Kernel launches with programmatic dependent launch (PDL, Hopper; options.pdl): each kernel is launched with
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so the GPU places its blocks while the kernel before it on
the stream still runs; they wait at pdl_enter() (cuda_src/common.cuh, the first thing every kernel does) until
that kernel has ended and its writes are visible, and start at once. A decode step is ~100 dependent kernels, most
of them a few microseconds long at a few hundred rows: the gap between two of them is then a large part of the
step. Results are the same as with plain launches: no kernel reads or writes global memory before the wait.

PyCUDA launches with cuLaunchKernel and does not expose a function's CUfunction handle, so the cubins are loaded
once more through ctypes on libcuda (into the current context) and launched with cuLaunchKernelEx. Stream capture
(graphs.py) records such launches with programmatic edges.
"""
import ctypes
import struct

_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CUlaunchAttributeID
_MAX_DYNAMIC_SHARED = 8                    # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_ARG = {"P": "Q", "Q": "Q", "i": "i4x", "f": "f4x", "d": "d"}   # PyCUDA signature letter -> an 8-byte slot

_lib = None


def _cuda():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        p = ctypes.c_void_p
        for name, args in (("cuModuleLoadData", [ctypes.POINTER(p), ctypes.c_char_p]),
                           ("cuModuleGetFunction", [ctypes.POINTER(p), p, ctypes.c_char_p]),
                           ("cuModuleUnload", [p]), ("cuFuncSetAttribute", [p, ctypes.c_int, ctypes.c_int]),
                           ("cuLaunchKernelEx", [p, p, p, p]),
                           ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(rc, what):
    if rc:
        s = ctypes.c_char_p()
        _cuda().cuGetErrorString(rc, ctypes.byref(s))
        raise RuntimeError(f"{what} failed: {s.value.decode() if s.value else rc}")


class _Attribute(ctypes.Structure):       # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _Config(ctypes.Structure):          # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attribute)), ("numAttrs", ctypes.c_uint)]


class PdlFunction:
    """One kernel, launched as PyCUDA's prepared_async_call launches it (same arguments), with the PDL attribute.
    Its argument slots and launch configuration are reused by every launch (one thread launches)."""

    def __init__(self, module, name, signature):
        self.fn = ctypes.c_void_p()
        _check(_cuda().cuModuleGetFunction(ctypes.byref(self.fn), module, name.encode()), f"cuModuleGetFunction {name}")
        self.name = name
        self.pack = struct.Struct("<" + "".join(_ARG[c] for c in signature)).pack_into
        self.slots = (ctypes.c_uint64 * len(signature))()
        self.params = (ctypes.c_void_p * len(signature))(
            *(ctypes.addressof(self.slots) + 8 * i for i in range(len(signature))))
        self.attr = _Attribute(_PROGRAMMATIC_STREAM_SERIALIZATION, b"", 1)
        self.cfg = _Config(attrs=ctypes.pointer(self.attr), numAttrs=1)
        self.cfg_p = ctypes.byref(self.cfg)

    def set_max_dynamic_shared(self, nbytes):
        _check(_cuda().cuFuncSetAttribute(self.fn, _MAX_DYNAMIC_SHARED, int(nbytes)), f"cuFuncSetAttribute {self.name}")

    def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
        self.pack(self.slots, 0, *args)
        c = self.cfg
        c.gridDimX, c.gridDimY, c.gridDimZ = (int(g) for g in grid)
        c.blockDimX, c.blockDimY, c.blockDimZ = block
        c.sharedMemBytes = int(shared_size)
        c.hStream = int(stream.handle) if stream is not None else None
        _check(_cuda().cuLaunchKernelEx(self.cfg_p, self.fn, self.params, None), f"launch of {self.name}")


class PdlModules:
    """The cubins {module: bytes} loaded through ctypes into the current context; function() gives their kernels."""

    def __init__(self, cubins):
        self.mods = {}
        for key, cubin in cubins.items():
            m = ctypes.c_void_p()
            _check(_cuda().cuModuleLoadData(ctypes.byref(m), bytes(cubin)), f"cuModuleLoadData {key}")
            self.mods[key] = m

    def function(self, module, name, signature):
        return PdlFunction(self.mods[module], name, signature)

    def free(self):
        """Unload the modules (before the context goes)."""
        for m in self.mods.values():
            _cuda().cuModuleUnload(m)
        self.mods = {}
