"""Replay benchmark: `homing audit rebuild --check` on a log of N message events.

Run `python -m bench.bench_replay [--events N]`. The log (N `message.accepted` events among 100
users in direct conversations, written by `Store.execute` in batches of 4,096 SendMessage
commands) is built once and cached in the temporary directory ($TMPDIR, else /tmp) keyed by N
and the projection layout; a build removes the caches of older layouts, which no run reads.
Each run then opens it read-only and calls `storage.audit.check_projections`, the code path of
`homing audit rebuild --check` (and of the projection half of `homing audit verify`). Prints the
median of 3 runs in events/s and the commit measured; `--breakdown` adds the time of each phase.
This is not a test.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import structlog

from storage import audit, native
from storage.commands import SendMessage
from storage.fold import fold
from storage.memory_tables import MemoryTables
from storage.store import LAYOUT, Store
from storage.tables import APPEND_ONLY

RUNS = 3
USERS = [f"user{i:03d}" for i in range(100)]
BATCH = 4096
BODY = "hello " * 8
DONE_MARKER = "bench-complete"


CACHE_NAME = re.compile(r"homing-bench-replay-v(\d+)-(\d+)")
"""The caches' names: the projection layout, then the number of message events."""


def cache_dir(events: int) -> str:
    """Return the cached data directory for a log of `events` message events (one per
    projection layout: a cache of another layout would be rebuilt, not checked), in the
    temporary directory ($TMPDIR, else /tmp)."""
    return os.path.join(tempfile.gettempdir(), f"homing-bench-replay-v{LAYOUT.decode()}-{events}")


def stale_caches(folder: str) -> list[str]:
    """The caches in `folder` of layouts older than this homing's, which no run of it or of a
    later one reads again: directories of this user named as `cache_dir` names them (not a
    symlink, nor any other name). A newer layout's belongs to a newer homing and is left."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = CACHE_NAME.fullmatch(entry.name)
            if (match and int(match[1]) < int(LAYOUT) and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == os.geteuid()):
                found.append(entry.path)
    return sorted(found)


def _bytes_under(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path)
               for f in files)


def remove_stale_caches(say: Callable[[str], object]) -> None:
    """Remove the temporary directory's caches of older layouts (`stale_caches`), saying which
    and their size with `say`: they stayed for good, one set each time the layout changed."""
    stale = {path: _bytes_under(path) for path in stale_caches(tempfile.gettempdir())}
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    removed = [path for path in stale if not os.path.lexists(path)]
    if removed:
        mib = sum(stale[path] for path in removed) / (1 << 20)
        say(f"removed {len(removed)} replay cache{'s' * (len(removed) != 1)} of older layouts "
            f"({mib:,.1f} MiB): {', '.join(removed)}")


def build(path: str, events: int) -> None:
    """Write `events` direct messages among USERS into a fresh data directory at `path`.

    A build that does not finish (Ctrl-C, SIGTERM, a full disk) removes what it wrote: without
    its DONE_MARKER no run would use it, and it was left in the temporary directory."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        store = Store.open(path, map_size=1 << 31)
        try:
            _write_messages(store, events)
        finally:
            store.close()
        open(os.path.join(path, DONE_MARKER), "w").close()
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _write_messages(store: Store, events: int) -> None:
    sent = 0
    while sent < events:
        cmds = []
        for i in range(sent, min(events, sent + BATCH)):
            a = i % len(USERS)
            b = (a + 1 + (i // len(USERS)) % (len(USERS) - 1)) % len(USERS)
            cmds.append(SendMessage(USERS[a], "d1", "user", f"c{i}", BODY, to=USERS[b]))
        for out in store.execute(cmds, now_us=1_795_000_000_000_000 + sent):
            assert out.error is None, out.error
        sent += len(cmds)


def ensure_log(events: int, say: Callable[[str], object] = print) -> str:
    """Return a data directory holding the benchmark log, building it when not cached (and
    saying so with `say`: `homing bench` says it on stderr, under its table's stdout). A build
    first removes the caches of older layouts (`remove_stale_caches`)."""
    path = cache_dir(events)
    if not os.path.exists(os.path.join(path, DONE_MARKER)):
        remove_stale_caches(say)
        started = time.perf_counter()
        build(path, events)
        say(f"built {path} in {time.perf_counter() - started:.1f}s (kept for the next run; "
            "delete it when done)")
    return path


def check_once(path: str) -> tuple[float, float, int]:
    """Run the `audit rebuild --check` code path once; return (wall s, CPU s, events replayed).

    CPU seconds are reported too because the machine may be shared: wall time then includes
    waiting for a core.
    """
    store = Store.open(path, readonly=True)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        diff, events = audit.check_projections(store)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        store.close()
    assert diff is None, diff.describe()
    return elapsed, cpu, events


def breakdown(path: str) -> None:
    """Print the time of each phase of the check, per event, to show where it goes."""
    store = Store.open(path, readonly=True)
    key = os.urandom(16) if native.ext is not None else None
    gc.disable()
    try:
        phases = {}
        t = time.perf_counter()
        stored, digests, _ = store.projection_digests(APPEND_ONLY, key)
        phases["stored projections and digests"] = time.perf_counter() - t
        t = time.perf_counter()
        raw = list(store.log.read_raw())
        phases["read log records"] = time.perf_counter() - t
        tables = MemoryTables(APPEND_ONLY, key)
        t = time.perf_counter()
        _lsn, _ts, n = fold(tables, raw, on_chunk=lambda _: [tables.data[name].fold()
                                                             for name in APPEND_ONLY])
        for name in APPEND_ONLY:
            tables.data[name].fold()
        phases[f"fold ({native.describe()})"] = time.perf_counter() - t
        t = time.perf_counter()
        assert audit.compare(stored, {name: rows for name, rows in tables.data.items()
                                      if name not in APPEND_ONLY}) is None
        assert digests == {name: (tables.data[name].rows, tables.data[name].digest)
                           for name in APPEND_ONLY}
        phases["compare"] = time.perf_counter() - t
    finally:
        gc.enable()
        store.close()
    for name, seconds in phases.items():
        print(f"  {name:<32} {seconds:7.3f}s  {seconds / n * 1e6:6.2f} us/event")


def commit() -> str:
    """Return the short commit hash being measured (with + when the tree is dirty)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="message events in the log")
    parser.add_argument("--breakdown", action="store_true", help="also time each phase")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    path = ensure_log(args.events)
    runs = [check_once(path) for _ in range(RUNS)]
    seconds = statistics.median(wall for wall, _, _ in runs)
    cpu = statistics.median(cpu for _, cpu, _ in runs)
    events = runs[0][2]
    print(f"audit rebuild --check: {events:,} events, median of {RUNS} {seconds:.3f}s, "
          f"{events / seconds:,.0f} events/s ({events / cpu:,.0f} per CPU second; "
          f"commit {commit()}, storage hot loops {native.describe()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f})")
    if args.breakdown:
        breakdown(path)


if __name__ == "__main__":
    main()
