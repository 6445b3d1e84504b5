"""Child process for the catch-up kill test: open a directory whose projections are behind its
log, writable, catching up CHUNK events a transaction.

Usage: python catch_up_child.py DATA_DIR CHUNK. Prints `CHUNK <done> <total>` (flushed) after
each committed chunk of the catch-up, then waits to be killed; it never exits by itself.
"""

from __future__ import annotations

import sys
import time

from storage import store as store_mod
from storage.store import Store


def report(done: int, total: int) -> None:
    sys.stdout.write(f"CHUNK {done} {total}\n")
    sys.stdout.flush()


def main() -> None:
    store_mod.CATCH_UP_EVENTS = int(sys.argv[2])
    Store.open(sys.argv[1], on_catch_up=report)
    while True:  # caught up before the kill: wait for it all the same
        time.sleep(60)


if __name__ == "__main__":
    main()
