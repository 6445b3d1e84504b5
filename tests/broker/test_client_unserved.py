"""A broker that welcomes a device and then closes each of its sessions before serving it: the
SDK gives up after reconnect_timeout, with BrokerUnavailable saying what happened.

The fault is real: one page of the LMDB file is damaged (its page type overwritten), the leaf
that holds the log record of bob's only delivery. Bob's hello reads other tables and is
welcomed; each delivery read meets the damaged page, and the broker closes the session with
`unavailable` (PROTOCOL.md §7). Each reconnect "succeeded" at hello, so the SDK's reconnect
timeout, counted from the last welcome, never ran out: it reconnected for ever.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import trio

from broker.client import BrokerUnavailable, ConnectionLost
from storage.commands import SendMessage
from storage.store import Store
from tests.harness import running_broker

MARK = b"for-bob-on-a-damaged-page"
PAGE = 4096  # LMDB's page size here (the OS page)
P_LEAF = 0x02  # LMDB's page flags: at offset 10 of each page's header


def damage_bobs_delivery(data: Path) -> None:
    """A data directory where carol sent bob one message, whose log record sits on a leaf page
    that is then damaged (no longer typed a leaf: LMDB reads it as MDB_CORRUPTED), and 400
    messages carol sent dave after it, so that the log's tail lies on other pages."""
    store = Store.open(str(data))
    try:
        store.execute([SendMessage("carol", "d", "user", "c-bob", MARK.decode(), to="bob")])
        for b in range(4):
            store.execute([SendMessage("carol", "d", "user", f"c{b}-{i}", "filler " * 20,
                                       to="dave") for i in range(100)])
    finally:
        store.close()
    damaged = 0
    with open(data / "data.mdb", "r+b") as f:
        raw = f.read()
        for start in range(0, len(raw), PAGE):
            page = raw[start:start + PAGE]
            if MARK in page and struct.unpack_from("<H", page, 10)[0] & P_LEAF:
                f.seek(start + 10)
                f.write(struct.pack("<H", 0))
                damaged += 1
    assert damaged >= 1


async def test_sessions_closed_before_serving_anything_are_given_up_in_time(tmp_path):
    damage_bobs_delivery(tmp_path / "data")
    async with running_broker(tmp_path / "data", expected_errors=("delivery_read_failed",)) as h:
        told: list[str] = []
        started = time.monotonic()
        with trio.fail_after(20):
            async with h.client("bob", reconnect_timeout=2, on_unreachable=told.append) as bob:
                assert bob.welcome.head == 1  # welcomed: the hello's reads are fine
                with pytest.raises(BrokerUnavailable) as gave_up:
                    await bob.deliveries().receive()
                with pytest.raises(BrokerUnavailable):
                    await bob.ping()
        took = time.monotonic() - started
        assert 2 <= took < 6, took
        assert bob.reconnects >= 2
        assert isinstance(gave_up.value, ConnectionLost)  # what callers catch already
        assert gave_up.value.name == "unavailable"
        message = str(gave_up.value)
        assert "cannot reach" not in message, message
        assert f"{h.server} closed the session before serving anything" in message, message
        assert "unavailable: storage unavailable" in message, message
        # Told once, when the first session was closed unserved, what is going on.
        assert len(told) == 1, told
        assert told[0].startswith(f"{h.server} closed the session"), told
        assert sum(e["event"] == "delivery_read_failed" for e in h.logs) >= 2


async def test_without_a_reconnect_timeout_it_goes_on_and_says_why_once(tmp_path):
    """reconnect_timeout=None: it never gives up (as documented), and tells on_unreachable
    once why nothing comes (it was never called: each welcome counted as connected)."""
    damage_bobs_delivery(tmp_path / "data")
    async with running_broker(tmp_path / "data", expected_errors=("delivery_read_failed",)) as h:
        told: list[str] = []
        async with h.client("bob", reconnect_timeout=None, on_unreachable=told.append) as bob:
            with trio.fail_after(30):  # it goes on: welcomed three times (3 s was a guess)
                while bob.reconnects < 2:
                    await trio.sleep(0.02)
            assert bob.reconnects >= 2 and len(told) == 1, (bob.reconnects, told)
            assert bob._link.fatal is None
