"""The log's times when the wall clock steps back (review of time and clocks, 2026-12-05).

The wall clock is the outside world: these tests set `time.time_ns` back, or pass `now_us`,
which `Store.execute` takes in its place.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import msgpack
import pytest
from structlog.testing import capture_logs

from storage import audit
from storage.commands import CreateConv, MarkRead, SendMessage
from storage.records import lsn_key
from storage.store import Store
from tests.storage.test_send_compiled import python_rules_only

STEP_US = 5 * 60 * 1_000_000  # a step back the log holds (storage.clock.MAX_HOLD_US: 10 min)
HOUR_US = 3600 * 1_000_000
T0 = 1_800_000_000 * 1_000_000


def _send(cid: str, body: str = "hi") -> SendMessage:
    return SendMessage("bob", "d1", "user", cid, body, to="alice")


class _Wall:
    """`time.time_ns`, set by the test."""

    def __init__(self, monkeypatch, us: int) -> None:
        self.us = us
        monkeypatch.setattr(time, "time_ns", lambda: self.us * 1000)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_clock_set_back_does_not_set_the_logs_times_back(store, monkeypatch, compiled):
    """The wall clock stepped back 5 minutes between two sends: the second message was logged
    5 minutes before the first (history and deliver showed it as older, though later in its
    conversation), and a replay up to its own time (`audit inbox --at`) stopped before the
    first message, leaving both out. Now a batch is not stamped before the last record (for a
    step back of up to MAX_HOLD_US)."""
    wall = _Wall(monkeypatch, T0)
    with nullcontext() if compiled else python_rules_only():
        store.execute([_send("c1")])
        wall.us = T0 - STEP_US
        store.execute([_send("c2"), MarkRead("alice", "d1", "user", "dm:alice:bob", 1)])
        msgs, _ = store.history("dm:alice:bob", newest_first=False)
        assert [m["ts"] for m in msgs] == [T0, T0]
        times = [ev.ts_us for ev in store.read_events()]
        assert times == sorted(times) and times[-1] == T0
        _, lsn, ts = audit.replay(store, until_us=msgs[-1]["ts"])
        assert (lsn, ts) == (store.last_lsn(), T0)
        [item] = store.inbox_after("alice", 1, 10)
        assert item.ts_us == T0
        wall.us = T0 + 5  # caught up: the wall clock again
        store.execute([_send("c3")])
        assert store.history("dm:alice:bob", limit=1)[0][0]["ts"] == T0 + 5


def test_the_last_logged_time_holds_across_a_restart(tmp_path):
    """The broker restarted after the clock was set back: its first batch is not stamped
    before the last record the previous run logged."""
    store = Store.open(str(tmp_path / "data"))
    store.execute([_send("c1")], now_us=T0)
    store.close()
    store = Store.open(str(tmp_path / "data"))
    try:
        store.execute([_send("c2")], now_us=T0 - STEP_US)
        assert [ev.ts_us for ev in store.read_events()][-1] == T0
    finally:
        store.close()


def test_a_batch_that_logs_nothing_does_not_move_the_logs_time(store):
    """Only a committed record sets the time later batches may not go below: a batch that
    logged nothing (a duplicate send) leaves it where the log's last record is."""
    store.execute([_send("c1")], now_us=T0)
    store.execute([_send("c1")], now_us=T0 + HOUR_US)  # a dup: no event
    store.execute([_send("c2")], now_us=T0 + 10)
    assert [ev.ts_us for ev in store.read_events()][-1] == T0 + 10


def test_the_store_says_when_the_clock_is_behind_the_log_and_when_it_caught_up(store):
    """Once when the wall clock falls behind the log (how far), once when it passes it."""
    with capture_logs() as logs:
        store.execute([_send("c1")], now_us=T0)
        store.execute([_send("c2")], now_us=T0 - STEP_US)
        store.execute([_send("c3")], now_us=T0 - STEP_US + 1)
        store.execute([_send("c4")], now_us=T0 + 1)
    events = [(e["event"], e.get("behind_s")) for e in logs if e["event"].startswith("clock")]
    assert events == [("clock_behind_log", 300.0), ("clock_caught_up", None)]


def test_a_last_record_without_a_readable_time_does_not_stop_the_store(tmp_path):
    """A last record whose body does not decode (`audit verify` names it) leaves the store
    opening and writing, on the wall clock, as it did."""
    from tests.audit.test_damaged import poke

    store = Store.open(str(tmp_path / "data"))
    store.execute([_send("c1")], now_us=T0)
    last = store.last_lsn()
    store.close()

    def spoil(txn, db):
        value = txn.get(lsn_key(last), db=db("log"))
        txn.put(lsn_key(last), value[:32] + msgpack.packb(["not", "an", "event"]), db=db("log"))

    poke(tmp_path / "data", spoil)
    store = Store.open(str(tmp_path / "data"))
    try:
        [out] = store.execute([CreateConv("ann", "d1", "user", "group", "g", False, ())],
                              now_us=T0 - HOUR_US)
        assert out.error is None
    finally:
        store.close()


def test_a_clock_far_behind_the_log_is_taken_as_it_is(store):
    """A wall clock more than MAX_HOLD_US behind the log's last time says that time is the
    wrong one (a host that booted years ahead and logged before NTP set it right): held, every
    later message would carry that future time until the clock reached it. The wall clock is
    taken, times go back once, and that is logged as an error; then the log moves on as ever."""
    from storage.clock import MAX_HOLD_US

    ahead = T0 + 10 * 365 * 24 * HOUR_US  # ten years ahead
    with capture_logs() as logs:
        store.execute([_send("c1")], now_us=ahead)
        store.execute([_send("c2")], now_us=ahead - MAX_HOLD_US)  # held, at the bound
        store.execute([_send("c3")], now_us=T0)  # ten years behind: taken
        store.execute([_send("c4")], now_us=T0 - STEP_US)  # held at T0 again
    times = [ev.ts_us for ev in store.read_events() if ev.type == "message.accepted"]
    assert times == [ahead, ahead, T0, T0]
    events = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("clock")]
    assert events == [("clock_behind_log", "warning"), ("clock_stepped_back", "error"),
                      ("clock_behind_log", "warning")]
