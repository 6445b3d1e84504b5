"""Deliveries read from the store in turns (--catch-up-per-turn, broker/turns.py), with a
commit's fan-out writing only what it holds: at the smallest setting, one reader a turn and a
small window, a crowd of devices catching up while messages keep coming, some dropping their
connection mid-way and coming back, each gets its whole inbox in order, and an entry that
comes to devices caught up with no copy of its own (a membership entry) too; after the stop no
turn place, accept count or check place is left taken (review of 2026-12-07)."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from tests.faults.test_storm import _device
from tests.harness import running_broker

DEVICES = 40
BEHIND = 100  # posted before the devices connect
MORE = 100  # posted while they catch up


async def _dropping(port: SimpleNamespace, token: str, last: int, got: list[int]) -> None:
    """A device that drops its connection mid-way through its catch-up (its writer waiting
    for a turn, or reading), then comes back until it has everything."""
    with trio.move_on_after(0.05):
        await _device(port, token, "pos", last, got)
    await _device(port, token, "pos", last, got)


async def test_catch_up_in_turns_delivers_everything_in_order(tmp_path):
    async with running_broker(tmp_path / "data", catch_up_per_turn=1, window=8) as h:
        users = [f"u{i}" for i in range(DEVICES)]
        got: dict[str, list[int]] = {u: [] for u in users}
        # The channel's membership entry, the posts, and the membership entry of a second
        # channel made once they are idle: an entry with no fresh copy, which only the
        # fan-out's wake-up of the writer delivers (`Session.flush_now`).
        last = 1 + BEHIND + MORE + 1
        port = SimpleNamespace(port=h.broker.port)
        with trio.fail_after(30):  # an entry left unwoken waits for the 45 s idle timeout
            async with h.client("hq", "desk") as hq:
                conv = await hq.create_channel("notices", members=users)
                for k in range(BEHIND):
                    await hq.send(f"before {k}", conv=conv)
                async with trio.open_nursery() as nursery:
                    for i, user in enumerate(users):
                        run = _dropping if i % 4 == 0 else _device
                        args = (port, h.token(user), last, got[user]) if i % 4 == 0 else (
                            port, h.token(user), "pos", last, got[user])
                        nursery.start_soon(run, *args)
                    for k in range(MORE):
                        await hq.send(f"during {k}", conv=conv)
                        await trio.sleep(0.002)
                    while sum(len(g) for g in got.values()) < DEVICES * (last - 1):
                        await trio.sleep(0.05)
                    await trio.sleep(0.1)  # every writer idle, waiting for a wake-up
                    await hq.create_channel("after", members=users)
        assert all(g == list(range(1, last + 1)) for g in got.values()), {
            u: g[-3:] for u, g in got.items() if g != list(range(1, last + 1))}
        broker = h.broker
    assert broker.arriving == 0 and broker.check_waiters == 0 and not broker.check_waits
    assert broker.turns._places.value == 1  # every place given back
