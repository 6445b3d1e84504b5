"""What a write batch that fails says about why: a damaged projection row it read is
`CorruptProjection` naming that row's table and key, raised where the row is decoded; any other
exception (a bug in the projections or the store) is `InternalError`, chained to it with its
traceback, and never called corrupt. Either way nothing was written and the next batch runs. A
bug in a rule fails its command alone (`CommandInternalError`, since 2026-12-05).

Found by a review (2026-12-05): `Store.execute` turned every KeyError, TypeError, ValueError,
... raised anywhere in a batch into `CorruptProjection(None, None, ...)` ("a row this batch read
does not decode"), so a bug sent the operator to `homing audit rebuild` for nothing, and its
traceback was not logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import rules
from storage import store as store_module
from storage.commands import Ack, CreateConv, Join, SendMessage
from storage.errors import CommandInternalError, CorruptProjection, InternalError
from storage.projections import key2
from storage.store import Store
from tests.audit.test_damaged import poke

DM = "dm:alice:bob"


def _data(path: Path) -> str:
    """alice and bob's DM with two messages; alice's device `d` acked both."""
    store = Store.open(str(path))
    try:
        store.execute([SendMessage("bob", "d", "user", f"c{i}", f"hi {i}", to="alice")
                       for i in range(2)])
        store.execute([Ack("alice", "d", "user", 2, None)])
    finally:
        store.close()
    return str(path)


def _damaged(path: Path, table: str, key: bytes, value: bytes) -> Store:
    data = _data(path)
    poke(path, lambda txn, db: txn.put(key, value, db=db(table)))
    return Store.open(data)


def _works_after(store: Store) -> None:
    """The next batch, reading no damaged row, commits."""
    out = store.execute([SendMessage("carol", "d", "user", "k1", "yo", to="dave")])
    assert out[0].error is None and out[0].reply["seq"] == 1


SENDS = {
    # how a send reaches the rows: the compiled send path (where built), or decide and apply
    "fast path": False,
    "rules and apply": True,
}


@pytest.mark.parametrize("way", sorted(SENDS))
def test_a_send_meeting_a_short_inbox_head_names_it(tmp_path, monkeypatch, way):
    """The send's batch reads alice's inbox head to append to her inbox: a short one fails the
    batch as CorruptProjection in inbox_head at b'alice' (it said "a row this batch read")."""
    if SENDS[way]:
        monkeypatch.setattr(store_module, "SEND_MESSAGE", None)
    store = _damaged(tmp_path / "data", "inbox_head", b"alice", b"\x00\x02")
    try:
        with pytest.raises(CorruptProjection) as corrupt:
            store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice")])
        assert (corrupt.value.table, corrupt.value.key) == ("inbox_head", b"alice")
        assert str(corrupt.value).startswith(
            "projection corrupt in inbox_head at key b'alice': undecodable row: struct.error")
        _works_after(store)
    finally:
        store.close()


@pytest.mark.parametrize("way", sorted(SENDS))
def test_a_send_meeting_a_short_conv_seq_names_it(tmp_path, monkeypatch, way):
    if SENDS[way]:
        monkeypatch.setattr(store_module, "SEND_MESSAGE", None)
    store = _damaged(tmp_path / "data", "conv_seq", DM.encode(), b"\x02")
    try:
        with pytest.raises(CorruptProjection) as corrupt:
            store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice")])
        assert (corrupt.value.table, corrupt.value.key) == ("conv_seq", DM.encode())
        _works_after(store)
    finally:
        store.close()


@pytest.mark.parametrize("way", sorted(SENDS))
@pytest.mark.parametrize("table", ["read", "recv"])
def test_a_send_meeting_its_senders_short_mark_names_it(tmp_path, monkeypatch, way, table):
    """A send raises its sender's `read` and `recv` marks of the conversation to the new seq:
    it compared the stored bytes with the new seq's as they were, so a mark cut short (b"\x02"
    sorts after any 8-byte seq below 2**57) stayed as it was, the send committed, and the
    mark, once put right, was below what a rebuild gives (tests/broker/test_split_props.py
    found it, 2026-12-05). Now CorruptProjection naming the mark, as for the counters."""
    if SENDS[way]:
        monkeypatch.setattr(store_module, "SEND_MESSAGE", None)
    store = _damaged(tmp_path / "data", table, key2(DM, "bob"), b"\x02")
    try:
        with pytest.raises(CorruptProjection) as corrupt:
            store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice")])
        assert (corrupt.value.table, corrupt.value.key) == (table, key2(DM, "bob"))
        _works_after(store)
    finally:
        store.close()


ROWS = {
    # name: (table, key, value, a command whose batch reads it)
    "short delivered": ("delivered", b"alice\0d", b"\x02",
                        Ack("alice", "d", "user", 1, None)),
    "short inbox_head, ack": ("inbox_head", b"alice", b"\x02",
                              Ack("alice", "d", "user", 1, None)),
    "garbage conv row": ("conv", DM.encode(), b"\xc1", Join("alice", "d", "user", DM)),
    "conv row of the wrong shape": ("conv", DM.encode(), b"\x01",
                                    Join("alice", "d", "user", DM)),
    "member role no UTF-8": ("member", key2(DM, "alice"), b"\xff",
                             Join("alice", "d", "user", DM)),
    "garbage idem row": ("idem", key2("c0", "bob"), b"\x00",
                         SendMessage("bob", "d", "user", "c0", "hi 0", to="alice")),
}


@pytest.mark.parametrize("damage", sorted(ROWS))
def test_a_batch_meeting_a_damaged_row_names_it(tmp_path, damage):
    """Each row the rules decode: CorruptProjection naming it, failing the batch (a conv or
    member row that did not decode was `Invalid`, "malformed Join": the client's fault)."""
    table, key, value, command = ROWS[damage]
    store = _damaged(tmp_path / "data", table, key, value)
    try:
        with pytest.raises(CorruptProjection) as corrupt:
            store.execute([command])
        assert (corrupt.value.table, corrupt.value.key) == (table, key), corrupt.value
        _works_after(store)
    finally:
        store.close()


def test_a_bug_in_a_rule_fails_its_command_alone_as_internal_not_corrupt(tmp_path,
                                                                        monkeypatch):
    """A KeyError out of a rule (a bug, the data sound) fails that command alone, as
    CommandInternalError chained to the KeyError and its traceback (until 2026-12-05 the whole
    batch, as InternalError; before that it said "projection corrupt"): the send with it
    commits. Monkeypatched: no data makes a correct rule raise, which is the point; one rule
    of the table is replaced, the store, its tables and the other rules run as they are
    (tests/storage/test_rule_bugs.py reaches a rule bug with commands alone)."""
    def buggy(tables, cmd, now_us, limits):
        return {}["no such field"]

    store = Store.open(_data(tmp_path / "data"))
    try:
        monkeypatch.setitem(rules._DECIDE, CreateConv, buggy)
        out = store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice"),
                             CreateConv("alice", "d", "user", "group")])
        assert out[0].error is None and out[0].reply["seq"] == 3
        failed = out[1].error
        assert isinstance(failed, CommandInternalError), failed
        cause = failed.__cause__
        assert isinstance(cause, KeyError) and cause.__traceback__ is not None
        assert "buggy" in [f.name for f in _frames(cause.__traceback__)]
        assert str(failed) == "KeyError: 'no such field'"
    finally:
        store.close()


def test_a_bug_past_the_rules_is_an_internal_error_not_a_corrupt_row(tmp_path, monkeypatch):
    """A KeyError out of a batch's work past the rules (applying an event: the events before
    it are in the buffer) fails the batch as InternalError, chained to the KeyError and its
    traceback; it said "projection corrupt". Nothing is written, the send with it neither.
    Monkeypatched, as above: `apply` fails on a conv.created event, the rest runs as it is."""
    real = store_module.apply

    def buggy(tables, ev, fx):
        if ev.type == "conv.created" and ev.data["kind"] == "group":
            return {}["no such field"]
        return real(tables, ev, fx)

    store = Store.open(_data(tmp_path / "data"))
    try:
        last = store.last_lsn()
        monkeypatch.setattr(store_module, "apply", buggy)
        monkeypatch.setattr(store_module, "SEND_MESSAGE", None)
        with pytest.raises(InternalError) as failed:
            store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice"),
                           CreateConv("alice", "d", "user", "group")])
        assert not isinstance(failed.value, CorruptProjection | CommandInternalError)
        cause = failed.value.__cause__
        assert isinstance(cause, KeyError) and cause.__traceback__ is not None
        assert "buggy" in [f.name for f in _frames(cause.__traceback__)]
        assert "KeyError" in str(failed.value)
        assert store.last_lsn() == last  # nothing written, the send with it neither
        monkeypatch.undo()
        out = store.execute([SendMessage("bob", "d", "user", "c9", "hi", to="alice")])
        assert out[0].reply["seq"] == 3
    finally:
        store.close()


def _frames(tb):
    import traceback
    return traceback.extract_tb(tb)


def test_refusals_of_exceptions_a_rule_handled_leave_no_garbage_either(store):
    """A rule that turns an exception it caught into its refusal (a body with a lone surrogate:
    `Invalid` raised `from None`, which keeps the UnicodeEncodeError as its context): the
    refusal keeps neither its traceback nor that context, whose traceback held the rule's frame
    and through it the batch's (13,344 objects of cyclic garbage for 1,024 of them, until
    2026-12-06)."""
    import gc

    from storage.errors import Invalid

    store.execute([SendMessage("alice", "d1", "user", "c1", "hi", to="bob")])
    gc.collect()
    gc.disable()
    try:
        outcomes = store.execute([SendMessage("alice", "d1", "user", f"s{i}", "x\udc80", to="bob")
                                  for i in range(1024)])
        assert all(isinstance(o.error, Invalid) for o in outcomes)
        assert "lone surrogate" in str(outcomes[0].error)
        del outcomes
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_batch_of_refusals_leaves_no_garbage_for_the_cyclic_collector(store):
    """A command the rules refuse keeps its error without the traceback: that held the batch's
    frame, whose outcomes hold the error, a reference cycle per refusal that only the cyclic
    GC freed, keeping the frame alive until then (13,345 objects after a batch of 1,024 reads
    of a conversation the reader is not in, until 2026-12-06: a flood of such reads doubled a
    quiet user's p99, docs/OPERATIONS.md "One noisy service beside quiet ones")."""
    import gc

    from storage.commands import MarkRead
    from storage.errors import Forbidden

    (sent,) = store.execute([SendMessage("alice", "d1", "user", "c1", "hi", to="bob")])
    gc.collect()
    gc.disable()
    try:
        outcomes = store.execute([MarkRead("mallory", "d1", "user", sent.reply["conv"], 1)] * 1024)
        assert all(isinstance(o.error, Forbidden) for o in outcomes)
        assert outcomes[0].error.__traceback__ is None
        del outcomes
        assert gc.collect() == 0
    finally:
        gc.enable()
