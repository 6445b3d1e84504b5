"""With every handshake place taken, a connection that speaks takes the place of one that has
said nothing for awaiting.SILENT_S, of the address holding the most (broker/awaiting.py)."""

from __future__ import annotations

import random
import select

import pytest
import trio

import protocol as wire
from broker import awaiting
from broker.session import Session
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until


async def _silent(port: int, host: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=host)


async def _told(stream: trio.SocketStream) -> wire.Error | None:
    """The closing error the broker wrote to `stream` (None: closed with nothing said)."""
    got = RawClient(stream)
    frame = await got.next()
    assert frame is None or isinstance(frame, wire.Error), frame
    return frame


def _quiet(stream: trio.SocketStream) -> bool:
    """Nothing came from the broker on `stream`: neither a byte nor its close."""
    readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
    return not readable


async def test_a_hello_takes_the_place_of_a_connection_silent_for_a_second(tmp_path):
    """Three connections that say nothing hold --max-handshakes 3: a hello made at once is
    refused `limit_exceeded`, as before; once they have been silent SILENT_S, a client's hello
    takes the place of the one waiting longest, which is told `limit_exceeded` with retry_ms,
    and the broker counts it. Before 2026-12-07 the client was refused until the silent ones
    timed out (30 s here)."""
    async with running_broker(tmp_path / "data", max_handshakes=3, handshake_timeout_s=30) as h:
        with trio.fail_after(30):
            port = h.broker.port
            silent = []
            for _ in range(3):
                silent.append(await _silent(port))
                await wait_until(lambda: h.broker.handshaking == len(silent))
            early = await RawClient.connect(h.server)
            await early.send(wire.Hello(versions=(1,), token=h.token("early"), device="d",
                                        id=0))
            refused = await early.next()
            assert isinstance(refused, wire.Error) and refused.name == "limit_exceeded", refused
            await early.stream.aclose()

            await trio.sleep(awaiting.SILENT_S + 0.1)
            began = trio.current_time()
            async with h.client("alice", reconnect_timeout=2) as alice:
                await alice.ping()
                took = trio.current_time() - began
            assert took < 2, took
            told = await _told(silent[0])
            assert told is not None and told.name == "limit_exceeded" and told.close, told
            assert told.retry_ms == int(awaiting.SILENT_S * 1000)
            assert "no hello within" in told.message, told.message
            assert all(_quiet(s) for s in silent[1:])
            async with h.client("ops", role="monitor", deliver=False) as ops:
                stats = await ops.stats()
            assert stats.handshakes_given_up == 1
            assert stats.handshaking == 2  # alice's place was the given-up one, and is free
            given_up = [e for e in h.logs if e["event"] == "handshake_given_up"]
            assert len(given_up) == 1 and given_up[0]["address"] == "127.0.0.1", given_up
            for s in silent:
                await s.aclose()
            await wait_until(lambda: h.broker.handshaking == 0 and not h.broker.awaiting)


async def test_the_place_given_up_is_of_the_address_holding_the_most(tmp_path):
    """One silent connection from 127.0.0.2, then three from 127.0.0.1, hold the four places:
    a client's hello takes the place of 127.0.0.1's oldest, not of 127.0.0.2's, which came
    first: one address's flood does not cost another address its place."""
    async with running_broker(tmp_path / "data", max_handshakes=4, handshake_timeout_s=30) as h:
        with trio.fail_after(30):
            port = h.broker.port
            few = await _silent(port, "127.0.0.2")
            await wait_until(lambda: h.broker.handshaking == 1)
            many = []
            for _ in range(3):
                many.append(await _silent(port, "127.0.0.1"))
                await wait_until(lambda: h.broker.handshaking == 1 + len(many))
            await trio.sleep(awaiting.SILENT_S + 0.1)
            client = RawClient(await _silent(port, "127.0.0.3"))
            await client.hello(h.token("u"), "d")
            told = await _told(many[0])
            assert told is not None and told.name == "limit_exceeded", told
            assert _quiet(few) and _quiet(many[1]) and _quiet(many[2])
            await client.stream.aclose()
            for s in (few, *many):
                await s.aclose()


@pytest.mark.parametrize("what", ["bad token", "garbage"])
async def test_a_connection_that_did_not_say_hello_takes_no_place(tmp_path, what):
    """Only a hello with a good token takes a silent connection's place: a forged token or
    bytes that are no hello are refused `limit_exceeded` as before, and the silent one
    waits on."""
    async with running_broker(tmp_path / "data", max_handshakes=1, handshake_timeout_s=30) as h:
        with trio.fail_after(30):
            silent = await _silent(h.broker.port)
            await wait_until(lambda: h.broker.handshaking == 1)
            await trio.sleep(awaiting.SILENT_S + 0.1)
            other = RawClient(await trio.open_tcp_stream("127.0.0.1", h.broker.port))
            if what == "bad token":
                await other.send(wire.Hello(versions=(1,), token=h.token("eve")[:-4] + "AAAA",
                                            device="d", id=0))
            else:
                await other.stream.send_all(b"\x00\x00\x00\x05hello")
            refused = await other.next()
            assert isinstance(refused, wire.Error) and refused.name == "limit_exceeded", refused
            await other.stream.aclose()
            assert _quiet(silent)
            assert h.broker.places_given_up.total == 0
            await silent.aclose()


async def test_an_address_holding_as_many_is_looked_at_next(tmp_path, monkeypatch):
    """127.0.0.1, 127.0.0.2 and 127.0.0.4 hold a place each (127.0.0.1 two, then one once its
    oldest closed): 127.0.0.1's left is young, 127.0.0.2's silent for awaiting.SILENT_S; a
    hello takes 127.0.0.2's place. Until the review of 2026-12-07 the choice stopped at the
    address that came first (127.0.0.1, its connection young) and the hello was refused
    `limit_exceeded`, though a connection of an address holding as many was silent."""
    monkeypatch.setattr(awaiting, "SILENT_S", 3.0)
    async with running_broker(tmp_path / "data", max_handshakes=3, handshake_timeout_s=30) as h:
        with trio.fail_after(30):
            port = h.broker.port
            began = trio.current_time()
            first = await _silent(port, "127.0.0.1")
            await wait_until(lambda: h.broker.handshaking == 1)
            await trio.sleep_until(began + 0.5)
            old = await _silent(port, "127.0.0.2")
            await wait_until(lambda: h.broker.handshaking == 2)
            await trio.sleep_until(began + 2.5)
            young = await _silent(port, "127.0.0.1")
            await wait_until(lambda: h.broker.handshaking == 3)
            await first.aclose()
            await wait_until(lambda: h.broker.handshaking == 2)
            other = await _silent(port, "127.0.0.4")
            await wait_until(lambda: h.broker.handshaking == 3)
            await trio.sleep_until(began + 4.0)  # `old` silent 3.5 s, `young` 1.5 s
            client = RawClient(await _silent(port, "127.0.0.3"))
            await client.hello(h.token("u"), "d")
            told = await _told(old)
            assert told is not None and told.name == "limit_exceeded", told
            assert _quiet(young) and _quiet(other)
            await client.stream.aclose()
            for s in (old, young, other):
                await s.aclose()
            await wait_until(lambda: h.broker.handshaking == 0 and not h.broker.awaiting)


def _index_holds(waiting: awaiting.Awaiting) -> None:
    """The addresses by count (`_by_count`, `_most`) say what `_by_address` holds."""
    counts = {address: len(held) for address, held in waiting._by_address.items()}
    assert all(counts.values()) and sum(counts.values()) == len(waiting)
    assert waiting._most == max(counts.values(), default=0)
    expected: dict[int, set[str]] = {}
    for address, n in counts.items():
        expected.setdefault(n, set()).add(address)
    assert {n: set(held) for n, held in waiting._by_count.items()} == expected


async def test_the_addresses_by_count_follow_every_add_and_remove(tmp_path):
    """The index that lets a choice find the address holding the most places in a step (since
    the review of 2026-12-07 a choice no longer takes a max over every address: about 0.5 ms
    at 20,000 of them, for each connection that spoke past the limit) stays what the places
    held say, through random adds and removes over six addresses, given-up places included;
    and the place a choice gives up is one of an address holding the most."""
    async with running_broker(tmp_path / "data") as h:
        ours, theirs = trio.socket.socketpair()
        stream = trio.SocketStream(ours)
        for seed in range(20):
            rng = random.Random(seed)
            waiting = awaiting.Awaiting()
            held: list[Session] = []
            for step in range(300):
                if held and rng.random() < 0.45:
                    waiting.remove(held.pop(rng.randrange(len(held))))
                else:
                    session = Session(h.broker, stream, step, "?")
                    session.address = f"2001:db8:{rng.randrange(6)}::/64"
                    waiting.add(session, trio.CancelScope(), float(step))
                    held.append(session)
                _index_holds(waiting)
                if rng.random() < 0.1:  # every place silent by now, none with bytes unread
                    most = max((len(v) for v in waiting._by_address.values()), default=0)
                    chosen = waiting.give_up_one(step + awaiting.SILENT_S)
                    if most:
                        assert chosen is not None and chosen.place_given_up
                        assert len(waiting._by_address.get(chosen.address, ())) == most - 1
                        held.remove(chosen)
                        waiting.remove(chosen)  # as its handshake's end does: nothing more
                    else:
                        assert chosen is None
                    _index_holds(waiting)
        ours.close()
        theirs.close()
