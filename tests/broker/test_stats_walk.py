"""A `stats` request's look at every delivering session (`backlog_max`, `windows_full`) made
in slices, against a real in-process broker over real sockets: the other connections run
between two slices, sessions ending during the walk are no trouble, and the figures are
those of the devices connected."""

from __future__ import annotations

import trio

import protocol as wire
from broker import stats
from broker.handlers import on_stats
from tests.faults.conftest import RawClient
from tests.harness import running_broker

USERS, DEVICES = 400, 3  # 1,200 delivering sessions: a few slices of the walk
SENT = 10  # to u0, whose devices read but never ack
WINDOW = 4


async def _requests_only(server: str, token: str, device: str) -> RawClient:
    host, port = server.rsplit(":", 1)
    c = RawClient(await trio.open_tcp_stream(host, int(port)))
    await c.hello(token, device, deliver=False)
    return c


async def test_a_stats_request_lets_the_other_connections_run_during_its_walk(tmp_path,
                                                                               monkeypatch):
    """The walk of every delivering session behind `backlog_max` and `windows_full` took the
    event loop whole, 1 to 2 us a session: 12 ms at 10,000 sessions and 26 ms at 20,000,
    measured from a bystander's pings, every other connection held up that long at each
    health probe (review, 2026-12-07). It checkpoints once a slice has taken BACKLOG_SLICE_S
    now (made 0 here, so that 1,200 sessions, well under 1 ms on a fast machine, are a few
    slices: a checkpoint every BACKLOG_CLOCK_EVERY): the other tasks run between its slices,
    sessions that end in the middle of it are no trouble, and its figures are still those of
    the devices connected."""
    monkeypatch.setattr(stats, "BACKLOG_SLICE_S", 0.0)
    async with running_broker(tmp_path / "data", window=WINDOW) as h:
        clients = [await RawClient.connect(h.server, h.token(f"u{u}"), f"d{d}")
                   for u in range(USERS) for d in range(DEVICES)]
        shop = await _requests_only(h.server, h.token("shop"), "till")
        for i in range(SENT):
            await shop.send(wire.Send(id=i + 1, cid=f"c{i}", body=f"order {i}", to="u0"))
            assert isinstance(await shop.reply(i + 1), wire.Result)
        monitor = await _requests_only(h.server, h.token("ops", "monitor"), "probe")
        [session] = [s for s in h.broker.hub.all_sessions() if s.role == "monitor"]

        request_id = 100  # until the sends are u0's backlog and its devices' windows filled
        with trio.move_on_after(30):  # a hang guard: a loaded machine takes what it takes
            while True:
                await monitor.send(wire.Stats(id=request_id))
                figures = await monitor.reply(request_id)
                if (figures.backlog_max, figures.windows_full) == (SENT, DEVICES):
                    break
                request_id += 1
                await trio.sleep(0.01)
        # u0's three devices hold 10 entries each unacked, their windows of 4 full
        assert (figures.backlog_max, figures.windows_full) == (SENT, DEVICES), figures

        ticks = 0

        async def bystander() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0)
                ticks += 1

        async def hang_up() -> None:  # 50 users, as the walk begins
            for c in clients[-DEVICES * 50:]:
                await c.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            nursery.start_soon(hang_up)
            pending = on_stats(session, wire.Stats(id=7))
            if pending is not None:
                await pending
            nursery.cancel_scope.cancel()
        assert ticks >= 4, f"the walk of {len(clients)} sessions let others run {ticks} times"
        reply = await monitor.reply(7)
        assert (reply.backlog_max, reply.windows_full) == (SENT, DEVICES), reply
        for c in [*clients[:-DEVICES * 50], shop, monitor]:
            await c.aclose()
