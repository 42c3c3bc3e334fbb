"""The kernel registry's record type: every kernel of cuda_src/ that a launcher calls is one Kernel, made by
register() beside its launcher (kernels.py, kernels_select.py) and listed in KERNELS, from which Kernels compiles
each source once and checks each signature (tests/test_cuda_host.py)."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Kernel:
    """A kernel of cuda_src/<source>, launched with blocks of `threads` threads."""
    name: str
    source: str
    signature: str
    threads: int
    block: tuple = field(init=False, repr=False)   # (threads, 1, 1)

    def __post_init__(self):
        object.__setattr__(self, "block", (self.threads, 1, 1))


KERNELS = []   # every Kernel record, in the order they are registered


def register(name, source, signature, threads):
    k = Kernel(name, source, signature, threads)
    KERNELS.append(k)
    return k
