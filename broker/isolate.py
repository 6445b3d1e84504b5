"""Isolating the commands of a batch that met a damaged projection row (`Committer._settle`).

`Store.execute` runs a batch all or nothing: a command whose work reads a row that does not
decode (`CorruptProjection`) fails the whole batch, the other users' commands queued with it
included. `isolate` runs such a batch's commands again in halves, recursively, each half in a
batch of its own (its own transaction and commit), down to single commands: only the commands
whose own work meets a damaged row fail, each with its own CorruptProjection; every other one
commits, in the original order (the left half before the right: a later command is decided on
what the earlier ones committed, as in the batch, but for the failed ones, which did not
happen).

Bounded: a half that fails with CorruptProjection is split, and a single command that fails is
final, so a batch of n commands runs at most 2n - 2 more batches (all of them when every command
meets the damage), one more per half with one command that fails, about 2 log2(n) for one
damaged command among n. A batch of one command is not handed here: the committer fails it
at once (handed one, `isolate` would run it once more). Any other failure of a half
(`StorageFull`, another storage error, a bug: `InternalError`) fails that half and every
command not yet committed, with that error, as it would have failed the batch: the split stops
there. tests/broker/test_split_props.py checks all this against the commands
run one at a time.

Commands set aside (`aside`: those the store saw meet a damaged row in a batch of their own
before, `Store.set_aside`) are run alone from the start, and the runs of commands between them
each as one batch, in order, without a try of the whole batch first: a command that meets the
same row every time (a send into a conversation one of whose members has a damaged inbox head)
costs its batch one run that fails and one commit more, not about 2 log2(n) runs (since
2026-12-05). A run between them that fails with CorruptProjection is split in halves as above:
at most 2n - 1 runs in all, the property test's bound for it.

A run that `execute` stopped at the row bound (`Store.execute`'s `max_rows`: it commits the
commands it ran and returns their outcomes alone) goes on with its commands not run, as a run
of its own, next: each commit of a split holds the bound as any batch does, and such a stop
costs one run more, which commits at least one command (since 2026-12-06; until then a
split's runs were bounded by the batch's estimated rows alone).

Runs in the committer's worker thread, as `Store.execute` does, so the event loop keeps serving.
Off the hot path: only a batch that failed with CorruptProjection, or holds a command set aside,
comes here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from storage.errors import CorruptProjection, StorageError


class Isolated:
    """What `isolate` made of a batch: one result per command, in the batch's order."""

    __slots__ = ("commits", "results", "stopped")

    def __init__(self, count: int) -> None:
        # Each command's Outcome (committed), or the error it failed with.
        self.results: list[Any] = [None] * count
        self.commits = 0  # the halves that committed
        # The error (not CorruptProjection) that stopped the split, and how many it failed.
        self.stopped: tuple[StorageError, int] | None = None


def isolate(execute: Callable[[Sequence[object]], list[Any]],
            commands: Sequence[object], aside: Sequence[int] = ()) -> Isolated:
    """Run `commands`, whose batch `execute` failed with CorruptProjection, again in halves; or,
    not tried whole, the commands of indices `aside` (ascending) alone and those between them;
    return each command's Outcome or error (see the module doc)."""
    done = Isolated(len(commands))
    results = done.results
    # A stack: the leftmost run is run first. Never an empty one (until 2026-12-05 a batch of
    # one command ran an empty batch, a durable commit of nothing, and then the command).
    todo = _around(aside, len(commands)) if aside else _halves(0, len(commands))
    while todo:
        lo, hi = todo.pop()
        if done.stopped is not None:
            error, failed = done.stopped
            results[lo:hi] = [error] * (hi - lo)
            done.stopped = (error, failed + hi - lo)
            continue
        try:
            ran = execute(commands[lo:hi])
        except CorruptProjection as exc:
            if hi - lo == 1:
                results[lo] = exc
            else:
                todo += _halves(lo, hi)
            continue
        except StorageError as exc:
            results[lo:hi] = [exc] * (hi - lo)
            done.stopped = (exc, hi - lo)
            continue
        results[lo:lo + len(ran)] = ran
        if lo + len(ran) < hi:  # stopped at the row bound: the rest of the run is run next
            todo.append((lo + len(ran), hi))
        done.commits += 1
    return done


def _halves(lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of `lo:hi` in halves, for the stack (the left one last: run first)."""
    mid = (lo + hi) // 2
    return [(mid, hi), (lo, mid)] if mid > lo else [(lo, hi)]


def _around(aside: Sequence[int], count: int) -> list[tuple[int, int]]:
    """The runs of `count` commands with each index of `aside` alone, for the stack."""
    runs, lo = [], 0
    for i in aside:
        if i > lo:
            runs.append((lo, i))
        runs.append((i, i + 1))
        lo = i + 1
    if lo < count:
        runs.append((lo, count))
    return runs[::-1]
