"""CPU placement for `homing bench --pin`: the server under test on some cores, the load on others.

On a small machine the load processes and the server share every core, and the scheduler's
run-queue waits land on whichever process waited: a send scheduled while a load process waits
for a core leaves late, and the broker that waits for one answers late. Both count as latency.
With `--pin` the server under test (`homing serve`, or a peer server whose pid is visible) runs
on the first half of the CPUs this process may use and every load process on the other half, so
neither side's work waits for the other's. The same placement applies to homing and to each
peer. Linux only (sched_setaffinity); docs/BENCHMARKS.md, "CPU placement".

Whether pinned or not, the load processes run under SCHED_BATCH by default (`--load-sched`): a
load process woken by the server's write then waits for a free core instead of preempting the
server mid-work. Clients on machines of their own cost a server nothing; these cost it no more
than sharing its cores must. They get as much CPU as before; only wake-up preemption is off
(docs/BENCHMARKS.md, "Method").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


class PlacementError(RuntimeError):
    """The CPUs cannot be split, or a process cannot be pinned."""


def plan(available: Iterable[int] | None = None) -> dict[str, list[int]]:
    """Split the CPUs this process may use: {"server": first half, "load": the rest}.

    With an odd count the load gets the extra CPU (it runs more processes than the server).
    """
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            raise PlacementError("--pin needs sched_setaffinity (Linux)")
        available = os.sched_getaffinity(0)
    cpus = sorted(available)
    if len(cpus) < 2:
        raise PlacementError(f"--pin needs at least 2 CPUs; this process may use {len(cpus)}")
    half = len(cpus) // 2
    return {"server": cpus[:half], "load": cpus[half:]}


def server_cpus(opts: dict) -> list[int] | None:
    """The CPUs of the server under test in a run with these options (None: not pinned)."""
    chosen = opts.get("placement")
    return chosen["server"] if chosen else None


def load_cpus(opts: dict) -> list[int] | None:
    """The CPUs of the load processes in a run with these options (None: not pinned)."""
    chosen = opts.get("placement")
    return chosen["load"] if chosen else None


LOAD_SCHEDS = ("batch", "normal")


def default_load_sched() -> str:
    """SCHED_BATCH where the platform has it (Linux), else the normal policy."""
    return "batch" if hasattr(os, "SCHED_BATCH") else "normal"


def load_sched(opts: dict) -> str:
    """The scheduling policy of the load processes in a run with these options."""
    return opts.get("load_sched") or "normal"


def set_sched(policy: str) -> None:
    """Run the calling process (and the threads it starts later) under `policy`: "batch" is
    SCHED_BATCH (woken, it does not preempt a running process), "normal" leaves it as it is."""
    if policy == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    elif policy != "normal":
        raise PlacementError(f"unknown scheduling policy {policy!r}")


def pin_self(cpus: Iterable[int] | None) -> None:
    """Put the calling process (and the threads it starts later) on `cpus`; None: leave it."""
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))


@contextlib.contextmanager
def pinned(pid: int, cpus: Iterable[int]) -> Iterator[None]:
    """Every thread of the running process `pid` on `cpus` for the block, then as it was.

    Threads it starts meanwhile inherit the placement of the thread that starts them.
    """
    wanted = set(cpus)
    before: dict[int, set[int]] = {}
    try:
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                old = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, wanted)
                before[tid] = old
    except PermissionError as exc:
        _restore(before)
        raise PlacementError(f"cannot pin process {pid}: {exc}") from None
    try:
        yield
    finally:
        _restore(before)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError as exc:
        raise PlacementError(f"cannot see the threads of process {pid}: {exc}") from None


def _restore(before: dict[int, set[int]]) -> None:
    for tid, old in before.items():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, old)
