"""`done` with several takers of one client's deliveries (two trio tasks, or two threads of a
BlockingClient, each in a receive of its own): deliveries are handed over in inbox order, but
trio may run the woken takers in either order, so they are taken in either order. `done` of
the later one must not ack the earlier one, still being handled (docs/CLIENT.md, "Acks")."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from broker.client_blocking import connect
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing
from tests.waits import HANG_GUARD_S, wait_until, wait_until_sync

ROUNDS = 40  # each round, the two takes come in either order (trio's scheduling: random)


@asynccontextmanager
async def _bob_alice_admin(tmp_path) -> AsyncIterator[tuple]:
    """A broker with bob (who takes), alice (who writes to him) and an admin (who asks the
    broker's `stats` of bob's device)."""
    with trio.fail_after(120):
        async with running_broker(tmp_path / "data") as h:
            async with h.client("bob") as bob, h.client("alice") as alice, \
                    h.client("root", role="admin", deliver=False) as admin:
                yield bob, alice, admin


async def _two_queued(alice, bob, n: int) -> int:
    """Alice sends bob two messages, both then queued in his client; the later's inbox_seq
    (alice alone writes to bob: seq is inbox_seq)."""
    for i in range(2):
        head = (await alice.send(f"{n}-{i}", to="bob")).seq
    await wait_until(lambda: bob._inbox.yielded >= head)
    return head


async def test_done_of_the_later_of_two_takers_does_not_ack_the_earlier(tmp_path):
    """Each round two tasks wait on bob's deliveries and alice sends two messages: the task
    handed the later one calls `done` of it (durable), and the ack it makes, as the broker holds
    it (admin `stats`), is before the earlier one, which the other task has not declared done;
    then that `done` acks both. Until 2026-12-06, when the later was taken first, its `done`
    acked the earlier too (lost, had the process died), and that `done` raised ClientError
    "invalid" ("not a delivery taken from deliveries()") for a delivery it had taken."""
    async with _bob_alice_admin(tmp_path) as (bob, alice, admin):
        for n in range(ROUNDS):
            await _two_queued(alice, bob, n)  # then two takers in the same trio turn
            got: list = []

            async def take() -> None:
                got.append(await bob.deliveries().receive())  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                nursery.start_soon(take)
            first, later = sorted(got, key=lambda d: d.inbox_seq)
            await bob.done(later, durable=True)
            stats = await admin.stats("bob", "d1")
            assert stats.acked == first.inbox_seq - 1, (n, stats.acked, first.inbox_seq)
            await bob.done(first, durable=True)
            assert (await admin.stats("bob", "d1")).acked == later.inbox_seq


async def test_done_at_once_of_the_later_take_does_not_ack_one_not_yet_marked_taken(tmp_path):
    """Each round two tasks take one of bob's two queued deliveries; the one handed the later
    delivery calls `done` of it (durable) at once, and the broker's ack (admin `stats`) must
    stay before the earlier one, which its taker has not declared done. Until 2026-12-06 the
    earlier was marked taken only when its receive returned, after the later's `done` had
    acked it (lost, had the process died then): a receive that got its delivery checkpoints
    before it returns. About half the rounds race (trio runs the two takers in either order)."""
    async with _bob_alice_admin(tmp_path) as (bob, alice, admin):
        for n in range(ROUNDS):
            head = await _two_queued(alice, bob, n)
            got: list = []
            acked_then: list[int] = []

            async def take() -> None:
                d = await bob.deliveries().receive()
                got.append(d)  # noqa: B023
                if d.inbox_seq == head:  # noqa: B023
                    await bob.done(d, durable=True)
                    acked_then.append((await admin.stats("bob", "d1")).acked)  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                nursery.start_soon(take)
            first = min(d.inbox_seq for d in got)
            assert acked_then == [first - 1], (n, acked_then, first)
            await bob.done(first, durable=True)
            assert (await admin.stats("bob", "d1")).acked == head


def test_two_threads_iterating_a_blocking_clients_deliveries_each_done_raises_nothing(tmp_path):
    """Two threads iterate one BlockingClient's `deliveries()` and call `done` of each: every
    delivery goes to one of them, in inbox order within each, no `done` raises, and the
    device's ack ends at the inbox head. Until 2026-12-06 one of them raised ClientError
    "invalid" for a delivery it had taken, its thread ending (in 2 runs of this test of 3; the
    trio test above, which sets the two takes in one turn each round, failed every time)."""
    count = 600
    with BrokerProcess(tmp_path / "data") as bp:
        homing("send", "--to", "bob", "--stdin", input="".join(f"m{i}\n" for i in range(count)),
               env=as_user(bp, "shop"))
        got: dict[int, list[int]] = {0: [], 1: []}
        errors: list[BaseException] = []
        client = connect(bp.server, bp.token("bob"), "d1")

        def iterate(k: int) -> None:
            try:
                for d in client.deliveries():
                    got[k].append(d.inbox_seq)
                    client.done(d)
            except BaseException as exc:  # for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=iterate, args=(k,)) for k in got]
        for t in threads:
            t.start()
        try:
            wait_until_sync(lambda: errors or len(got[0]) + len(got[1]) >= count)
        finally:
            client.close()
            for t in threads:
                t.join(HANG_GUARD_S)
        assert errors == []
        assert sorted(got[0] + got[1]) == list(range(1, count + 1))
        assert all(seqs == sorted(seqs) for seqs in got.values())
        with connect(bp.server, bp.token("bob"), "d1") as again:
            assert again.welcome.acked == count
