"""CUDA graphs through the driver API (PyCUDA has none): the launches a function makes on a stream are captured once
and replayed with one call. An experiment (benchmarks/graph_probe.py), not used by the engine: a decode step of a
small batch is ~100 kernel launches, but measured on an H200 the host stays ahead of the GPU and a replayed step
saves only 5-9% (RESULTS.md, session 12); worth wiring in once the small-batch kernels are fast.

ctypes on libcuda rather than NVIDIA's cuda-python: five functions, no new dependency, and it works on PyCUDA's
current context as is. A captured graph holds the kernels' arguments as they were: replay it only while every
buffer it reads or writes is at the same address (the pool's buffers do not move unless they grow) and the host
values it was captured with (row counts, positions in device memory) still hold.
"""
import ctypes

_lib = None
CAPTURE_THREAD_LOCAL = 1   # CUstreamCaptureMode: other threads' CUDA calls are not affected by the capture


def _cuda():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        for name, args in (("cuStreamBeginCapture_v2", [p, ctypes.c_int]), ("cuStreamEndCapture", [p, pp]),
                           ("cuGraphInstantiateWithFlags", [pp, p, ctypes.c_ulonglong]), ("cuGraphLaunch", [p, p]),
                           ("cuGraphExecDestroy", [p]), ("cuGraphDestroy", [p]),
                           ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
    return _lib


class GraphError(RuntimeError):
    pass


def _check(rc, what):
    if rc:
        s = ctypes.c_char_p()
        _cuda().cuGetErrorString(rc, ctypes.byref(s))
        raise GraphError(f"{what} failed: {s.value.decode() if s.value else rc}")


class Graph:
    """One captured, instantiated graph: Graph(stream, fn) runs fn() under capture on stream (fn's launches are
    recorded, not run), then launch() replays them on that stream."""

    def __init__(self, stream, fn):
        lib, self.stream = _cuda(), ctypes.c_void_p(int(stream.handle))
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cuStreamBeginCapture_v2(self.stream, CAPTURE_THREAD_LOCAL), "cuStreamBeginCapture")
        try:
            fn()
        finally:   # end the capture even when fn failed, or the stream stays unusable
            rc = lib.cuStreamEndCapture(self.stream, ctypes.byref(self.graph))
        _check(rc, "cuStreamEndCapture")
        _check(lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, 0), "cuGraphInstantiate")

    def launch(self):
        _check(_cuda().cuGraphLaunch(self.exec, self.stream), "cuGraphLaunch")

    def close(self):
        if self.exec:
            _cuda().cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            _cuda().cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()
