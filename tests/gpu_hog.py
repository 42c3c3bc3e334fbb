"""Hold a GPU's memory for a test: another process that leaves only --leave-mib MiB free, with plain device
allocations (cuMemAlloc), until its standard input closes (or it is killed).

    python tests/gpu_hog.py --leave-mib 2560 [--device 0]

Prints 'hog ready: N MiB free' once the memory is held (the GPU is chosen by --device among the visible ones)."""
import argparse
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--leave-mib", type=float, required=True, help="MiB of device memory to leave free")
    ap.add_argument("--device", type=int, default=0)
    a = ap.parse_args()
    import pycuda.driver as drv
    drv.init()
    ctx = drv.Device(a.device).make_context()
    leave = int(a.leave_mib * 2 ** 20)
    held = []
    try:
        for piece in (1 << 30, 1 << 26, 1 << 22):     # 1 GiB pieces, then 64 MiB, then 4 MiB
            while True:
                free = drv.mem_get_info()[0]
                if free - leave < piece:
                    break
                held.append(drv.mem_alloc(piece))
        free = drv.mem_get_info()[0]
        print(f"hog ready: {free / 2 ** 20:.0f} MiB free, {len(held)} buffers held", flush=True)
        sys.stdin.read()              # until the test closes our stdin
    finally:
        for b in held:
            b.free()
        ctx.pop()
        ctx.detach()


if __name__ == "__main__":
    main()
