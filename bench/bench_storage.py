"""Storage benchmarks: raw LMDB ceiling, group-commit append path, and full rebuild.

The raw LMDB ceiling is measured twice: with 1,000 synced puts per transaction, and with 64 (the
most a commit can hold when 64 appenders each wait for their event before the next).

The group-commit path runs twice: 64 appenders with one event in flight each (issue 2's
figure), then with `--in-flight` (16) queued each, as pipelining connections have them. Their
cids come from one counter, so they rise across senders as the SDK's time-ordered ones do (until
2026-12-03 they were `appender-n`, which do not sort in send order: more `idem` pages a commit,
and an LMDB read for every new cid; docs/BENCHMARKS-JOURNAL.md has both).
Before them, the disk: one synced write of a page, of 64 scattered pages and of 64 contiguous
pages (bench/disk.py: a commit's sync costs what its pages cost). The group-commit lines say how
many events and pages (4 KiB, from the process's written bytes) a commit held. The service-burst
line compares a commit of one sender's 16 sends with random cids and with the SDK's time-ordered
ones (broker.client.new_cid): pages and time per commit. Each group-commit line is followed by
the same appenders through the same committer with a store that does no work (`NoWorkStore`):
what the coordinator, its worker thread and the trio tasks cost alone, the most the durable
figure could reach with a free store; and by the store alone (`store_alone`: `Store.execute`
of batches of the same size, made beforehand, in a plain loop): the most it could reach with a
free coordinator.
Run `python -m bench.bench_storage [--events N] [--in-flight K]`. Each figure is the median of
3 runs, each on a fresh temporary directory. The process sets up its cyclic GC as `homing serve`
does (`broker.serve_cli.tune_gc`), so the group-commit path runs as in the broker; `--python-gc`
keeps Python's defaults. Prints figures; this is not a test.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import statistics
import tempfile
import time
import uuid

import lmdb
import structlog
import trio

from bench.disk import PAGE, describe, synced_writes
from broker.client import new_cid
from broker.committer import Committer
from broker.config import Config
from broker.serve_cli import tune_gc
from storage.commands import SendMessage
from storage.store import Store

RUNS = 3
BODY = "x" * 200
USERS = [f"user{i:02d}" for i in range(16)]


def raw_lmdb(puts: int = 200_000, per_txn: int = 1000) -> float:
    """Batched puts of ~250-byte values, durable commit per 1,000 puts; return puts/s."""
    with tempfile.TemporaryDirectory() as d:
        env = lmdb.open(d, map_size=1 << 30, sync=True, metasync=True, writemap=False)
        value = os.urandom(250)
        start = time.perf_counter()
        for base in range(0, puts, per_txn):
            with env.begin(write=True) as txn:
                for i in range(base, base + per_txn):
                    txn.put(i.to_bytes(8, "big"), value)
        elapsed = time.perf_counter() - start
        env.close()
    return puts / elapsed


async def _group_commit(store: Store, appenders: int, per_appender: int,
                        in_flight: int) -> tuple[float, float, float, float]:
    """Appenders through the broker's own group-commit coordinator (broker/committer.py), each
    with `in_flight` events queued at a time (as a pipelining connection has); return (durable
    events/s, max event-loop stall s, events per commit, pages written per commit)."""
    committer = Committer(store)
    done = False
    max_stall = 0.0
    cids = itertools.count()  # one counter: the cids rise across senders, as the SDK's do

    async def appender(ix: int) -> None:
        a, b = USERS[ix % 16], USERS[(ix % 16) ^ 1]
        for first in range(0, per_appender, in_flight):
            pending = [committer.enqueue(SendMessage(a, f"d{ix}", "user", f"{next(cids):012d}",
                                                     BODY, to=b))
                       for _ in range(first, min(first + in_flight, per_appender))]
            last = pending[-1].event = trio.Event()
            await last.wait()  # commands are committed in order: the last one is durable last
            for p in pending:
                assert p.error is None and p.outcome.error is None

    async def stall_probe() -> None:
        nonlocal max_stall
        while not done:
            t0 = trio.current_time()
            await trio.sleep(0.001)
            max_stall = max(max_stall, trio.current_time() - t0 - 0.001)

    async with trio.open_nursery() as outer:
        await outer.start(committer.serve)
        outer.start_soon(stall_probe)
        written, batches = written_bytes(), committer.batches
        start = time.perf_counter()
        async with trio.open_nursery() as inner:
            for i in range(appenders):
                inner.start_soon(appender, i)
        elapsed = time.perf_counter() - start
        written, batches = written_bytes() - written, committer.batches - batches
        done = True
        await committer.close()
    events = appenders * per_appender
    return events / elapsed, max_stall, events / batches, written / PAGE / batches


def group_commit(appenders: int = 64, per_appender: int = 500,
                 in_flight: int = 1) -> tuple[float, float, float, float]:
    """The group-commit path on a fresh store; return (durable events/s, max loop stall s,
    events per commit, pages written per commit)."""
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            return trio.run(_group_commit, store, appenders, per_appender, in_flight)
        finally:
            store.close()


class NoWorkStore:
    """Stands in for `Store` where the coordinator alone is measured: each command gets the
    next LSN and an outcome with no error, and nothing is written. The group-commit path through
    it is what the committer (broker/committer.py), its worker thread and the trio appenders cost
    by themselves: the ceiling they put on the durable figure, whatever the store costs."""

    class Outcome:
        __slots__ = ("lsn",)
        error = None

        def __init__(self, lsn: int) -> None:
            self.lsn = lsn

    def __init__(self) -> None:
        self.lsn = 0

    def last_lsn(self) -> int:
        return self.lsn

    def set_aside(self, commands: list[object]) -> list[int]:
        return []  # no damaged row: every batch is tried whole

    def execute(self, commands: list[object], max_rows: int | None = None
                ) -> list[NoWorkStore.Outcome]:
        first, self.lsn = self.lsn + 1, self.lsn + len(commands)
        return [self.Outcome(lsn) for lsn in range(first, self.lsn + 1)]


def coordinator_alone(appenders: int = 64, per_appender: int = 500, in_flight: int = 1) -> float:
    """Events/s of the group-commit path with a store that does no work (`NoWorkStore`)."""
    return trio.run(_group_commit, NoWorkStore(), appenders, per_appender, in_flight)[0]


def store_alone(batch: int, batches: int = 200, appenders: int = 64) -> float:
    """Events/s of `Store.execute` alone, durable, no trio and no committer: batches of
    `batch` sends made beforehand (untimed) as `appenders` appenders would have queued them, on
    a fresh store after one untimed batch. With `coordinator_alone`, where a group-commit
    run's time goes: the store's work and sync, and the hand-offs around it."""
    cids = itertools.count()

    def sends(n: int) -> list[SendMessage]:
        out = []
        for k in range(n):
            ix = k % appenders
            a, b = USERS[ix % 16], USERS[(ix % 16) ^ 1]
            out.append(SendMessage(a, f"d{ix}", "user", f"{next(cids):012d}", BODY, to=b))
        return out

    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            store.execute(sends(batch))
            work = [sends(batch) for _ in range(batches)]
            start = time.perf_counter()
            for commands in work:
                store.execute(commands)
            return batch * batches / (time.perf_counter() - start)
        finally:
            store.close()


def written_bytes() -> float:
    """Bytes this process has written with write calls so far (Linux's /proc/self/io `wchar`);
    NaN where that is not to be read."""
    try:
        with open("/proc/self/io") as f:
            return next(float(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return math.nan


def service_burst(cids: str, sends: int = 16, commits: int = 1000,
                  members: int = 2000) -> tuple[float, float]:
    """One service sending `sends` messages a commit to `members` members in turn, with the
    SDK's time-ordered cids (`cids="ordered"`, broker.client.new_cid) or random ones
    ("random", uuid4 hex); return (median s per commit, pages written per commit) over the
    second half of the commits, when the idempotency index has grown."""
    make = new_cid if cids == "ordered" else (lambda: uuid.uuid4().hex)
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            times, written, n = [], 0.0, 0
            for i in range(commits):
                batch = []
                for _ in range(sends):
                    batch.append(SendMessage("shop", "svc", "service", make(), BODY,
                                             to=f"m{n % members:05d}"))
                    n += 1
                w, t0 = written_bytes(), time.perf_counter()
                store.execute(batch)
                if i >= commits // 2:
                    times.append(time.perf_counter() - t0)
                    written += written_bytes() - w
        finally:
            store.close()
    return statistics.median(times), written / PAGE / len(times)


def rebuild(events: int) -> float:
    """Fill a store with `events` message events (8 direct convs), time rebuild(); events/s."""
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        try:
            batch = 5000
            for base in range(0, events, batch):
                store.execute([
                    SendMessage(USERS[i % 16], "d", "user", f"c{i}", BODY,
                                to=USERS[(i % 16) ^ 1])
                    for i in range(base, min(base + batch, events))
                ])
            total = store.last_lsn()
            start = time.perf_counter()
            store.rebuild()
            return total / (time.perf_counter() - start)
        finally:
            store.close()


def median(fn, *args):
    """Return the median over RUNS runs of `fn(*args)` (element-wise for tuples)."""
    results = [fn(*args) for _ in range(RUNS)]
    if isinstance(results[0], tuple):
        return tuple(statistics.median(r[i] for r in results) for i in range(len(results[0])))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="events for the rebuild")
    parser.add_argument("--per-appender", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=16,
                        help="events each appender keeps queued in the second group-commit "
                             "run (1: skip it)")
    parser.add_argument("--python-gc", action="store_true",
                        help="keep Python's GC settings instead of homing serve's")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not args.python_gc:
        tune_gc(Config().gc_young_threshold)
    print(describe(synced_writes()))
    print(f"raw lmdb, 1,000 puts/txn, sync: {median(raw_lmdb):,.0f} puts/s")
    # The ceiling of 64 appenders with one event in flight each: a batch holds at most 64.
    print(f"raw lmdb, 64 puts/txn, sync: {median(raw_lmdb, 64_000, 64):,.0f} puts/s")
    commits = [("64 appenders", 1)]
    if args.in_flight > 1:
        commits.append((f"64 appenders with {args.in_flight} events in flight each",
                        args.in_flight))
    for label, in_flight in commits:
        rate, stall, events, pages = median(group_commit, 64, args.per_appender * in_flight,
                                            in_flight)
        print(f"group commit, {label}: {rate:,.0f} durable events/s, max loop stall "
              f"{stall * 1000:.1f} ms; {events:,.0f} events and {pages:,.0f} pages per commit")
        alone = median(coordinator_alone, 64, args.per_appender * in_flight, in_flight)
        print(f"group commit, {label}, coordinator alone (a store that does no work): "
              f"{alone:,.0f} events/s")
        alone = median(store_alone, 64 * in_flight, max(10, 64_000 // (64 * in_flight)))
        print(f"group commit, {label}, store alone (Store.execute of {64 * in_flight:,}-send "
              f"batches in a plain loop, durable): {alone:,.0f} events/s")
    bursts: dict[str, list[tuple[float, float]]] = {"random": [], "ordered": []}
    for _ in range(RUNS):  # alternating, so drift over the minute hits both alike
        for cids, results in bursts.items():
            results.append(service_burst(cids))
    (r_s, r_pages), (o_s, o_pages) = (
        (statistics.median(s for s, _ in results), statistics.median(p for _, p in results))
        for results in bursts.values())
    print(f"service burst, 16 sends a commit to 2,000 members: random cids {r_s * 1000:.2f} ms "
          f"and {r_pages:,.0f} pages per commit; time-ordered cids (the SDK's) {o_s * 1000:.2f} ms "
          f"and {o_pages:,.0f} pages")
    print(f"rebuild of {args.events:,} events: {median(rebuild, args.events):,.0f} events/s")


if __name__ == "__main__":
    main()
