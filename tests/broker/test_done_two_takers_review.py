"""`done` with several takers of one client's deliveries (two trio tasks, or two threads of a
BlockingClient, each in a receive of its own): deliveries are handed over in inbox order, but
trio may run the woken takers in either order, so they are taken in either order. `done` of
the later one must not ack the earlier one, still being handled (docs/CLIENT.md, "Acks")."""

from __future__ import annotations

import threading

import trio

from broker.client_blocking import connect
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing
from tests.waits import HANG_GUARD_S, wait_until, wait_until_sync

ROUNDS = 40  # each round, the two takes come in either order (trio's scheduling: random)


async def test_done_of_the_later_of_two_takers_does_not_ack_the_earlier(tmp_path):
    """Each round two tasks wait on bob's deliveries and alice sends two messages: the task
    handed the later one calls `done` of it (durable), and the ack it makes, as the broker holds
    it (admin `stats`), is before the earlier one, which the other task has not declared done;
    then that `done` acks both. Until 2026-12-06, when the later was taken first, its `done`
    acked the earlier too (lost, had the process died), and that `done` raised ClientError
    "invalid" ("not a delivery taken from deliveries()") for a delivery it had taken."""
    with trio.fail_after(120):
        async with running_broker(tmp_path / "data") as h:
            async with h.client("bob") as bob, h.client("alice") as alice, \
                    h.client("root", role="admin", deliver=False) as admin:
                for n in range(ROUNDS):
                    for i in range(2):  # (alice alone writes to bob: seq is inbox_seq)
                        head = (await alice.send(f"{n}-{i}", to="bob")).seq
                    # both queued in bob's client, then two takers in the same trio turn
                    await wait_until(lambda: bob._inbox.yielded >= head)  # noqa: B023
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
