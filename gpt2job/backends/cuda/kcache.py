"""The node's kernel cache: one cubin per compiled module, shared by every rank of a node, so that a cold job compiles
each module once per node, not once per rank.

Folder: $GPT2JOB_PYCUDA_CACHE or ~/.cache/gpt2job/pycuda, then the host name (home folders are often shared by the
nodes). An entry is <name>-<key>.cubin, key a hash of everything that makes the binary: the source text and the
text of every header it includes (#include "..." in its folder, recursively), the nvcc flags and arch, the
`nvcc --version` text (asked once per process), the pycuda version. The file holds the cubin and its SHA-256, and
is written to a temporary file in the same folder, fsynced, then renamed over the entry (os.replace): a reader
finds a whole entry or none. The compile runs under an exclusive lock on <name>-<key>.lock (fcntl.flock): the first
process to need a module compiles it; the others wait on the lock, then load the finished file; a process that
dies while compiling leaves no entry, and the system drops its lock. Different modules compile at once: no more
at once on the node than it has cores (Cache._slot); a thread of a process takes a slot, then the first module
(the longest first: COMPILE_FIRST) no other process is compiling (a lock taken without waiting); where every module
left is another's, it gives the slot back and waits on one; every module but the longest compiles at a lower
priority (LATER_NICE). nvcc.py runs the compiles.
"""
import fcntl
import functools
import glob
import hashlib
import importlib.metadata
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gpt2job import envs
from gpt2job.backends.cuda import cuda_src_dir
from gpt2job.backends.cuda.nvcc import compile_cubin

FORMAT = "gpt2job kernel cache 1: cubin, no_extern_c"   # change it when an entry's meaning changes
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)
_DIGEST = 32   # bytes of SHA-256 after the cubin
# The modules nvcc takes longest on (benchmarks/compile_times.py; RESULTS.md, sessions 67-68), compiled first: a cold
# node's start waits for its longest compile, which must not queue behind short ones for a compile slot
COMPILE_FIRST = ("gemm_tma.cu#tma128pp", "gemm_f32.cu", "gemm_tma.cu#tma256", "gemm_tma.cu#tma192p",
                 "gemm_tma.cu#tma192")
# How much lower the priority (nice) of every other module's nvcc: on a cold node the longest compile competes with
# the other compiles and with every rank's start (imports, weights); it gets the CPU first, the short modules have
# seconds to spare
LATER_NICE = 10


def cache_dir():
    """This node's cache folder (made if missing)."""
    root = envs.get("GPT2JOB_PYCUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2job", "pycuda")
    d = os.path.join(root, socket.gethostname())
    os.makedirs(d, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc="nvcc"):
    try:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise RuntimeError(f"{nvcc} not found ({e}): the CUDA kernels are compiled at run time by nvcc (CUDA 12+); "
                           "put the CUDA toolkit's bin folder on PATH") from None
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"`{nvcc} --version` failed: {r.stderr.strip()}")
    return r.stdout


@functools.lru_cache(maxsize=None)
def pycuda_version():
    try:
        return importlib.metadata.version("pycuda")
    except importlib.metadata.PackageNotFoundError:
        return ""


def headers(text, src_dir):
    """[(path relative to src_dir, text)] of every header `text` includes with #include "..." that is found in
    src_dir (next to the including file first), recursively, each once, in the order first met. Others are the
    toolkit's (covered by the nvcc version)."""
    out, seen = [], set()

    def walk(body, here):
        for name in _INCLUDE.findall(body):
            for d in (here, src_dir):
                path = os.path.normpath(os.path.join(d, name))
                if os.path.isfile(path):
                    break
            else:
                continue
            if path not in seen:
                seen.add(path)
                with open(path) as fh:
                    sub = fh.read()
                out.append((os.path.relpath(path, src_dir), sub))
                walk(sub, os.path.dirname(path))

    walk(text, src_dir)
    return out


@dataclass(frozen=True)
class Unit:
    """One module to compile: source text from src_dir (quoted includes resolve there), nvcc flags, arch."""
    name: str          # the module's name, e.g. "gemm_tma.cu#tma128"
    text: str
    src_dir: str
    options: tuple     # nvcc flags other than -arch and -I, e.g. ("-std=c++17", "-DGEMM_TMA_BN=128")
    arch: str
    nice: int = 0      # how much lower the priority of its nvcc than this process's (not part of the key)

    def key(self):
        """<readable name>-<hash of everything that makes the binary>."""
        debug = getattr(sys.modules.get("pycuda.driver"), "CUDA_DEBUGGING", False)   # pycuda then adds -g -G
        h = hashlib.sha256()
        parts = [FORMAT, self.arch, *self.options, "--", nvcc_version(), pycuda_version(), f"debug={bool(debug)}",
                 self.text]
        for path, body in headers(self.text, self.src_dir):
            parts += [path, body]
        for p in parts:
            b = p.encode()
            h.update(b"%d:" % len(b) + b)
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name) + "-" + h.hexdigest()[:40]

    def compile(self):
        return compile_cubin(self.text, self.arch, self.options, [self.src_dir])


def _flock(path, wait):
    """An open descriptor of path (made if missing) holding its exclusive lock, or None when wait is False and
    another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Cache:
    """The entries of one folder. get_all returns {unit name: cubin}; `compiled` lists the units this object
    compiled (the others were there, or another process compiled them meanwhile)."""

    def __init__(self, folder):
        self.dir = folder
        self.compiled = []
        self._mu = threading.Lock()

    def _path(self, key):
        return os.path.join(self.dir, key + ".cubin")

    def load(self, key):
        """The entry's cubin, or None when there is none or it is not whole (its checksum fails)."""
        try:
            with open(self._path(key), "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            return None
        data = blob[:-_DIGEST]
        if len(blob) <= _DIGEST or hashlib.sha256(data).digest() != blob[-_DIGEST:]:
            return None
        return data

    def _store(self, key, data):
        for stale in glob.glob(os.path.join(glob.escape(self.dir), glob.escape(key) + ".*.tmp")):
            os.unlink(stale)   # left by a writer that died: we hold the lock, so nobody is writing it
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=key + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.write(hashlib.sha256(data).digest())
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:   # the rename itself, durable
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def _lock(self, key, wait):
        """An open descriptor holding the key's lock (closing it releases the lock), or None when wait is False and
        another process holds it."""
        return _flock(os.path.join(self.dir, key + ".lock"), wait)

    def _slot(self):
        """An open descriptor holding one of the node's compile slots (lock files in the folder beside this one):
        at most as many nvcc run at once on the node as it has cores, whatever the number of ranks. 15 ranks of 8
        threads each ran all 24 modules of the time at once on 16 cores, the longest, which sets a cold start, at 2/3
        speed. A free slot, else a wait on a random one (blocked, not polling: 15 ranks' 240 threads polling took
        cores from the compiles; many waiters spread over the slots, so a slot that frees rarely has none)."""
        folder = self.dir.rstrip(os.sep) + ".slots"
        os.makedirs(folder, exist_ok=True)
        n = node_slots()
        for i in range(n):
            fd = _flock(os.path.join(folder, f"slot-{i}.lock"), wait=False)
            if fd is not None:
                return fd
        return _flock(os.path.join(folder, f"slot-{random.randrange(n)}.lock"), wait=True)

    def get_all(self, units, threads=None, stop=None):
        """{unit.name: cubin} of every unit: loaded, or compiled (each by one process of the node) and stored; by
        up to `threads` threads of this process (default: process_threads()). Once the event `stop` is set no
        thread takes another module (the modules not taken are then missing from the result)."""
        out, todo = {}, []
        for u in units:
            key = u.key()
            data = self.load(key)
            if data is None:
                todo.append((key, u))
            else:
                out[u.name] = data
        if not todo:
            return out
        os.makedirs(self.dir, exist_ok=True)

        def done():   # (under self._mu)
            return not todo or (stop is not None and stop.is_set())

        def work():
            while True:
                with self._mu:
                    if done():
                        return
                # a compile slot first, then the first module left: the node's slots go to the modules in the order
                # given (the longest first: compile_modules), not to whichever thread holding a module gets one first
                slot, fd = self._slot(), None
                try:
                    with self._mu:   # take a module nobody is compiling, else wait on the first one left
                        if done():
                            return
                        for i, (key, _) in enumerate(todo):
                            fd = self._lock(key, wait=False)
                            if fd is not None:
                                break
                        else:
                            i = 0
                        key, u = todo.pop(i)
                    if fd is None:   # another process compiles it: wait without holding a slot
                        os.close(slot)
                        slot = None
                        fd = self._lock(key, wait=True)
                    data = self.load(key)   # another process's, finished while we waited
                    if data is None:
                        slot = self._slot() if slot is None else slot
                        with self._mu:
                            if stop is not None and stop.is_set():
                                return
                        data = at_lower_priority(u.nice, u.compile) if u.nice else u.compile()
                        self._store(key, data)
                        with self._mu:
                            self.compiled.append(u.name)
                    out[u.name] = data
                finally:
                    for d in (fd, slot):
                        if d is not None:
                            os.close(d)

        n = min(threads or process_threads(), len(todo))
        with ThreadPoolExecutor(max_workers=n) as ex:
            for f in [ex.submit(work) for _ in range(n)]:
                f.result()
        return out


def at_lower_priority(n, fn):
    """fn()'s result, run in a thread of its own whose nice value is n higher: the processes it starts (nvcc) inherit
    it. Linux's nice is a thread's, and a thread cannot take a raise back: the calling thread (a compile pool's, whose
    next module may be the longest, its first owner dead; never a rank's main thread) keeps its own."""
    box = []

    def run():
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + n))
        except (AttributeError, OSError):
            pass   # (no setpriority: the compile runs at the process's priority)
        try:
            box.append((fn(), None))
        except BaseException as e:
            box.append((None, e))

    t = threading.Thread(target=run, name="gpt2job-nvcc-later", daemon=True)
    try:
        t.start()
    except RuntimeError:   # ("can't start new thread": compile here, at this thread's priority)
        return fn()
    t.join()
    data, err = box[0]
    if err is not None:
        raise err
    return data


def node_slots():
    """How many nvcc may run at once on this node: its cores (not this rank's binding: the slots are the node's)."""
    return max(2, os.cpu_count() or 1)


def process_threads():
    """How many nvcc this process runs at once at most: the cores it may run on (its nvcc inherit its binding:
    under Slurm's --cpus-per-task, or mpirun's binding, no more), not above the node's slots. A job's only worker,
    unbound (run_inference.sh), fills the node's cores as 15 workers do."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    return max(1, min(mine, node_slots()))


class Background:
    """compile_modules in a thread of this process (prebuild.compile_ahead): cancel() stops it taking modules (those
    compiling finish); compile_modules of this process into the same folder first waits for it to end."""

    def __init__(self, jobs, folder):
        self.folder, self.stop = folder, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(jobs,), name="gpt2job-compile-ahead", daemon=True)

    def _run(self, jobs):
        try:
            _compile(jobs, self.folder, None, self.stop)
        except Exception:
            pass   # the backend's own compile_modules repeats the failing compile and reports it
        finally:
            with _background_mu:
                if _background.get(self.folder) is self:
                    del _background[self.folder]

    def cancel(self):
        self.stop.set()


_background = {}   # folder -> the Background compiling into it in this process
_background_mu = threading.Lock()


def compile_in_background(jobs, folder):
    """A started Background compiling the jobs (compile_modules' arguments) into folder, or None where no thread
    could start."""
    bg = Background(jobs, folder)
    with _background_mu:
        _background[folder] = bg
    try:
        bg.thread.start()
    except RuntimeError:   # ("can't start new thread")
        with _background_mu:
            del _background[folder]
        return None
    return bg


def compile_first(job):
    """Sort key of a job: its place in COMPILE_FIRST (the rest after, in their order)."""
    return next((i for i, p in enumerate(COMPILE_FIRST) if job[0] == p or job[0].startswith(p + "#")),
                len(COMPILE_FIRST))


def compile_modules(jobs, folder, threads=None):
    """{module: cubin} of the jobs ((module, source file, nvcc defines, arch): kernels.module_jobs), from the kernel
    cache in folder, compiled into it where missing (nvcc in parallel threads, no GPU context needed; those of
    COMPILE_FIRST first); and the list of modules this call compiled. A Background of this process compiling into
    the folder is waited for first: the two would lock the same modules, and where flock is per process (NFS) the
    locks would not keep them apart."""
    with _background_mu:
        bg = _background.get(folder)
    if bg is not None:
        bg.thread.join()
    return _compile(jobs, folder, threads, None)


def _compile(jobs, folder, threads, stop):
    src = cuda_src_dir()
    units = []
    jobs = sorted(jobs, key=compile_first)
    first = compile_first(jobs[0]) if jobs else 0   # (not tma128pp's place where it is not compiled: pre-Hopper)
    for job in jobs:
        key, fname, defs, arch = job
        with open(os.path.join(src, fname)) as fh:
            units.append(Unit(key, fh.read(), src, ("-std=c++17", *defs), arch,
                              0 if compile_first(job) == first else LATER_NICE))
    cache = Cache(folder)
    return cache.get_all(units, threads, stop), cache.compiled
