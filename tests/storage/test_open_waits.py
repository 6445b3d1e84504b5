"""A writable open that waits for LMDB's write lock holds up no other thread of its process.

py-lmdb's `open_db` without a transaction begins one for each table holding the GIL: while
another process held the write lock, every thread of the opening process stood still (the
broker's log writer too, whose lines of the start waited until the store was open). The tables
are opened in one write transaction of our own now, whose wait gives the GIL up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from storage.store import Store

HOLDER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=32, map_size=1 << 30)
txn = env.begin(write=True)
print("held", flush=True)
# Released when told (a line on stdin), or when nobody tells: EOF once the test's own
# deadline kills the pipe, or 30 s.
import select
ready, _, _ = select.select([sys.stdin], [], [], 30)
print("told" if ready and sys.stdin.readline() else "gave up", flush=True)
txn.abort()
"""


def test_the_open_waits_for_the_write_lock_without_the_gil(tmp_path):
    data = tmp_path / "data"
    Store.open(str(data)).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        opened: list[Store] = []
        opener = threading.Thread(target=lambda: opened.append(Store.open(str(data))))
        opener.start()
        # Until the opener waits for the lock, its frame in the tables' open.
        deadline = time.monotonic() + 30
        while not _in_table_open(opener):
            assert time.monotonic() < deadline and opener.is_alive()
            time.sleep(0.01)
        # This thread runs on while the opener waits: it is the one that lets the lock go.
        # With the GIL held by the opener it would not get here until the holder gave up.
        sum(range(200_000))
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "told"
        opener.join(30)
        assert opened and opened[0].last_lsn() == 0
        opened[0].close()
    finally:
        holder.kill()
        holder.wait()


def _in_table_open(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name in ("_open_dbs_writable", "_open_db"):
            return True
        frame = frame.f_back
    return False
