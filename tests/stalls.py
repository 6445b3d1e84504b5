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

import protocol as wire
from tests.faults.conftest import RawClient


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


def committing(bp, n: int) -> bool:
    """Whether a `broker_stats` line of `bp` says a commit of `n` commands or more is under way:
    wait for it before the command that is to queue behind it, which would otherwise, sent
    before the committer took the first, be taken into the same batch (and never queue)."""
    return any(e.get("event") == "broker_stats" and e.get("committing", 0) >= n
               for e in bp.log_events())


def queued_behind(bp, n: int) -> bool:
    """Whether a `broker_stats` line of `bp` (a tests.procs.BrokerProcess started with
    `--stats-interval`) says `n` commands wait behind the batch being committed."""
    return any(e.get("event") == "broker_stats" and e.get("queued", 0) >= n
               for e in bp.log_events())


async def conversation_bodies(bp, user: str, conv: str) -> list:
    """The bodies of `conv` as `user` reads them from `bp`, oldest first ([] while it does not
    exist yet: a send still held at its commit)."""
    c = await RawClient.connect(bp.server, bp.token(user), "hist")
    await c.send(wire.History(id=1, conv=conv, after=0, limit=200, order="oldest"))
    page = await c.reply(1)
    await c.aclose()
    if isinstance(page, wire.Error) and page.name == "forbidden":  # not created yet
        return []
    return [m.body for m in page.messages]
