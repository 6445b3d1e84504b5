"""Load (long): thousands of concurrent connections, traffic on a fraction, memory bounded."""

from __future__ import annotations

import resource

import pytest
import trio

from tests.faults.checker import History, stop_and_check
from tests.faults.conftest import RawClient, scaled
from tests.procs import rss_kib


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.long
async def test_thousands_of_connections(broker_process, tally):
    """HOMING_LONG_SCALE x 5,000 connections held open; 1 in 20 sends; nothing lost."""
    n = scaled(5000, 200)
    if raise_nofile(n * 2 + 256) < n + 256:
        pytest.skip("RLIMIT_NOFILE too low for this many connections")
    bp = broker_process("--idle-timeout", "600", "--log-level", "warning")
    rss0 = rss_kib(bp.pid)
    held: list[RawClient] = []
    limit = trio.Semaphore(200)
    history = History()
    pairs, per_sender = max(5, n // 40), 20

    async def hold(i: int) -> None:
        async with limit:
            held.append(await RawClient.connect(bp.server, bp.token(f"idle{i}"), "d"))

    async def pair(j: int) -> None:
        async with bp.client(f"s{j}") as s, bp.client(f"r{j}") as r:
            for k in range(per_sender):
                cid = f"s{j}-{k}"
                history.attempt(f"s{j}", cid, f"load {j} {k}", (f"r{j}",))
                res = await s.send(f"load {j} {k}", to=f"r{j}", cid=cid)
                history.accept(f"s{j}", cid, res.conv, res.seq)
            for _ in range(per_sender):
                d = await r.deliveries().receive()
                history.deliver(f"r{j}", "d1", r, d)
                await r.ack(d.inbox_seq)

    try:
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i in range(n - 2 * pairs):
                    nursery.start_soon(hold, i)
            tally.add("load: idle connections held", len(held))
            rss_held = rss_kib(bp.pid)
            async with trio.open_nursery() as nursery:
                for j in range(pairs):
                    nursery.start_soon(pair, j)
            tally.add("load: sends under load", pairs * per_sender)
            assert bp.alive()
            growth = rss_kib(bp.pid) - rss0
            print(f"{n} connections: RSS +{growth} KiB (+{rss_held - rss0} KiB when held)")
            assert growth < 100 * 1024 + n * 64, growth  # 64 KiB a connection
    finally:
        for c in held:
            await c.aclose()
    await stop_and_check(bp, history)
