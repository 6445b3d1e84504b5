"""The SDK split (2026-12-06) kept `Client`'s attributes live: the settings, `welcome`,
`connected` and `reconnects` are the link's, read and written through `Client` (a review of the
split, which found no behaviour change). Each test uses only `Client`'s public attributes, so
it runs the same against the client from before the split; a copy made at construction, or an
event replaced on one object and read from another, fails it."""

from __future__ import annotations

import pytest
import trio

from broker.client import BrokerUnavailable, ConnectionLost
from tests.procs import BrokerProcess


async def _until(check, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def test_settings_written_after_open_reach_the_running_client(tmp_path):
    """`reconnect_timeout` and `on_unreachable` set on an open client rule its next outage:
    opened to retry for ever and to tell no one, it tells the new callback and gives up after
    the new timeout once the broker is gone."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        told: list[str] = []
        with pytest.raises((ConnectionLost, BrokerUnavailable)):
            async with bp.client("bob", "b", reconnect_timeout=None) as bob:
                await bob.ping()
                bob.on_unreachable = told.append
                bob.reconnect_timeout = 1.0
                assert (bob.on_unreachable, bob.reconnect_timeout) == (told.append, 1.0)
                bp.kill()
                with trio.fail_after(30):  # with the timeout of the open, never
                    async for _ in bob.deliveries():
                        pass
        assert len(told) == 1 and "cannot reach" in told[0], told
    finally:
        bp.kill()


async def test_connected_welcome_and_reconnects_follow_the_reconnect(tmp_path):
    """After a drop `connected` is a new event, unset until the reconnect, then set; the one
    read before stays set. `welcome` is the new session's and `reconnects` counts it."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        async with bp.client("bob", "b", reconnect_timeout=60) as bob:
            await bob.ping()
            was, welcome = bob.connected, bob.welcome
            assert was.is_set() and bob.reconnects == 0
            bp.kill()
            await _until(lambda: bob.connected is not was)
            assert not bob.connected.is_set() and was.is_set()
            await bp.astart()
            with trio.fail_after(20):
                await bob.connected.wait()
            await bob.ping()
            assert bob.welcome is not welcome and bob.welcome.user == "bob"
            assert bob.reconnects == 1
    finally:
        bp.kill()
