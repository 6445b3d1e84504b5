"""A broker's commits held up on purpose, as a stalled disk would hold them, for as long as a
test says: a write transaction of the test on the data directory's LMDB environment holds its
write lock (the broker's too, across processes), so the order of events is set by the test,
not by how fast a loaded machine runs."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import lmdb
import trio


@asynccontextmanager
async def held_commits(data: Path) -> AsyncIterator[None]:
    """While the block runs, the broker serving `data` commits nothing (its write lock is
    ours); our transaction is aborted, so it writes nothing."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lmdb.open(str(data), max_dbs=32, map_size=1 << 30) as env:
            txn = env.begin(write=True)
            try:
                holding.set()
                release.wait()
            finally:
                txn.abort()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold)
        await trio.to_thread.run_sync(holding.wait)
        try:
            yield
        finally:
            release.set()
