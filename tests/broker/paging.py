"""What the tests of paged replies share (`receipts` and `members` with `after`, PROTOCOL.md
§5.2): every page of a raw request, the refusal of an `after` that is no user id, and a broker
played on the real protocol connection, whose pages a test chooses; `homing serve` at a small
max_frame."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

import protocol
import storage.tables
from broker.handshake import CAPS
from storage.commands import CreateConv, MarkRead, SendMessage
from storage.store import Store
from tests.faults.conftest import PlayedBroker, RawClient
from tests.procs import BrokerProcess


async def raw_pages(raw: RawClient, ask: Callable[[int, str], Any], reply: type,
                    after: str = "") -> list:
    """Every page of the request `ask(id, after)`, from `after` on, as the broker answers
    them: each a `reply`, the next asked with the last one's `last` while it says `more`."""
    out = []
    while True:
        rid = len(out) + 100
        await raw.send(ask(rid, after))
        with trio.fail_after(10):
            page = await raw.reply(rid)
        assert isinstance(page, reply), page
        out.append(page)
        if not page.more:
            return out
        after = page.last


async def rows_per_page(raw: RawClient, ask: Callable[[int, str], Any],
                        listed: Callable[[Any], int]) -> list[tuple[int, int]]:
    """Page the request `ask(id, after)` from the first page, at a broker running in this
    process: for each page, the rows the store's reads took meanwhile and the members it
    lists (`listed(page)`)."""
    after, reads = "", []
    while True:
        with counting_rows() as seen, trio.fail_after(10):
            await raw.send(ask(len(reads) + 100, after))
            page = await raw.reply(len(reads) + 100)
        reads.append((seen[0], listed(page)))
        if not page.more:
            return reads
        after = page.last


def assert_reads_cost_their_pages(reads: list[tuple[int, int]]) -> None:
    """Each page's store reads (`rows_per_page`) took no more member rows than twice the
    members it lists and a few more, and no fewer than it lists: a count of none would say
    that the reads no longer pass `counting_rows`, not that they are cheap."""
    assert all(n <= seen <= 2 * n + 3 for seen, n in reads), reads


def short_ids(n: int) -> list[str]:
    """`n` user ids of 2 characters, in byte order."""
    first = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return sorted(a + b for a in first for b in first + "-._@+")[:n]


def seeded_group(data: Path, owner: str, members: list[str], name: str,
                 read: bool = False) -> tuple[str, int]:
    """A group of `owner` and `members` called `name` written to a new store at `data`,
    and the seq of a message of `owner`'s in it; with `read`, every member read it."""
    store = Store.open(str(data))
    try:
        (made,) = store.execute([CreateConv(owner, "d", "user", "group", name, False,
                                            tuple(members))])
        conv = made.reply["conv"]
        (sent,) = store.execute([SendMessage(owner, "d", "user", "c1", "hi", conv=conv)])
        seq = sent.reply["seq"]
        if read:
            outs = store.execute([MarkRead(m, "d", "user", conv, seq) for m in members])
            assert all(o.error is None for o in outs), outs
    finally:
        store.close()
    return conv, seq


async def assert_bad_after_is_invalid(raw: RawClient, request: dict) -> None:
    """The wire map `request` with a non-ASCII `after`, no user id, is answered `invalid`
    naming the field, and the session stays open (a ping after it is answered)."""
    await raw.stream.send_all(protocol.encode_frame({**request, "id": 9, "after": "störe"}))
    err = await raw.reply(9)
    assert isinstance(err, protocol.Error) and err.name == "invalid" and not err.close, err
    assert "'after'" in err.message, err
    await raw.send(protocol.Ping(id=10))
    assert await raw.reply(10) == protocol.Pong(id=10)


@asynccontextmanager
async def played_broker(answer: Callable[[PlayedBroker, Any], Awaitable[None]]
                        ) -> AsyncIterator[str]:
    """A broker played on the real protocol connection, its welcome with this broker's caps:
    each frame a client sends after its hello is handed to `answer`. Yields its address."""

    async def serve(stream: trio.SocketStream) -> None:
        played = PlayedBroker(stream)
        await played.next_frame()
        await played.send(protocol.Welcome(1, "s-bad", "hq", 0, 1 << 20, 15, 0, 1, CAPS, id=None))
        while (frame := await played.next_frame()) is not protocol.CLOSED:
            await answer(played, frame)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"127.0.0.1:{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


@contextmanager
def small_broker(data: Path) -> Iterator[tuple[BrokerProcess, Any]]:
    """`homing serve --max-frame-bytes 4096 --max-body-bytes 1024` on `data`, and a harness for
    the tests' setups, which take one with `client` (as `tests.harness` has)."""
    with BrokerProcess(data, "--max-frame-bytes", "4096", "--max-body-bytes", "1024") as b:

        class Harness:
            client = b.client

        yield b, Harness


@contextmanager
def counting_rows() -> Iterator[list[int]]:
    """Count the rows the store's reads take from LMDB (through `TxnTables.range`) meanwhile."""
    real, seen = storage.tables.cursor_range, [0]

    def counting(txn, db, prefix, start=None, reverse=False):
        for row in real(txn, db, prefix, start, reverse):
            seen[0] += 1
            yield row

    storage.tables.cursor_range = counting
    try:
        yield seen
    finally:
        storage.tables.cursor_range = real
