"""A job spread over several hosts with a hostfile gives the same output as one host.

Three "hosts" are made on this machine with network namespaces: gjmh<pid>-h1..h3, each with one
veth interface (10.213.0.1..3/24) plugged into a bridge inside a fourth namespace gjmh<pid>-sw. Nothing
is added to the machine's own network namespace, and no traffic leaves the test's namespaces.
mpirun runs in host 1 with a hostfile naming the three addresses; PRRTE starts its daemons on hosts 2
and 3 through tests/netns_agent.sh (instead of ssh), which enters the host's namespace and gives it its
own hostname (UTS namespace). Open MPI is held to TCP on the test subnet (out-of-band and MPI traffic).

Needs root, `ip` (iproute2), `unshare` (util-linux) and mpirun; otherwise it skips.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_HF, VOCAB_DIR, job_env, read_output, run_gpt2job, write_token_input

SUBNET = "10.213.0.0/24"
N_HOSTS = 3
AGENT = ROOT / "tests" / "netns_agent.sh"
PREFIX = f"gjmh{os.getpid()}-"


def _ip(*args, check=True):
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {p.stderr.strip() or p.returncode}")
    return p


def _our_namespaces(prefix=None):
    p = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    if prefix is None:  # stale ones from an earlier run that was killed (its pid is gone)
        out = []
        for n in names:
            pid = n[4:].split("-")[0] if n.startswith("gjmh") else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                out.append(n)
        return out
    return [n for n in names if n.startswith(prefix)]


def _remove_namespaces(names):
    for ns in names:
        # end what we started in it (mpirun, daemons, ranks), then the namespace and its veths
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)


def _skip_reason():
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, pkg in (("ip", "iproute2"), ("unshare", "util-linux"), ("mpirun", "Open MPI")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found ({pkg})"
    return None


@pytest.fixture(scope="module")
def hosts():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _remove_namespaces(_our_namespaces())
    sw = PREFIX + "sw"
    names = [f"{PREFIX}h{i}" for i in range(1, N_HOSTS + 1)]
    try:
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(names, 1):
            _ip("netns", "add", ns)
            _ip("-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"10.213.0.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # UTS namespaces (a hostname per fake host) must work too
        p = subprocess.run(["ip", "netns", "exec", names[0], "unshare", "--uts", "sh", "-c",
                            f"hostname {names[0]} && hostname"], capture_output=True, text=True, timeout=30)
        if p.returncode or p.stdout.strip() != names[0]:
            raise RuntimeError(f"cannot enter a namespace with its own hostname: {p.stderr.strip()}")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        _remove_namespaces(_our_namespaces(PREFIX))
        pytest.skip(f"cannot make network namespaces here: {e}")
    try:
        yield names
    finally:
        _remove_namespaces(_our_namespaces(PREFIX))
        left = _our_namespaces(PREFIX)
        assert not left, f"namespaces left behind: {left}"


def multihost_cmd(hostfile, args, np_):
    mpirun = ["mpirun", "-np", str(np_), "--hostfile", str(hostfile), "--map-by", "node",
              "--prtemca", "plm_ssh_agent", str(AGENT),
              "--prtemca", "oob_tcp_if_include", SUBNET,
              "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", SUBNET,
              sys.executable, "-m", "gpt2job"] + [str(a) for a in args]
    return mpirun


def test_three_hosts_give_the_same_output_as_one(tmp_path, hosts, expected):
    rows = expected.prompts * 4          # 48 prompts, chunk size 1: work spreads over both workers
    inp = tmp_path / "in.h5"
    write_token_input(inp, rows)

    # local vocabulary files when present: no tokenizer download is tried (it could not reach out anyway)
    vocab = ["--vocab-dir", VOCAB_DIR] if (VOCAB_DIR / "vocab.bpe").is_file() else []

    def args(out):
        return ["run", inp, out, "--model", TINY_HF, "--max-new-tokens", 10, "--backend", "numpy",
                "--chunk-size", 1, "--temperature", 1.5, "--top-k", 40, "--top-p", 0.95, "--seed", 77] + vocab

    one = tmp_path / "one.h5"
    run_gpt2job(args(one), np_=3, check=0, timeout=60)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"10.213.0.{i} slots=1\n" for i in range(1, N_HOSTS + 1)))
    many = tmp_path / "many.h5"
    env = job_env(TESTS_NETNS_PREFIX=PREFIX)
    # mpirun itself runs on host 1, in its namespace with its own hostname
    cmd = ["ip", "netns", "exec", hosts[0], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
           hosts[0]] + multihost_cmd(hostfile, args(many), N_HOSTS)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"3-host job hung\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"

    a, b = read_output(one), read_output(many)
    assert a["done"].all() and b["done"].all()
    assert [t.tolist() for t in b["tokens"]] == [t.tolist() for t in a["tokens"]]
    assert b["finish"] == a["finish"]
    assert b["attrs"]["finished"] == 1
    if "text" in a:
        assert b["text"] == a["text"]
    # the workers really ran on the other two hosts, and they did the work
    workers = json.loads(b["attrs"]["summary"])["workers"]
    assert {w["rank"] for w in workers} == {1, 2}
    assert all(w["host"] in (hosts[1], hosts[2], "?") for w in workers), workers
    assert sum(w["rows"] for w in workers) == len(rows)
    assert any(w["host"] in (hosts[1], hosts[2]) and w["rows"] > 0 for w in workers), workers
