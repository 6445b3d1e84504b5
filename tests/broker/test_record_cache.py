"""`homing serve --record-cache N`: the log records kept in memory for the deliveries that
follow their commit. It was a fixed 4,096 (up to 4,096 x --max-body-bytes of memory: 256 MiB
at the defaults), which an operator of a small machine could not lower."""

from __future__ import annotations

import json

from broker.config import Config
from storage.commands import SendMessage
from storage.queries import RECORD_CACHE
from storage.store import Store
from tests.broker.test_messaging import recv
from tests.harness import running_broker
from tests.procs import homing


def test_the_default_is_the_stores():
    assert Config().record_cache == RECORD_CACHE == 4096


def test_a_store_keeps_at_most_that_many_records_but_a_whole_commit(tmp_path):
    store = Store.open(str(tmp_path / "data"), record_cache=3)
    try:
        store.execute([SendMessage("alice", "d", "user", f"c{i}", f"hi {i}", to="bob")
                       for i in range(5)])
        # The commit's records (the conversation, its two members, the 5 messages), kept
        # whole for its deliveries past the bound of 3.
        assert len(store._records) == store.last_lsn() == 8
        store.execute([SendMessage("alice", "d", "user", "c5", "hi 5", to="bob")])
        assert len(store._records) == 1  # past the bound: emptied, then this commit's
        items, last = store.deliverable("bob", 0, 100)
        assert [i.body for i in items] == [f"hi {i}" for i in range(6)] and last == 6
        assert len(store._records) <= 3
    finally:
        store.close()


async def test_a_broker_keeping_no_records_delivers_all_the_same(tmp_path):
    async with running_broker(tmp_path / "data", record_cache=0) as h, \
            h.client("shop") as shop, h.client("member-42") as member:
        for i in range(20):
            await shop.send(f"book {i} is back", to="member-42")
        got = await recv(member, 20)
        assert [d.body for d in got] == [f"book {i} is back" for i in range(20)]


def test_the_flag_takes_zero_and_refuses_a_negative(tmp_path):
    proc = homing("serve", "--data", str(tmp_path / "data"), "--record-cache", "-1",
                  check=False)
    assert proc.returncode == 2, proc
    error = json.loads(proc.stderr.splitlines()[-1])
    assert error["error"] == "usage" and "--record-cache" in error["message"], error
    assert "--record-cache" in homing("serve", "--help").stdout
