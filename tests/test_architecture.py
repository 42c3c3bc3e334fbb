"""The layout holds: every import of gpt2job points down the layers (or within one), there is no import cycle,
and no module grows past ~400 lines. The layers, lowest first (ARCHITECTURE.md draws them):"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gpt2job"
LAYERS = [
    ("gpt2job", "gpt2job.errors", "gpt2job.envs"),   # the package, errors, environment
    ("gpt2job.chunks", "gpt2job.settings"),           # plain data crossing every seam
    ("gpt2job.model",),                               # config, weights, tokenizer, NumPy GPT-2, sampling
    ("gpt2job.files",),                               # prompts in, journal + HDF5 out, show, validate
    ("gpt2job.backends",),                            # NumPy and CUDA backends
    ("gpt2job.cluster",),                             # job, master, worker, channel, scheduler
    ("gpt2job.cli", "gpt2job.__main__"),              # the command line
]
MAX_LINES = 400
LONG_OK = {}   # module -> why it is better whole


def layer(mod):
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or (p != "gpt2job" and mod.startswith(p + ".")):
                best = i
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best


def modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(mod, path):
    """Every gpt2job module this one imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{mod}: relative import (write `from gpt2job.x import y`)"
            if node.module and node.module.split(".")[0] == "gpt2job":
                for a in node.names:   # `from gpt2job.x import submodule` imports gpt2job.x.submodule
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                            or (PKG.parent / sub.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "gpt2job")
    out.discard(mod)
    return out


def test_imports_point_down_the_layers_and_never_in_a_cycle():
    graph = {mod: imports(mod, path) for mod, path in modules()}
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)
    # cycles, by depth-first search over the whole graph (imports inside functions included)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    # a package importing its own submodule (gpt2job.backends -> gpt2job.backends.numpy_backend, lazily) is no
    # cycle of modules a reader must untangle when the submodule needs only the package's interface
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_no_module_is_too_long_to_read():
    long = {mod: n for mod, path in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_OK), f"modules over {MAX_LINES} lines: {long}"
