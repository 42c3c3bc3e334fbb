"""TMA descriptors (CUtensorMap) for the Hopper matrix products of cuda_src/gemm_tma.cu.

PyCUDA has no binding for cuTensorMapEncodeTiled, so it is called through ctypes on the driver library that
PyCUDA already loaded. A descriptor is 128 opaque bytes; the kernels read them from global memory:
TensorMapCache encodes each distinct (address, shape, box) once into a pinned host slot, copies it into a device
slot on the stream of the launch that first needs it, and hands out the device address.
"""
import ctypes

# enum values of cuda.h (CUDA 12/13)
_DT_FLOAT16 = 6
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0

_lib = None


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuTensorMapEncodeTiled
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                      ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _lib = lib
    return _lib


def encode_f16_rows(ptr, rows, cols, ld, box_rows, box_cols=64):
    """Descriptor of a row-major fp16 matrix [rows, cols] with leading dimension ld (elements) at device address
    ptr, read in boxes of box_rows x box_cols (box_cols x 2 bytes <= 128: one swizzled row), 128-byte swizzle,
    zeros outside the matrix. Returns 128 bytes."""
    assert ptr % 16 == 0 and (ld * 2) % 16 == 0 and box_cols * 2 <= 128 and 0 < box_rows <= 256
    buf = ctypes.create_string_buffer(128 + 64)           # CUtensorMap needs 64-byte alignment
    addr = (ctypes.addressof(buf) + 63) & ~63
    dims = (ctypes.c_uint64 * 2)(cols, rows)              # innermost first
    strides = (ctypes.c_uint64 * 1)(ld * 2)               # bytes, for dimensions 1..rank-1
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    estr = (ctypes.c_uint32 * 2)(1, 1)
    rc = _driver().cuTensorMapEncodeTiled(addr, _DT_FLOAT16, 2, ctypes.c_void_p(ptr), dims, strides, box, estr,
                                          _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} (ptr={ptr:#x}, rows={rows}, "
                           f"cols={cols}, ld={ld}, box={box_rows}x{box_cols})")
    return ctypes.string_at(addr, 128)


class TensorMapCache:
    """Device copies of encode_f16_rows descriptors by argument tuple, max_entries slots of 128 bytes; when all
    are taken the stream is synchronised and the slots are reused from the start."""

    def __init__(self, drv, max_entries=4096):
        import numpy as np
        self.drv = drv
        self.max_entries = max_entries
        self.host = drv.pagelocked_empty(128 * max_entries, np.uint8)
        self.dev = drv.mem_alloc(128 * max_entries)
        self._slots = {}
        self.epoch = 0       # bumped when the slots are reused (a captured graph's descriptors are then stale)

    def get(self, stream, ptr, rows, cols, ld, box_rows):
        """Device address of the descriptor; its copy is queued on stream (None: the default stream)."""
        key = (ptr, rows, cols, ld, box_rows)
        i = self._slots.get(key)
        if i is None:
            if len(self._slots) >= self.max_entries:
                # earlier copies/launches may still read the slots and the pinned staging area
                if stream is None:
                    self.drv.Context.synchronize()
                else:
                    stream.synchronize()
                self._slots.clear()
                self.epoch += 1
            i = self._slots[key] = len(self._slots)
            self.host[128 * i:128 * (i + 1)] = memoryview(encode_f16_rows(ptr, rows, cols, ld, box_rows))
            if stream is None:
                self.drv.memcpy_htod(int(self.dev) + 128 * i, self.host[128 * i:128 * (i + 1)])
            else:
                self.drv.memcpy_htod_async(int(self.dev) + 128 * i, self.host[128 * i:128 * (i + 1)], stream)
        return int(self.dev) + 128 * i

    def free(self):
        """Release the device and pinned buffers (before the context goes)."""
        self.dev.free()
        self.host.base.free()
        self._slots.clear()
