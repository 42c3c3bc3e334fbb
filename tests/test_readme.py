"""Every command the README shows runs as written on a fresh machine (issue 13): its code blocks are taken from
README.md and run in order, in a folder with copies of run_inference.sh, hostfile and jobs/, with no MPI
settings in the environment (as root too: the commands must carry what Open MPI needs). `PATH` (the user's
model) becomes a tiny random model with GPT-2's vocabulary; nothing else is changed."""
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import ROOT, SUITE_MPI_VARS, TINY_TEXT_MODEL, require_mpirun

SHELL = re.compile(r"^(python3? |\./run_inference\.sh|mpirun |bash |NP=\d+ )")
NOT_RUN = {   # command -> why this test does not run it
    "python3 -m pip install -e '.[test]'": "installs from the network (this test runs in that very install)",
    "python3 -m pytest -q -n auto tests": "the test suite itself",
}
NEEDS_GPU = re.compile(r"--backend cuda|float16|gpu_check")


def code_blocks(text):
    """The indented code blocks of a Markdown text, in order, each a list of lines (indent removed)."""
    blocks, current, prev_blank = [], None, True
    for line in text.splitlines():
        if line.startswith("    ") and (current is not None or prev_blank):
            current = current if current is not None else []
            current.append(line[4:])
        elif current is not None:
            blocks.append(current)
            current = None
        prev_blank = not line.strip()
    if current is not None:
        blocks.append(current)
    return blocks


def readme_steps():
    """(kind, text) in README order: ("shell", a command line) or ("python", a Python block)."""
    steps = []
    for block in code_blocks((ROOT / "README.md").read_text()):
        if SHELL.match(block[0]):
            steps += [("shell", re.sub(r"\s+#\s.*$", "", line).strip()) for line in block if line.strip()]
        elif block[0].startswith(("import ", "from ")):
            steps.append(("python", "\n".join(block)))
    return steps


def test_the_readme_shows_the_commands_of_a_first_job():
    shell = [t for k, t in readme_steps() if k == "shell"]
    assert any(t.startswith("./run_inference.sh") for t in shell)
    assert any(t.startswith("mpirun ") for t in shell)
    assert any(t.startswith("python -m gpt2job prompts") for t in shell)


def test_every_readme_command_runs_as_written(tmp_path, vocab_dir):
    require_mpirun()
    for name in ("run_inference.sh", "hostfile"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    # a fresh machine: the test suite's own MPI settings (allow-root, oversubscribe) and GPT2JOB_ ones removed
    env = {k: v for k, v in os.environ.items() if k not in SUITE_MPI_VARS and not k.startswith("GPT2JOB_")}
    env.update(PYTHONPATH=str(ROOT), GPT2_VOCAB_DIR=vocab_dir,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    ran = []
    for kind, text in readme_steps():
        if kind == "python":
            cmd = [sys.executable, "-c", text]
        elif text in NOT_RUN or (NEEDS_GPU.search(text) and not shutil.which("nvidia-smi")):
            continue
        else:
            text = re.sub(r"\bPATH\b", shlex.quote(TINY_TEXT_MODEL), text)
            cmd = ["bash", "-c", text]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"README command failed (exit {p.returncode}): {text}\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr, p.stderr
        ran.append(text)
    assert len(ran) >= 5, ran
    assert (tmp_path / "out.h5").exists()
