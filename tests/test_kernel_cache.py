"""The node's kernel cache (gpt2job/backends/cuda/kcache.py) without a GPU: the key follows everything that makes
the binary; processes asking for one module at once compile it once and all load the same bytes; different modules
compile at once across processes; a dead writer or a killed compiler leaves no entry that loads; `build-kernels`
fills the cache and a second run compiles nothing. Tiny sources (or a stand-in compiler) except one real module."""
import hashlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
import types

import pytest

from gpt2job import cli, envs
from gpt2job.backends.cuda import cuda_src_dir, kcache, nvcc
from gpt2job.backends.cuda.kcache import Cache, Unit

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
TINY = 'extern "C" __global__ void add(float *x, float v) { x[threadIdx.x] += v; }\n'
fork = multiprocessing.get_context("fork")


class Counted(Unit):
    """A unit whose compiles are counted in a file (one line per compile, any process), optionally slow, or done by
    a stand-in that returns the text's hash instead of running nvcc; with a rendezvous (a barrier), each compile
    waits there for another process's compile to reach it too."""
    log = slow = fake = rendezvous = None

    def compile(self):
        with open(Counted.log, "a") as fh:
            fh.write(f"{os.getpid()} {self.name}\n")
        if Counted.slow:
            time.sleep(Counted.slow)
        if Counted.rendezvous is not None:
            Counted.rendezvous.wait(timeout=60)
        return hashlib.sha256(self.text.encode()).digest() * 4 if Counted.fake else super().compile()


@pytest.fixture
def counted(tmp_path, monkeypatch):
    monkeypatch.setattr(Counted, "log", str(tmp_path / "compiles.log"))
    monkeypatch.setattr(Counted, "slow", 0)
    monkeypatch.setattr(Counted, "fake", False)
    monkeypatch.setattr(Counted, "rendezvous", None)
    open(Counted.log, "w").close()
    return lambda: [line.split() for line in open(Counted.log)]


class Spanned(Unit):
    """A stand-in compile of 0.3 s that appends its span (start, end, module name) to Spanned.log (any process)."""
    log = None

    def compile(self):
        t0 = time.time()
        time.sleep(0.3)
        with open(Spanned.log, "a") as fh:
            fh.write(f"{t0} {time.time()} {self.name}\n")
        return hashlib.sha256(self.text.encode()).digest() * 4


@pytest.fixture
def spans(tmp_path, monkeypatch):
    """Spanned units m0.cu.. (make(n)) and the spans of their compiles so far, in start order (read())."""
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(Spanned, "log", str(tmp_path / "spans"))
    open(Spanned.log, "w").close()

    def make(n, prefix="m"):
        return [Spanned(f"{prefix}{i}.cu", f"// module {prefix}{i}\n" + TINY, str(tmp_path), (), "sm_90")
                for i in range(n)]

    def read():
        return sorted((float(a), float(b), name) for a, b, name in (line.split() for line in open(Spanned.log)))
    return types.SimpleNamespace(make=make, read=read)


def most_at_once(spans):
    """The most compiles that ran at the same time."""
    running = most = 0
    for _, step in sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans]):
        running += step
        most = max(most, running)
    return most


def test_the_key_follows_source_headers_defines_arch_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "Cuda compilation tools, release 13.0")
    (tmp_path / "sub").mkdir()
    (tmp_path / "k.cu").write_text('#include "a.cuh"\n#include <cuda_fp16.h>\n' + TINY)
    (tmp_path / "a.cuh").write_text('#pragma once\n#include "sub/b.cuh"\n')
    (tmp_path / "sub" / "b.cuh").write_text('#pragma once\n#include "c.cuh"\n#define B 1\n')   # c.cuh: next to b
    (tmp_path / "sub" / "c.cuh").write_text("#define C 1\n")
    (tmp_path / "unused.cuh").write_text("#define U 1\n")

    def key(defines=("-DX=1",), arch="sm_90"):
        return Unit("k.cu#x", (tmp_path / "k.cu").read_text(), str(tmp_path), ("-std=c++17", *defines), arch).key()

    k0 = key()
    assert k0 == key() and k0.startswith("k.cu_x-")
    assert [p for p, _ in kcache.headers((tmp_path / "k.cu").read_text(), str(tmp_path))] == [
        "a.cuh", os.path.join("sub", "b.cuh"), os.path.join("sub", "c.cuh")]
    seen = {k0}
    for change in ("define", "arch", "source", "header", "nested header", "nvcc"):
        if change == "define":
            k = key(("-DX=2",))
        elif change == "arch":
            k = key(arch="sm_90a")
        elif change == "source":
            (tmp_path / "k.cu").write_text((tmp_path / "k.cu").read_text() + "// edited\n")
            k = key()
        elif change == "header":
            (tmp_path / "a.cuh").write_text((tmp_path / "a.cuh").read_text() + "#define A 2\n")
            k = key()
        elif change == "nested header":
            (tmp_path / "sub" / "c.cuh").write_text("#define C 2\n")
            k = key()
        else:
            monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "Cuda compilation tools, release 13.1")
            k = key()
        assert k not in seen, change
        seen.add(k)
    (tmp_path / "unused.cuh").write_text("#define U 2\n")   # a header no one includes
    assert key() == k


def _ask(folder, unit, threads, barrier, results):
    barrier.wait()
    t = time.time()
    c = Cache(folder)
    out = c.get_all([unit] if isinstance(unit, Unit) else unit, threads)
    results.put((os.getpid(), {n: hashlib.sha256(b).hexdigest() for n, b in out.items()}, c.compiled,
                 time.time() - t))


def _run_together(n, folder, unit, threads=8):
    barrier, results = fork.Barrier(n), fork.Queue()
    procs = [fork.Process(target=_ask, args=(folder, unit, threads, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return out


@needs_nvcc
def test_four_processes_asking_at_once_compile_once_and_load_the_same_bytes(tmp_path, counted):
    src = tmp_path / "src"
    src.mkdir()
    unit = Counted("tiny.cu", TINY, str(src), ("-std=c++17",), "sm_90")
    out = _run_together(4, str(tmp_path / "cache"), unit)
    assert len(counted()) == 1                                   # one nvcc run for the node
    assert sum(len(compiled) for _, _, compiled, _ in out) == 1
    assert len({digests["tiny.cu"] for _, digests, _, _ in out}) == 1
    data = Cache(str(tmp_path / "cache")).load(unit.key())
    assert data[:4] == b"\x7fELF" and hashlib.sha256(data).hexdigest() == out[0][1]["tiny.cu"]
    assert Cache(str(tmp_path / "cache")).get_all([unit]) == {"tiny.cu": data} and len(counted()) == 1


def test_different_modules_compile_at_once_across_processes(tmp_path, counted, monkeypatch):
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(Counted, "fake", True)
    # each compile waits for the other process's: compiles one after the other break the barrier (60 s) and fail
    monkeypatch.setattr(Counted, "rendezvous", fork.Barrier(2))
    units = [Counted(f"m{i}.cu", f"// module {i}\n" + TINY, str(tmp_path), (), "sm_90") for i in range(2)]
    out = _run_together(2, str(tmp_path / "cache"), units, threads=1)   # one thread each: parallel only across
    compiles = counted()
    assert sorted(name for _, name in compiles) == ["m0.cu", "m1.cu"]   # each once
    assert len({pid for pid, _ in compiles}) == 2                      # one by each process, at the same time
    assert out[0][1] == out[1][1]


def test_no_more_compiles_at_once_on_a_node_than_it_has_cores(tmp_path, monkeypatch, spans):
    """15 ranks of 8 threads each ran 24 nvcc at once on 16 cores, the longest module (which sets a cold start) at
    2/3 speed: a node's compiles take one of its cores' slots each (Cache._slot). Here 2 cores, 3 processes of 3
    threads asking for 6 modules: each compiled once, never more than 2 at once."""
    monkeypatch.setattr(kcache.os, "cpu_count", lambda: 2)
    _run_together(3, str(tmp_path / "cache"), spans.make(6), threads=3)
    rows = spans.read()
    assert sorted(name for _, _, name in rows) == [f"m{i}.cu" for i in range(6)]
    assert most_at_once(rows) == 2, rows


def test_the_node_s_slots_go_to_the_modules_in_order_the_longest_first(tmp_path, monkeypatch, spans):
    """A cold start waits for its longest module: 15 processes each holding some modules' locks polled for 16 slots,
    and the longest (~10 s) started seconds late. A thread now takes a slot first, then the first module left in
    the order given, which compile_modules makes the longest first (COMPILE_FIRST). 2 processes of 3 threads, 2
    slots, 6 modules: the first two to start are the first two in order."""
    monkeypatch.setattr(kcache.os, "cpu_count", lambda: 2)
    _run_together(2, str(tmp_path / "cache"), spans.make(6), threads=3)
    started = [name for _, _, name in spans.read()]
    assert sorted(started) == [f"m{i}.cu" for i in range(6)], started
    assert sorted(started[:2]) == ["m0.cu", "m1.cu"] and sorted(started[2:4]) == ["m2.cu", "m3.cu"], started
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, module_jobs
    jobs = sorted(module_jobs(F16_DEFAULT), key=kcache.compile_first)
    assert [j[0] for j in jobs[:3]] == ["gemm_tma.cu#tma128pp#outh", "gemm_tma.cu#tma128pp#outf", "gemm_f32.cu"]
    assert sorted(jobs) == sorted(module_jobs(F16_DEFAULT))


def test_one_process_compiles_with_every_slot_of_the_node(tmp_path, monkeypatch, spans):
    """A job's only worker (2 ranks) compiled with 8 threads, so on a 16-core node 29 modules queued behind 8 nvcc
    while 8 slots stayed free: a process's threads default to the node's slots (kcache.node_slots)."""
    monkeypatch.setattr(kcache.os, "cpu_count", lambda: 10)
    monkeypatch.setattr(kcache.os, "sched_getaffinity", lambda pid: set(range(10)))   # unbound (run_inference.sh)
    assert len(Cache(str(tmp_path / "cache")).get_all(spans.make(10))) == 10
    assert most_at_once(spans.read()) == 10
    # bound to 3 cores (Slurm's --cpus-per-task, mpirun's binding): its nvcc would share them, so 3 threads
    monkeypatch.setattr(kcache.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    open(Spanned.log, "w").close()
    assert len(Cache(str(tmp_path / "cache")).get_all(spans.make(6, "n"))) == 6
    assert most_at_once(spans.read()) == 3


class Niced(Unit):
    """A stand-in compile that records the nice value of a process it starts (as nvcc would be)."""
    seen = {}

    def compile(self):
        Niced.seen[self.name] = int(subprocess.run(["nice"], capture_output=True, text=True, check=True).stdout)
        return hashlib.sha256(self.text.encode()).digest() * 4


def _may_lower_priority():
    ok = []

    def lower():
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 1)
            ok.append(True)
        except (AttributeError, OSError):
            pass
    t = threading.Thread(target=lower)
    t.start()
    t.join()
    return bool(ok)


lowering = pytest.mark.skipif(shutil.which("nice") is None or not _may_lower_priority(),
                              reason="no nice command, or a thread may not lower its priority here")


@lowering
def test_the_shorter_modules_compile_at_a_lower_priority(tmp_path, monkeypatch):
    """A cold 16-rank start's longest compile took 14.2 s against 10.6 s with 2 ranks: 15 ranks' starts and the
    other nvcc took its cores. compile_modules gives every module but the first of COMPILE_FIRST a nice value
    LATER_NICE higher; the nvcc a compile thread starts inherit it; the caller's own priority is untouched."""
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(Niced, "seen", {})
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, module_jobs
    jobs = module_jobs(F16_DEFAULT)
    nices = {}

    def unit(name, text, src, options, arch, nice=0):
        nices[name] = nice
        return Niced(name, text, src, options, arch, nice)
    monkeypatch.setattr(kcache, "Unit", unit)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    kcache.compile_modules(jobs, str(tmp_path / "cache"), threads=3)
    assert {n for n, v in nices.items() if v == 0} == {"gemm_tma.cu#tma128pp#outh", "gemm_tma.cu#tma128pp#outf"}
    assert len(Niced.seen) == len(jobs)
    for name, v in Niced.seen.items():
        assert v == min(19, base + nices[name]), (name, v, base)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    nices.clear()   # before Hopper no tma128pp: gemm_f32.cu is the longest
    from gpt2job.backends.cuda.kernels import F16_DEFAULT_NOT_HOPPER
    kcache.compile_modules(module_jobs(F16_DEFAULT_NOT_HOPPER, (8, 0)), str(tmp_path / "cache80"), threads=3)
    assert {n for n, v in nices.items() if v == 0} == {"gemm_f32.cu"}


@lowering
def test_the_longest_module_compiles_at_full_priority_after_a_shorter_one_in_the_same_thread(tmp_path, monkeypatch):
    """A compile thread lowered its own nice for a shorter module, then took the longest (the rank compiling it had
    died, leaving no entry) and compiled it at nice +10 too: a thread cannot take a raise back. A lowered compile
    now runs in a thread of its own."""
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(Niced, "seen", {})
    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    longest = Niced("long.cu", TINY, str(tmp_path), (), "sm_90")
    held = [kcache._flock(os.path.join(folder, longest.key() + ".lock"), wait=False)]   # another rank compiles it

    class DeathMeanwhile(Niced):
        def compile(self):
            os.close(held.pop())   # the rank compiling the longest module dies mid-compile (no entry)
            return super().compile()
    shorter = DeathMeanwhile("short.cu", TINY + "// short\n", str(tmp_path), (), "sm_90", kcache.LATER_NICE)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    cache = Cache(folder)
    assert set(cache.get_all([longest, shorter], threads=1)) == {"long.cu", "short.cu"}
    assert cache.compiled == ["short.cu", "long.cu"]   # one thread, the shorter module first: the longest was held
    assert Niced.seen == {"short.cu": min(19, base + kcache.LATER_NICE), "long.cu": base}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_a_lowered_compile_s_error_reaches_the_caller():
    """An nvcc failure in the lowered compile's own thread is raised in the compile thread that waits for it."""
    def fail():
        raise RuntimeError("nvcc failed (exit 1)")
    with pytest.raises(RuntimeError, match="nvcc failed"):
        kcache.at_lower_priority(kcache.LATER_NICE, fail)
    assert kcache.at_lower_priority(kcache.LATER_NICE, lambda: b"cubin") == b"cubin"


def test_a_dead_writer_leaves_no_entry_and_its_leftovers_go(tmp_path, counted, monkeypatch):
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(Counted, "fake", True)
    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    unit = Counted("m.cu", TINY, str(tmp_path), (), "sm_90")
    key = unit.key()
    # a process killed while compiling, holding the lock: the system drops the lock, no entry exists
    monkeypatch.setattr(Counted, "slow", 60)
    pid = os.fork()
    if pid == 0:   # the child compiles (slowly) and is killed
        try:
            Cache(folder).get_all([unit])
        finally:
            os._exit(1)
    deadline = time.time() + 30
    while not counted() and time.time() < deadline:
        time.sleep(0.05)
    assert counted(), "the child never started compiling"
    with open(os.path.join(folder, key + ".cubin.123.tmp"), "wb") as fh:   # a half-written temp file
        fh.write(b"\x7fELF half")
    assert Cache(folder)._lock(key, wait=False) is None   # the child holds the lock
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert Cache(folder).load(key) is None
    monkeypatch.setattr(Counted, "slow", 0)
    c = Cache(folder)
    t = time.time()
    data = c.get_all([unit])["m.cu"]
    assert time.time() - t < 5 and c.compiled == ["m.cu"] and data == hashlib.sha256(TINY.encode()).digest() * 4
    assert sorted(os.listdir(folder)) == [key + ".cubin", key + ".lock"]   # the temp file is gone
    # an entry that is not whole (cut short, or not ours) is compiled again and replaced
    path = os.path.join(folder, key + ".cubin")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 1)
    assert Cache(folder).load(key) is None
    c = Cache(folder)
    assert c.get_all([unit])["m.cu"] == data and c.compiled == ["m.cu"] and Cache(folder).load(key) == data


def test_a_killed_compiler_is_an_error_and_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    fake = tmp_path / "nvcc"   # writes half a cubin, then dies by SIGKILL
    fake.write_text("#!/bin/sh\nprintf 'half a cubin' > kernel.cubin\nkill -9 $$\n")
    fake.chmod(0o755)

    class Killed(Unit):
        def compile(self):
            return nvcc.nvcc_cubin(self.text, self.arch, self.options, [self.src_dir], nvcc=str(fake))

    folder = str(tmp_path / "cache")
    unit = Killed("m.cu", TINY, str(tmp_path), (), "sm_90")
    with pytest.raises(RuntimeError, match="nvcc failed"):
        Cache(folder).get_all([unit])
    assert Cache(folder).load(unit.key()) is None
    assert [f for f in os.listdir(folder) if not f.endswith(".lock")] == []


@needs_nvcc
def test_a_real_module_is_the_plain_nvcc_cubin(tmp_path):
    src = cuda_src_dir()
    unit = Unit("sampling.cu", open(os.path.join(src, "sampling.cu")).read(), src, ("-std=c++17",), "sm_90")
    data = Cache(str(tmp_path)).get_all([unit])["sampling.cu"]
    out = tmp_path / "plain.cubin"   # the command tests/test_cuda_compile.py runs
    subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-I", src, "-o", str(out),
                    os.path.join(src, "sampling.cu")], check=True, capture_output=True)
    assert data == out.read_bytes()


def stand_in_compiles(monkeypatch, compile, cache):
    """kcache's compiles done by `compile` (compile_cubin's arguments), the nvcc version a stand-in, no GPT2JOB_*
    variable set but the kernel cache's folder, `cache`."""
    monkeypatch.setattr(kcache, "compile_cubin", compile)
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    monkeypatch.setattr(envs, "_values", {})
    for name in envs.VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPT2JOB_PYCUDA_CACHE", str(cache))


def test_build_kernels_fills_the_cache_and_a_second_run_compiles_nothing(tmp_path, monkeypatch, capsys):
    from gpt2job.backends.cuda.kernels import F16_DEFAULT, F16_DEFAULT_NOT_HOPPER, module_jobs
    made = []

    def stand_in(text, arch, options, include_dirs):
        made.append((arch, options))
        return hashlib.sha256(repr((text, arch, options)).encode()).digest()

    stand_in_compiles(monkeypatch, stand_in, tmp_path)
    hopper = module_jobs(F16_DEFAULT)
    assert cli.main(["build-kernels", "--arch", "sm_90a"]) == 0
    assert len(made) == len(hopper) and f"{len(hopper)} compiled, 0 already there" in capsys.readouterr().out
    folder = kcache.cache_dir()
    assert os.path.dirname(folder) == str(tmp_path)
    assert len([f for f in os.listdir(folder) if f.endswith(".cubin")]) == len(hopper)
    assert {a for a, _ in made} == {"sm_90", "sm_90a"}
    assert cli.main(["build-kernels", "--arch", "sm_90a"]) == 0
    assert len(made) == len(hopper) and f"0 compiled, {len(hopper)} already there" in capsys.readouterr().out
    other = module_jobs(F16_DEFAULT_NOT_HOPPER, (8, 0))   # another GPU: the mma.sync tiles, built for its own arch
    assert cli.main(["build-kernels", "--arch", "sm_80"]) == 0
    assert len(made) == len(hopper) + len(other) and f"{len(other)} compiled, 0 already there" in capsys.readouterr().out
    assert {a for a, _ in made[len(hopper):]} == {"sm_80"}   # an sm_90 cubin would not load there
    assert cli.main(["build-kernels", "--arch", "hopper"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert cli.main(["build-kernels", "--arch", "sm_75"]) == 2   # (nvcc's traceback, exit 1)
    assert "compute capability 8.0 or later" in capsys.readouterr().err
    (tmp_path / "file").write_text("")   # a file where the cache folder should be (tracebacks before)
    monkeypatch.setenv("GPT2JOB_PYCUDA_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(envs, "_values", {})
    assert cli.main(["build-kernels", "--arch", "sm_90a"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "GPT2JOB_PYCUDA_CACHE: cannot write the kernel cache" in err, err


def test_a_worker_compiles_its_kernels_while_it_reads_its_weights(tmp_path, monkeypatch):
    """backends.start_backend -> prebuild.compile_ahead: the modules of the worker's GPU (gpu_slot modulo the node's
    GPUs, its compute capability) start compiling in a background thread before the weights are read; the
    backend's own compile (Kernels: compile_modules) then waits on their locks, finds them, or compiles the ones
    not begun yet: each module once. Without a GPU driver nothing starts."""
    from gpt2job import backends
    from gpt2job.backends.cuda import prebuild
    from gpt2job.backends.cuda.kernels import F16_DEFAULT_NOT_HOPPER, module_jobs
    monkeypatch.setattr(kcache.os, "cpu_count", lambda: 2)
    made, entered, started, release = [], [], threading.Event(), threading.Event()

    def stand_in(text, arch, options, include_dirs):
        entered.append(arch)
        if len(entered) == 2:   # both slots compiling
            started.set()
        release.wait(10)   # the weights still loading
        made.append((arch, options))
        return hashlib.sha256(repr((text, arch, options)).encode()).digest()

    asked = []
    dev = lambda i: asked.append(i) or types.SimpleNamespace(compute_capability=lambda: (8, 0))  # noqa: E731
    drv = types.SimpleNamespace(Device=dev)
    dev.count = lambda: 2
    monkeypatch.setattr(prebuild, "init_driver", lambda: drv)
    monkeypatch.setattr(backends, "pycuda_available", lambda: True)
    stand_in_compiles(monkeypatch, stand_in, tmp_path)
    jobs = module_jobs(F16_DEFAULT_NOT_HOPPER, (8, 0))
    bg = prebuild.compile_ahead(3)
    assert asked == [1] and bg is not None and started.wait(10) and not made
    release.set()
    cubins, compiled = kcache.compile_modules(jobs, kcache.cache_dir())   # what Kernels runs: it waits for bg
    assert not bg.thread.is_alive() and len(made) == len(jobs) and len(cubins) == len(jobs) and compiled == []
    assert {a for a, _ in made} == {"sm_80"} and kcache._background == {}

    # a start that fails cancels it: the compiles running (2 slots) end, no other begins
    made.clear(), entered.clear(), started.clear(), release.clear()
    monkeypatch.setenv("GPT2JOB_PYCUDA_CACHE", str(tmp_path / "second"))   # (an empty cache)
    monkeypatch.setattr(envs, "_values", {})
    bg = prebuild.compile_ahead(0)
    assert started.wait(10)
    bg.cancel()
    release.set()
    bg.thread.join(30)
    assert not bg.thread.is_alive() and len(made) == 2
    cubins, compiled = kcache.compile_modules(jobs, kcache.cache_dir())
    assert len(cubins) == len(jobs) and len(compiled) == len(jobs) - 2

    def no_driver():
        raise RuntimeError("cuInit failed")
    monkeypatch.setattr(prebuild, "init_driver", no_driver)
    assert prebuild.compile_ahead(0) is None
    monkeypatch.setattr(prebuild, "compile_ahead", lambda slot: asked.append(("ahead", slot)))
    backends.start_backend("numpy", 5)
    backends.start_backend("cuda", 5)
    assert asked[-1] == ("ahead", 5) and ("ahead", 5) not in asked[:-1]


def test_a_cancelled_compile_does_not_begin_a_module_it_waited_for(tmp_path, monkeypatch):
    """A thread of a cancelled compile (Background.cancel) that waited on a module another process was compiling,
    and finds no entry when that lock comes free, compiles nothing: it ends (a failed start does not wait a whole
    compile more at its exit)."""
    monkeypatch.setattr(kcache, "nvcc_version", lambda nvcc="nvcc": "stand-in")
    compiled = []

    class Noted(Unit):
        def compile(self):
            compiled.append(self.name)
            return b"x" * 64

    unit = Noted("m.cu", TINY, str(tmp_path), (), "sm_90")
    cache = Cache(str(tmp_path / "cache"))
    os.makedirs(cache.dir)
    held = cache._lock(unit.key(), wait=True)   # "another process" compiles it (flock: per open file)
    stop = threading.Event()
    t = threading.Thread(target=cache.get_all, args=([unit], 1, stop))
    t.start()
    time.sleep(0.3)                              # the thread waits on the module's lock
    stop.set()
    os.close(held)                               # the other ends without an entry
    t.join(10)
    assert not t.is_alive() and compiled == []


def test_a_worker_whose_start_fails_cancels_its_compiles_ahead(monkeypatch):
    """The compile ahead holds the process at its exit until its threads end (concurrent.futures joins them): a
    worker whose build fails (a wrong --model) cancels it, so it ends after the compiles running, not the node's set."""
    from gpt2job.cluster import worker
    from gpt2job.errors import UserError
    handle = types.SimpleNamespace(cancelled=False)
    handle.cancel = lambda: setattr(handle, "cancelled", True)
    monkeypatch.setattr(worker, "start_backend", lambda name, slot: handle)

    def no_model(spec):
        raise UserError("no such model", spec, "--model", "give a model")
    monkeypatch.setattr(worker, "load_params", no_model)
    with pytest.raises(UserError):
        worker.build_backend(types.SimpleNamespace(backend="cuda", model="/nowhere"), 0)
    assert handle.cancelled


def test_build_kernels_without_nvcc_or_for_an_arch_nvcc_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(envs, "_values", {})
    monkeypatch.setenv("GPT2JOB_PYCUDA_CACHE", str(tmp_path))
    if shutil.which("nvcc"):
        kcache.nvcc_version.cache_clear()
        assert cli.main(["build-kernels", "--arch", "sm_1000"]) == 2   # nvcc's traceback before
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "cannot compile for sm_1000 (fix: give one it knows: sm_80" in err
    monkeypatch.setenv("PATH", str(tmp_path))

    def refused():   # build-kernels with the nvcc on PATH now (its version asked afresh): exit 2, stderr
        kcache.nvcc_version.cache_clear()
        try:
            assert cli.main(["build-kernels", "--arch", "sm_90a"]) == 2
        finally:
            kcache.nvcc_version.cache_clear()
        return capsys.readouterr().err
    err = refused()
    assert err == "gpt2job: error: nvcc: not found on PATH (the CUDA kernels are compiled by nvcc, CUDA 12+) (fix: " \
        "put the CUDA toolkit's bin folder on PATH, e.g. module load cuda)\n", err
    (tmp_path / "nvcc").write_text("#!/bin/sh\necho 'line one error' >&2\necho 'line two' >&2\nexit 1\n")
    (tmp_path / "nvcc").chmod(0o755)   # an nvcc that does not run: its first line, in the one line
    err = refused()
    assert err == "gpt2job: error: nvcc: `nvcc --version` failed (line one error) (fix: put the CUDA toolkit's bin " \
        "folder on PATH, e.g. module load cuda)\n", err
