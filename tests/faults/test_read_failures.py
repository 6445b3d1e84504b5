"""The broker's store reads failing for real: another process holds every slot of LMDB's reader
table (MAX_READERS), as a crowd of audit and export tools reading the same directory would.

Writes need no reader slot, so sends still commit; every read in the broker fails. What must
hold meanwhile: each failed read is answered `unavailable` (a query) or said in a closing
`unavailable` (a hello), the session and the broker go on, and once the slots are free again
everything is there and served.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.faults.conftest import RawClient
from tests.harness import running_broker

# Opens the data directory read-only and begins read transactions until LMDB says its reader
# table is full; prints how many it holds, then holds them until its stdin closes.
HOLDER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], subdir=True, readonly=True, lock=True, max_dbs=32)
held = []
while True:
    try:
        held.append(env.begin())
    except lmdb.ReadersFullError:
        break
print(len(held), flush=True)
sys.stdin.read()
"""

EXPECTED = ("request_failed", "hello_failed", "push_dropped", "delivery_read_failed")


class ReadersHeld:
    """A child process holding every free reader slot of `data` until `release`."""

    def __init__(self, data) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def held(self) -> int:
        return int(await trio.to_thread.run_sync(self.proc.stdout.readline))

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def test_reads_that_fail_are_answered_unavailable_and_nothing_is_lost(tmp_path):
    async with running_broker(tmp_path / "data", expected_errors=EXPECTED) as h:
        async with h.client("bob") as bob:
            async with h.client("alice") as alice:
                conv = (await alice.send("before", to="bob")).conv
                holder = ReadersHeld(tmp_path / "data")
                try:
                    assert await holder.held() > 1000  # all but the broker's own, if any
                    with pytest.raises(ClientError) as refused:
                        await alice.history(conv)
                    assert refused.value.name == "unavailable"
                    # The session goes on: a send commits (a write needs no reader slot).
                    during = await alice.send("during", to="bob")
                    assert (during.conv, during.seq) == (conv, 2)
                    # A hello cannot be answered with a welcome: it is told why.
                    raw = await RawClient.connect(h.server)
                    await raw.send(wire.Hello(versions=(1,), token=h.token("carol"),
                                              device="raw", id=0))
                    said = await raw.next()
                    await raw.aclose()
                    assert isinstance(said, wire.Error), said
                    assert (said.name, said.close) == ("unavailable", True)
                    # alice leaves while her peers cannot be read (her status push).
                except BaseException:
                    holder.release()
                    raise
            try:
                with trio.fail_after(10):
                    while not any(e["event"] == "push_dropped" for e in h.logs):
                        await trio.sleep(0.01)
            finally:
                holder.release()
            # Everything is there and served again, to the sessions that lived through it and
            # to new ones.
            with trio.fail_after(30):
                page = await bob.history(conv, order="oldest")
                assert [m.body for m in page.messages] == ["before", "during"]
                got = []
                async for d in bob.deliveries():
                    got.append(d.body)
                    if d.body == "during":
                        break
                assert got[-1] == "during"
                async with h.client("carol") as carol:
                    await carol.send("after", to="bob")
        events = {e["event"] for e in h.logs}
        assert {"request_failed", "hello_failed", "push_dropped"} <= events
        assert h.broker.hub.count == 0
