"""CUDA graphs through the driver API (PyCUDA has none): the launches a function makes on a stream are captured once
and replayed with one call. StepGraphs replays every decode step but --logprobs ones, whatever its rows
(options.cuda_graphs): a step is ~100 kernel launches, and the gaps between them are a large share of a step of a
few hundred rows
(benchmarks/graph_probe.py, benchmarks/RESULTS.md).

With pdl (Hopper on), every kernel -> kernel edge of a captured graph becomes a programmatic one (programmatic
dependent launch): a kernel is launched once every block of the kernel before it has ended, without waiting for that
kernel's end and writes to be made known first, and waits for them in its first statement (`pdl_wait`,
cuda_src/common.cuh; tests/test_cuda_compile.py checks that every kernel has it). The same kernels and inputs, so
the same bits; decode steps a little shorter, most where they are short (benchmarks/RESULTS.md).

ctypes on libcuda rather than NVIDIA's cuda-python: a few functions, no new dependency, and it works on PyCUDA's
current context as is. A captured graph holds the kernels' arguments as they were: replay it only while every
buffer it reads or writes is at the same address (the pool's buffers do not move unless they grow) and the host
values it was captured with (row counts, positions in device memory) still hold.
"""
import ctypes

from gpt2job.errors import warn

_lib = None
CAPTURE_THREAD_LOCAL = 1   # CUstreamCaptureMode: other threads' CUDA calls are not affected by the capture
NODE_KERNEL = 0            # CUgraphNodeType
PORT_PROGRAMMATIC = 1      # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC: every block has ended (none triggers)
DEPENDENCY_PROGRAMMATIC = 1   # CUgraphDependencyType


class _Edge(ctypes.Structure):   # CUgraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


def _cuda():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        for name, args in (("cuStreamBeginCapture_v2", [p, ctypes.c_int]), ("cuStreamEndCapture", [p, pp]),
                           ("cuGraphInstantiateWithFlags", [pp, p, ctypes.c_ulonglong]), ("cuGraphLaunch", [p, p]),
                           ("cuGraphExecDestroy", [p]), ("cuGraphDestroy", [p]),
                           ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
                           ("cuGraphNodeGetType", [p, ctypes.POINTER(ctypes.c_int)])):
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ctypes.c_int
        edge, n = ctypes.POINTER(_Edge), ctypes.POINTER(ctypes.c_size_t)
        for name, args in (("cuGraphGetEdges_v2", [p, pp, pp, edge, n]),   # CUDA 12.3 on: else no programmatic edges
                           ("cuGraphAddDependencies_v2", [p, pp, pp, edge, ctypes.c_size_t]),
                           ("cuGraphRemoveDependencies_v2", [p, pp, pp, edge, ctypes.c_size_t])):
            if hasattr(lib, name):
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


def programmatic_edges(graph):
    """Turn every kernel -> kernel edge of graph (captured, not instantiated) into a programmatic one; returns how
    many. A driver without the calls changes nothing; one that refuses an edge gets it back as it was."""
    lib = _cuda()
    if not hasattr(lib, "cuGraphGetEdges_v2"):
        return 0
    n = ctypes.c_size_t()
    _check(lib.cuGraphGetEdges_v2(graph, None, None, None, ctypes.byref(n)), "cuGraphGetEdges")
    frm, to, data = (ctypes.c_void_p * n.value)(), (ctypes.c_void_p * n.value)(), (_Edge * n.value)()
    _check(lib.cuGraphGetEdges_v2(graph, frm, to, data, ctypes.byref(n)), "cuGraphGetEdges")

    def kernel(node):
        t = ctypes.c_int()
        _check(lib.cuGraphNodeGetType(node, ctypes.byref(t)), "cuGraphNodeGetType")
        return t.value == NODE_KERNEL

    done = 0
    for i in range(n.value):
        if data[i].type or data[i].from_port or not (kernel(frm[i]) and kernel(to[i])):
            continue
        f, t = (ctypes.c_void_p * 1)(frm[i]), (ctypes.c_void_p * 1)(to[i])
        _check(lib.cuGraphRemoveDependencies_v2(graph, f, t, ctypes.byref(data[i]), 1), "cuGraphRemoveDependencies")
        e = _Edge(PORT_PROGRAMMATIC, 0, DEPENDENCY_PROGRAMMATIC)
        if lib.cuGraphAddDependencies_v2(graph, f, t, ctypes.byref(e), 1):
            _check(lib.cuGraphAddDependencies_v2(graph, f, t, ctypes.byref(data[i]), 1), "cuGraphAddDependencies")
            break
        done += 1
    return done


class Graph:
    """One captured, instantiated graph: Graph(stream, fn) runs fn() under capture on stream (fn's launches are
    recorded, not run), then launch() replays them on that stream. pdl: its kernel -> kernel edges programmatic
    (programmatic_edges; pdl_edges says how many)."""

    def __init__(self, stream, fn, pdl=False):
        lib, self.stream = _cuda(), ctypes.c_void_p(int(stream.handle))
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        self.pdl_edges = 0
        _check(lib.cuStreamBeginCapture_v2(self.stream, CAPTURE_THREAD_LOCAL), "cuStreamBeginCapture")
        try:
            try:
                fn()
            finally:   # end the capture even when fn failed, or the stream stays unusable
                rc = lib.cuStreamEndCapture(self.stream, ctypes.byref(self.graph))
            _check(rc, "cuStreamEndCapture")
            if pdl:
                self.pdl_edges = programmatic_edges(self.graph)
            _check(lib.cuGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, 0), "cuGraphInstantiate")
        except BaseException:
            self.close()     # a graph captured but not instantiated is destroyed too
            raise

    def launch(self):
        _check(_cuda().cuGraphLaunch(self.exec, self.stream), "cuGraphLaunch")

    def close(self):
        if self.exec:
            _cuda().cuGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            _cuda().cuGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()


class StepGraphs:
    """Decode steps as graphs, by key: the first time a key is seen the step runs as launched (it grows the pool's
    buffers and fills the TMA descriptor cache: nothing may allocate or synchronise under capture), the second time
    it is captured and replayed, afterwards replayed. The key holds everything the captured launches baked in
    (row count, buffer addresses, cache shape); epoch() changes whenever a pool buffer or descriptor slot may
    have moved, and then every graph is dropped. A capture that fails turns graphs off for good (steps run as
    launched: the same kernels, so the same tokens). A capture costs about a step of host time more than a launch:
    once `warm` graphs were captured, another is captured only while graphs were replayed `payback` times as often
    as captured (rows that stop at every few steps change the row count, so the key, faster than graphs pay)."""

    def __init__(self, stream, epoch, most=64, warm=16, payback=4, pdl=False):
        self.stream, self.epoch, self.most, self.pdl = stream, epoch, most, pdl
        self.warm, self.payback = warm, payback
        self.graphs, self.seen, self.at_epoch = {}, set(), None
        self.on, self.replays, self.captures = True, 0, 0

    def run(self, key, step):
        epoch = self.epoch()
        if epoch != self.at_epoch:
            self.free()
            self.at_epoch = epoch
        g = self.graphs.get(key) if self.on else None
        if g is not None:
            g.launch()
            self.replays += 1
            return
        paying = self.captures < self.warm or self.replays >= self.payback * self.captures
        if not self.on or key not in self.seen or not paying:
            self.seen.add(key)
            step()
            return
        if len(self.graphs) >= self.most:
            self.free()
        try:
            g = Graph(self.stream, step, self.pdl)
        except Exception as e:   # noqa: BLE001  (GraphError, or a call the capture does not allow)
            warn(f"CUDA graph capture failed ({e}); decode steps run as launched")
            self.on = False
            step()
            return
        self.graphs[key] = g
        self.captures += 1
        g.launch()
        self.replays += 1

    def free(self):
        """Destroy every graph (before the buffers they use go, and before the context)."""
        for g in self.graphs.values():
            g.close()
        self.graphs, self.seen = {}, set()
