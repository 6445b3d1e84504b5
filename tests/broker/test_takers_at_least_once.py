"""At-least-once under concurrency, checked from the broker's side: several takers of one
client's deliveries (trio tasks; a BlockingClient's threads), random handling times, `done`
and `ack` mixed in random orders (durable or not, some cancelled), receives cancelled by a
timeout, and the connection dropped at random (the broker's end of the session aborted; the
child broker restarted). At any point the device's ack the broker holds (admin `stats`) is
within what the application finished: the deliveries it declared `done`, or acked itself,
every one before it included. And a new client of the device (the process restarted) is
handed again every delivery not finished (docs/CLIENT.md, "Acks")."""

from __future__ import annotations

import random
import threading
import time
from functools import partial

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client_blocking import connect
from broker.errors import CloseReason
from tests.faults.conftest import scaled
from tests.harness import running_broker
from tests.procs import BrokerProcess
from tests.waits import HANG_GUARD_S, wait_until, wait_until_sync


class Finished:
    """What the application finished: each delivery it declared done or acked itself (an ack
    finishes every delivery up to it). Marked before the call that may ack it."""

    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.prefix = 0  # every delivery up to it is finished
        self.lock = threading.Lock()  # the blocking form's threads

    def add(self, seq: int) -> int:
        with self.lock:
            self.seqs.add(seq)
            while self.prefix + 1 in self.seqs:
                self.prefix += 1
            return self.prefix

    def acked_within(self, acked: int, violations: list) -> None:
        """Read after the broker said `acked`: the prefix only grows, so an ack past it now
        was past it then."""
        if acked > self.prefix:
            violations.append((acked, self.prefix, sorted(self.seqs)[-5:]))


async def takers_against_drops(data, seed: int, messages: int, takers: int,
                               drops: int) -> None:
    rnd = random.Random(seed)
    finished, violations = Finished(), []
    handed: list[list[int]] = [[] for _ in range(takers)]
    # A window of them all: a delivery never finished holds the acks, and the broker sends no
    # more than its window past the ack.
    async with running_broker(data, window=max(256, messages)) as h:
        async with h.client("alice") as alice, \
                h.client("root", role="admin", deliver=False) as admin:

            async def check() -> None:
                finished.acked_within((await admin.stats("bob", "d1")).acked, violations)

            async with h.client("bob") as bob:

                async def send() -> None:
                    sent = 0  # alice alone writes to bob: one inbox entry a message
                    while sent < messages:
                        # A burst at once: a backlog queued in bob's client, which the takers
                        # take from in the same turn.
                        async with trio.open_nursery() as burst:
                            for _ in range(min(messages - sent, rnd.randint(1, 40))):
                                sent += 1
                                burst.start_soon(partial(alice.send, f"m{sent}", to="bob"))
                        await trio.sleep(rnd.random() * 0.03)

                async def take(k: int) -> None:
                    while True:
                        d = None
                        with trio.move_on_after(rnd.choice([0.0005, 0.005, 60])):
                            d = await bob.deliveries().receive()
                        if d is None:
                            continue
                        handed[k].append(d.inbox_seq)
                        if rnd.random() < 0.5:  # else done at once, before another checkpoint
                            await trio.sleep(rnd.random() * 0.004)
                        roll = rnd.random()
                        if roll < 0.02:
                            continue  # never finished: the restarted client has it again
                        prefix = finished.add(d.inbox_seq)
                        durable = rnd.random() < 0.3
                        if roll < 0.15 and prefix:  # an ack of what the application finished
                            await bob.ack(prefix, durable=durable)
                        elif roll < 0.25:  # a done cut short: done again later, or not at all
                            with trio.move_on_after(rnd.random() * 0.002):
                                await bob.done(d, durable=durable)
                        else:
                            await bob.done(d, durable=durable)
                        if rnd.random() < 0.3:  # (and the watcher's): not every time, or the
                            await check()  # takers come back to take one by one

                async def drop() -> None:
                    # A few: each session that ends within STABLE_AFTER_S doubles the
                    # client's backoff before the next connect.
                    for _ in range(drops):
                        await trio.sleep(rnd.random() * 0.1)
                        for session in list(h.broker.hub.sessions("bob")):
                            session.abort(CloseReason.BROKEN)

                async def watch() -> None:
                    while True:
                        await check()
                        await trio.sleep(0.002)

                async with trio.open_nursery() as nursery:
                    for k in range(takers):
                        nursery.start_soon(take, k)
                    nursery.start_soon(drop)
                    nursery.start_soon(watch)
                    await send()
                    await wait_until(lambda: sum(map(len, handed)) >= messages)
                    nursery.cancel_scope.cancel()
            await check()
            assert violations == []
            everyone = sorted(s for seqs in handed for s in seqs)
            assert everyone == list(range(1, messages + 1))  # each once, none skipped
            assert all(seqs == sorted(seqs) for seqs in handed)  # each taker in inbox order

            async with h.client("bob") as again:  # the process restarted
                acked = again.welcome.acked  # (the last plain acks may land after `stats`)
                finished.acked_within(acked, violations)
                await wait_until(lambda: again._inbox.yielded >= messages)
                resent = []
                while True:
                    try:
                        resent.append(again.deliveries().receive_nowait().inbox_seq)
                    except trio.WouldBlock:
                        break
            assert violations == []
            assert resent == list(range(acked + 1, messages + 1))
            assert set(range(1, messages + 1)) - finished.seqs <= set(resent)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), takers=st.integers(2, 4))
def test_several_takers_done_and_ack_mixed_with_drops_ack_nothing_unfinished(
        tmp_path_factory, seed, takers):
    data = tmp_path_factory.mktemp("takers") / "data"
    trio.run(takers_against_drops, data, seed, 200, takers, 4)


@pytest.mark.long
@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), takers=st.integers(2, 8))
def test_several_takers_with_drops_long(tmp_path_factory, seed, takers):
    """As above with HOMING_LONG_SCALE x 600 messages and x 8 drops (at least 200 and 4)."""
    data = tmp_path_factory.mktemp("takers") / "data"
    trio.run(takers_against_drops, data, seed, scaled(600, 200), takers, scaled(8, 4))


def blocking_threads_against_restarts(data, seed: int, messages: int, threads: int,
                                      restarts: int) -> None:
    rnd = random.Random(seed)
    finished, violations, errors = Finished(), [], []
    handed: list[list[int]] = [[] for _ in range(threads)]
    with BrokerProcess(data, "--window", str(max(256, messages))) as bp:  # (as above)
        admin = connect(bp.server, bp.token("root", "admin"), "ops", deliver=False)
        alice = connect(bp.server, bp.token("alice"), "d1")
        bob = connect(bp.server, bp.token("bob"), "d1")
        check_lock = threading.Lock()

        def check() -> None:
            with check_lock:
                finished.acked_within(admin.stats("bob", "d1").acked, violations)

        handled = [0] * threads  # deliveries each thread is over with (the close waits)

        def take(k: int) -> None:
            try:
                for d in bob.deliveries():
                    handed[k].append(d.inbox_seq)
                    if rnd.random() < 0.5:
                        time.sleep(rnd.random() * 0.004)
                    roll = rnd.random()
                    if roll >= 0.02:  # else never finished
                        prefix = finished.add(d.inbox_seq)
                        if roll < 0.15 and prefix:
                            bob.ack(prefix, durable=rnd.random() < 0.3)
                        else:
                            bob.done(d, durable=rnd.random() < 0.3)
                        check()
                    handled[k] += 1
            except BaseException as exc:  # for the assertion below
                errors.append(exc)

        workers = [threading.Thread(target=take, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        try:
            per_restart = messages // (restarts + 1)
            for r in range(restarts + 1):
                for i in range(per_restart if r < restarts else messages - r * per_restart):
                    alice.send(f"m{r}-{i}", to="bob")
                if r < restarts:  # restart once some of those sent were handed
                    some = rnd.randint(1, (r + 1) * per_restart)
                    wait_until_sync(lambda: errors or sum(map(len, handed)) >= some)  # noqa: B023
                    bp.kill() if rnd.random() < 0.5 else bp.terminate()
                    bp.start()
            assert wait_until_sync(lambda: errors or sum(handled) >= messages)
        finally:
            bob.close()
            for t in workers:
                t.join(HANG_GUARD_S)
        check()
        assert (errors, violations) == ([], []), seed
        everyone = sorted(s for seqs in handed for s in seqs)
        assert everyone == list(range(1, messages + 1)), seed
        assert all(seqs == sorted(seqs) for seqs in handed), seed
        with connect(bp.server, bp.token("bob"), "d1") as again:  # the process restarted
            acked, resent = again.welcome.acked, []
            finished.acked_within(acked, violations)
            while acked < messages and (d := again.next_delivery(HANG_GUARD_S)) is not None:
                resent.append(d.inbox_seq)
                if d.inbox_seq >= messages:
                    break
        alice.close()
        admin.close()
        assert violations == [], seed
        assert resent == list(range(acked + 1, messages + 1)), seed
        assert set(range(1, messages + 1)) - finished.seqs <= set(resent), seed


def test_blocking_client_threads_through_broker_restarts_ack_nothing_unfinished(tmp_path):
    blocking_threads_against_restarts(tmp_path / "data", random.randrange(2**32), 240, 3, 2)


@pytest.mark.long
@pytest.mark.parametrize("seed", range(8))
def test_blocking_client_threads_through_broker_restarts_long(tmp_path, seed):
    """As above with HOMING_LONG_SCALE x 1,200 messages and x 5 restarts (at least 240, 2)."""
    blocking_threads_against_restarts(tmp_path / "data", seed, scaled(1200, 240), 6,
                                      scaled(5, 2))
