"""Review of map growth with several threads and processes on one data directory: real LMDB
environments in temp directories (a tmpfs where the race needs fast commits), a real writer
process; nothing of homing's is replaced."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.commands import SendMessage
from storage.store import Store
from tests.disks import tmpfs

ROOT = Path(__file__).resolve().parents[2]
SMALL_MAP = 64 * 1024


def _sends(b: int, n: int = 20, size: int = 4000) -> list[SendMessage]:
    return [SendMessage("alice", "d", "user", f"{b}-{i}", "x" * size, to="bob")
            for i in range(n)]


def test_batches_that_grow_the_map_commit_while_two_threads_read(tmp_path):
    """Each growth aborts the batch's write transaction first, and py-lmdb 3.0 aborts one only
    at a moment when no LMDB call of any thread is under way: two threads reading back to back
    (reads "may be called from any thread") never left one, and the first batch that grew the
    map waited for ever. The readers are stopped at the end either way, which lets a stuck
    abort through, so the test ends."""
    store = Store.open(tmp_path / "data", map_size=SMALL_MAP)
    store.execute(_sends(0, 1))
    stop = threading.Event()
    errors: list[BaseException] = []
    done: list[int] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                store.inbox_after("bob", 0, 50)
                store.conversations("bob")
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            for b in range(1, 16):
                store.execute(_sends(b))
                done.append(b)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(timeout=10)
    finished = not w.is_alive()
    stop.set()
    w.join()
    for t in readers:
        t.join()
    try:
        assert finished, f"the writer was stuck after {len(done)} of 15 batches"
        assert not errors
        assert store._env.map_size() > SMALL_MAP
        assert store.inbox_head("bob") == 1 + 15 * 20
        assert store.check_projections() is None
    finally:
        store.close()


WRITER = """
import sys, time
from storage.commands import SendMessage
from storage.store import Store
s = Store.open(sys.argv[1], map_size=64 * 1024)
print("ready", flush=True)
b = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.execute([SendMessage("alice", "d", "user", f"c{b}", "x" * 3000, to="bob")])
    b += 1
s.close()
"""


def test_a_readonly_open_while_the_writer_grows_the_data(tmp_path):
    """A read-only open maps the data in use (no more, when the map asked for is smaller: a
    `homing audit` or `backup` next to a broker whose data outgrew the default 1 GiB), and LMDB
    refuses the first read transaction once a commit went past it, before `_begin_read` can
    adopt the new size: opening the tables met MDB_MAP_RESIZED, and the open failed ("cannot
    open DIR: ... MDB_MAP_RESIZED", `no_data` from the CLI) about one time in eight while a
    broker wrote on a tmpfs."""
    with tmpfs(tmp_path, "256m") as disk:
        path = disk / "data"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "6"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            for line in writer.stdout:  # after its log's storage_opened line
                if line.startswith("ready"):
                    break
            threading.Thread(target=writer.stdout.read, daemon=True).start()  # its logs
            time.sleep(0.3)  # past the first growths
            failures: list[str] = []
            opens = 0
            end = time.monotonic() + 3
            while time.monotonic() < end and writer.poll() is None:
                try:
                    reader = Store.open(path, readonly=True, map_size=SMALL_MAP)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                try:
                    assert reader.last_lsn() > 0 and reader.inbox_head("bob") > 0
                    opens += 1
                finally:
                    reader.close()
        finally:
            writer.kill()
            writer.wait()
        assert not failures, f"{len(failures)} of {opens + len(failures)} opens: {failures[0]}"
        assert opens > 100


def test_one_batch_many_times_the_map_commits_whole_once(tmp_path):
    """A batch of 256 sends of 64 KiB (16 MiB) into a 64 KiB map is run again at each of its
    doublings: it commits once, whole, and the cached rows it left serve the next batch."""
    store = Store.open(tmp_path / "data", map_size=SMALL_MAP)
    try:
        outs = store.execute(_sends(0, 256, 64 * 1024))
        assert [o.error for o in outs] == [None] * 256
        assert [o.reply["seq"] for o in outs] == list(range(1, 257))
        assert store._env.map_size() >= 16 << 20
        assert store.last_lsn() == 3 + 256 and store.verify_log() == 3 + 256
        outs = store.execute(_sends(1, 2))  # from the cache: conv seq, inbox head
        assert [o.reply["seq"] for o in outs] == [257, 258]
        assert store.inbox_head("bob") == 258
        assert store.check_projections() is None
    finally:
        store.close()
    reader = Store.open(tmp_path / "data", readonly=True)
    try:
        assert reader.last_lsn() == 3 + 258 and reader.check_projections() is None
    finally:
        reader.close()


def test_a_map_grown_past_the_disk_ends_in_storage_full_and_recovers(tmp_path):
    """Doubling the map past the free space costs nothing (no writemap: the file grows with
    the data); the disk filling up is StorageFull, nothing of the batch is written, and once
    space is back the next batches commit from a cache that holds no row of the failed one."""
    with tmpfs(tmp_path, "4m") as disk:
        store = Store.open(disk / "data", map_size=SMALL_MAP)
        spare = disk / "spare"
        spare.write_bytes(b"\0" * (512 << 10))
        last = 0
        try:
            for b in range(1000):
                store.execute(_sends(b, 10))
                last = store.last_lsn()
        except Exception as exc:
            assert type(exc).__name__ == "StorageFull"
        assert 0 < last == store.last_lsn()
        assert store._env.map_size() >= (4 << 20)  # as large as the disk, before it filled
        spare.unlink()
        outs = store.execute(_sends(10_000, 2, 100))
        assert [o.error for o in outs] == [None, None]
        assert store.last_lsn() == last + 2
        assert store.check_projections() is None
        store.close()


def test_a_directory_grown_past_the_map_asked_for_reopens(tmp_path):
    """A data directory whose data outgrew the map it is opened with (DEFAULT_MAP_SIZE at a
    restart of a broker past 1 GiB) opens writable and read-only, and grows again."""
    path = tmp_path / "data"
    store = Store.open(path, map_size=SMALL_MAP)
    for b in range(20):
        store.execute(_sends(b))
    grown = store._env.map_size()
    store.close()
    assert (path / "data.mdb").stat().st_size > SMALL_MAP
    reader = Store.open(path, readonly=True, map_size=SMALL_MAP)
    try:
        assert reader.verify_log() == reader.last_lsn() == 3 + 400
        assert reader.check_projections() is None
    finally:
        reader.close()
    store = Store.open(path, map_size=SMALL_MAP)
    try:
        assert SMALL_MAP < store._env.map_size() <= grown
        for b in range(20, 40):
            store.execute(_sends(b))
        assert store.last_lsn() == 3 + 800 and store.check_projections() is None
    finally:
        store.close()


READER_UNDER_A_LIMIT = """
import os, resource, sys
from storage.store import Store
env = Store.open(sys.argv[1], readonly=True, map_size=64 * 1024)._env
print("ready", flush=True)
sys.stdin.readline()
# Room for Python, none for the writer's 64 GiB map: adopting its size (mmap) fails, ENOMEM.
vm = int(next(x for x in open("/proc/self/status") if x.startswith("VmSize")).split()[1])
resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (512 << 20), resource.RLIM_INFINITY))
for _ in range(2):
    try:
        with env.read():
            print("read", flush=True)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
    print("readers", env._readers, flush=True)
os._exit(0)
"""


def test_a_reader_that_cannot_adopt_the_grown_map_keeps_its_count(tmp_path):
    """A read-only process (an audit under `ulimit -v`) whose read meets MDB_MAP_RESIZED and
    then cannot map the writer's new size: the read is a StorageError, and the count of reads
    under way stays right. It went to -1 (the read's own exit counted after the failed resize
    had already let its place go), and the next growth of that process would have waited on
    `while self._readers` for ever."""
    path = tmp_path / "data"
    store = Store.open(path, map_size=64 << 30)  # only address space: the file grows with data
    try:
        store.execute(_sends(0, 1))
        reader = subprocess.Popen([sys.executable, "-c", READER_UNDER_A_LIMIT, str(path)],
                                  cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            for line in reader.stdout:  # after its log's storage_opened line
                if line.startswith("ready"):
                    break
            for b in range(1, 6):  # past the reader's 64 KiB map
                store.execute(_sends(b))
            out, _ = reader.communicate("go\n", timeout=30)
        finally:
            reader.kill()
            reader.wait()
    finally:
        store.close()
    lines = [x for x in out.splitlines() if "storage_" not in x]  # not its log lines
    assert lines[0].startswith("StorageError cannot read") and "Cannot allocate" in lines[0]
    assert lines[1] == "readers 0"
    assert lines[2].startswith("StorageError cannot read")  # py-lmdb closed the env: no crash
    assert lines[3] == "readers 0"


def test_a_new_directory_opens_in_the_smallest_map(tmp_path):
    """Creating the tables of a new data directory grows the map as every write does: a map
    of one byte (the smallest LMDB takes; 0 is its default, 1 MiB) failed the open with
    "cannot open DIR: mdb_dbi_open: MDB_MAP_FULL" (16 KiB and below) or "mdb_txn_commit:
    MDB_MAP_FULL" (32 KiB), though no MapFullError is to reach a caller."""
    for size in (1, 4096, 32 * 1024):
        path = tmp_path / f"data{size}"
        store = Store.open(path, map_size=size)
        try:
            # 32 KiB holds the new tables since they are made in one transaction (2026-12-06)
            assert store._env.map_size() > size or size == 32 * 1024
            store.execute(_sends(0, 3))
            assert store.inbox_head("bob") == 3 and store.check_projections() is None
        finally:
            store.close()
        reader = Store.open(path, readonly=True, map_size=size)  # the read side as well
        try:
            assert reader.inbox_head("bob") == 3
        finally:
            reader.close()


def test_a_negative_map_size_is_a_clear_error(tmp_path):
    """A negative map size was py-lmdb's OverflowError ("Integer argument must be >= 0"),
    after the directory and its lock file were made."""
    with pytest.raises(ValueError, match=r"map size must be 0 .* or more, not -1"):
        Store.open(tmp_path / "data", map_size=-1)
    assert not (tmp_path / "data").exists()
