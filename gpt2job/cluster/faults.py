"""Fault injection for tests: a plan of which rank fails on which chunk, and how. The plan wraps a worker's
backend (inject), so the production worker loop holds no test code.

Plan text (tests pass it in GPT2JOB_FAULT): RANK:K:MODE[,...]: rank RANK fails on its K-th chunk (K=0: during
start-up) with MODE raise (an exception), hang (stops answering) or exit (the process dies)."""
import os
import time

from gpt2job.errors import UserError

MODES = ("raise", "hang", "exit")


class InjectedFault(RuntimeError):
    pass


def parse_plan(text):
    """-> {rank: {chunk number: mode}}"""
    plan = {}
    for item in filter(None, (text or "").split(",")):
        try:
            r, k, mode = item.split(":")
            r, k = int(r), int(k)
        except ValueError:
            r = k = mode = None
        if mode not in MODES:
            raise UserError(f"{item!r} is not RANK:K:MODE with MODE one of {', '.join(MODES)}", None,
                            "GPT2JOB_FAULT", "unset it (it is for tests only)")
        plan.setdefault(r, {})[k] = mode
    return plan


def act(mode, rank, n):
    if mode == "raise":
        raise InjectedFault(f"injected fault on rank {rank}, chunk #{n}")
    if mode == "hang":
        while True:
            time.sleep(60)
    os._exit(17)


class FaultyBackend:
    """A backend that fails as planned on its n-th chunk, else does what the backend it wraps does."""

    def __init__(self, backend, faults, rank):
        self.inner, self.faults, self.rank, self.n = backend, faults, rank, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self):
        self.n += 1
        if self.n in self.faults:
            act(self.faults[self.n], self.rank, self.n)
        return (yield from self.inner.run())


def inject(backend, plan, rank):
    """The backend as rank `rank` runs it under the plan (start-up faults happen here)."""
    faults = plan.get(rank)
    if not faults:
        return backend
    if 0 in faults:
        act(faults[0], rank, 0)
    return FaultyBackend(backend, faults, rank)
