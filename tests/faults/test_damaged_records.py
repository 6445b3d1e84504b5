"""A broker serving a data directory with one log record damaged behind its back: removed, cut
short, garbage msgpack, an event of the wrong shape, or a projection row pointing at an LSN that
is not there. LMDB's pages are sound (tests/faults/test_read_failures.py is the other case), so
each read of it succeeds and hands back bytes that are no event.

What must hold: each request or delivery that needs the record gets a typed `unavailable`
(PROTOCOL.md §7), logged with the session's context and the LSN; everything before it is
delivered; every other user is served on; no session ends without a word. Each damage was
found by a review (2026-12-05): the broker's reads let AttributeError, msgpack's ValueError or
FormatError, or TypeError out, and `connection_failed` closed the user's every session before its
welcome was even written, so the SDK said "cannot reach" a broker serving everyone else.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path

import msgpack
import pytest
import trio

import protocol as wire
from broker.client import ClientError
from storage.commands import SendMessage
from storage.projections import inbox_key
from storage.records import lsn_key, pack_u64
from storage.store import Store
from tests.audit.test_damaged import poke
from tests.faults.conftest import RawClient
from tests.harness import running_broker

EXPECTED = ("request_failed", "delivery_read_failed")
DM = "dm:alice:bob"
BAD_SEQ = 3  # alice's third message from bob
BAD_LSN = 6  # conv.created and two member.added come first


def make_data(path: Path) -> None:
    """Five messages from bob to alice (seqs 1-5, LSNs 4-8), two from carol to dave."""
    store = Store.open(str(path))
    try:
        store.execute([SendMessage("bob", "d", "user", f"c{i}", f"hi {i}", to="alice")
                       for i in range(5)])
        store.execute([SendMessage("carol", "d", "user", f"k{i}", f"yo {i}", to="dave")
                       for i in range(2)])
        msg_lsn = store.history(DM, after=BAD_SEQ - 1, limit=1, newest_first=False)[0][0]["lsn"]
        assert msg_lsn == BAD_LSN
    finally:
        store.close()


def _value(txn, db) -> bytes:
    return txn.get(lsn_key(BAD_LSN), db=db("log"))


def _body(items: list) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


DAMAGE = {
    "removed": lambda txn, db: txn.delete(lsn_key(BAD_LSN), db=db("log")),
    "cut": lambda txn, db: txn.put(lsn_key(BAD_LSN), _value(txn, db)[:40], db=db("log")),
    "emptied": lambda txn, db: txn.put(lsn_key(BAD_LSN), b"", db=db("log")),
    "garbage msgpack": lambda txn, db: txn.put(
        lsn_key(BAD_LSN), _value(txn, db)[:32] + b"\xc1\xc1\xc1", db=db("log")),
    "wrong shape": lambda txn, db: txn.put(
        lsn_key(BAD_LSN), _value(txn, db)[:32] + _body([BAD_LSN, 1, 2]), db=db("log")),
    "no body": lambda txn, db: txn.put(lsn_key(BAD_LSN), _value(txn, db)[:32] + _body(
        [BAD_LSN, 1, "message.accepted", "bob", "d", {"conv": DM}]), db=db("log")),
    "another record": lambda txn, db: txn.put(  # a member.added where the message was
        lsn_key(BAD_LSN), txn.get(lsn_key(2), db=db("log")), db=db("log")),
    # A message of the right LSN, of another conversation: only the conversation tells it
    # from alice's ("another record" above says LSN 2, which `event_at` refuses first).
    "another conversation's message": lambda txn, db: txn.put(
        lsn_key(BAD_LSN), _value(txn, db)[:32] + _body([
            BAD_LSN, 1, "message.accepted", "carol", "d",
            {"conv": "dm:carol:dave", "cid": "k9", "body": "for dave only"}]), db=db("log")),
    "rows past the log": lambda txn, db: _past_the_log(txn, db),
}


def _past_the_log(txn, db) -> None:
    """The message's `msg` row and alice's inbox entry name LSN 999, past the log's end."""
    txn.put(DM.encode() + b"\0" + pack_u64(BAD_SEQ), pack_u64(999), db=db("msg"))
    txn.put(inbox_key("alice", BAD_SEQ), _body(["msg", DM, BAD_SEQ, 999]), db=db("inbox"))


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, tmp_path) -> tuple[Path, int]:
    """A data directory so damaged, and the LSN the broker's reads must name."""
    data = tmp_path / "data"
    make_data(data)
    poke(data, DAMAGE[request.param])
    return data, 999 if request.param == "rows past the log" else BAD_LSN


async def _frames_until_closed(raw: RawClient) -> list:
    said = []
    with trio.fail_after(10):
        while (frame := await raw.next()) is not None:
            said.append(frame)
    return said


async def test_the_affected_device_is_delivered_up_to_the_damage_then_told(damaged):
    """Its hello is welcomed, the deliveries before the damaged record go out, and the session
    closes with `unavailable`: it closed with nothing said, not even the welcome (the writer's
    AttributeError or ValueError, `connection_failed`)."""
    data, lsn = damaged
    async with running_broker(data, expected_errors=EXPECTED) as h:
        raw = await RawClient.connect(h.server, h.token("alice"), device="raw")
        try:
            said = await _frames_until_closed(raw)
        finally:
            await raw.aclose()
        assert [f.seq for f in said if isinstance(f, wire.Deliver)] == [1, 2], said
        assert isinstance(said[-1], wire.Error), said
        assert (said[-1].name, said[-1].close, said[-1].id) == ("unavailable", True, None)
        failed = [e for e in h.logs if e["event"] == "delivery_read_failed"]
        assert failed and (failed[0]["user"], failed[0]["device"]) == ("alice", "raw")
        assert failed[0]["reason"].startswith(f"log corrupt at lsn {lsn}: "), failed


async def test_requests_that_need_the_record_are_unavailable_and_the_rest_served(damaged):
    """history and receipts of the damaged message are answered `unavailable` (they ended the
    session with nothing said); the session goes on, and so does everyone else's."""
    data, lsn = damaged
    # A window of 2: alice, who acks nothing, is delivered seqs 1 and 2 and no more (reading
    # on would close her session, the test above).
    async with running_broker(data, expected_errors=EXPECTED, window=2) as h:
        async with h.client("alice", reconnect_timeout=2) as alice:
            for ask in (lambda: alice.history(DM, order="oldest"),
                        lambda: alice.history(DM, after=BAD_SEQ - 1, limit=1, order="oldest"),
                        lambda: alice.receipts(DM, BAD_SEQ)):
                with trio.fail_after(10), pytest.raises(ClientError) as refused:
                    await ask()
                assert refused.value.name == "unavailable"
            before = await alice.history(DM, before=BAD_SEQ, order="oldest")
            assert [m.body for m in before.messages] == ["hi 0", "hi 1"]
            assert (await alice.receipts(DM, BAD_SEQ + 1)).seq == BAD_SEQ + 1
            convs = await alice.conversations()
            assert [c.conv for c in convs.convs] == [DM]
        failed = [e for e in h.logs if e["event"] == "request_failed"]
        assert {(e["user"], e["frame"]) for e in failed} == {("alice", "history"),
                                                             ("alice", "receipts")}
        assert all(e["reason"].startswith(f"log corrupt at lsn {lsn}: ") for e in failed), failed
        # Someone else's conversation: served throughout.
        async with h.client("dave") as dave, h.client("carol") as carol:
            page = await dave.history("dm:carol:dave", order="oldest")
            assert [m.body for m in page.messages] == ["yo 0", "yo 1"]
            got = []
            with trio.fail_after(10):
                async for d in dave.deliveries():
                    got.append(d.body)
                    await dave.ack(d.inbox_seq)
                    if len(got) == 3:
                        break
                    if len(got) == 2:
                        await carol.send("yo 2", to="dave")
            assert got == ["yo 0", "yo 1", "yo 2"]
            # bob, in the damaged conversation, still posts into it: a write reads no record.
            async with h.client("bob") as bob:
                assert (await bob.send("after", conv=DM)).seq == 6


@pytest.mark.parametrize("damage", ["cut", "garbage msgpack", "wrong shape"])
def test_reading_the_log_names_an_undecodable_record(tmp_path, damage):
    """`Store.read_events` (what `broker/tail.py` follows the log with) let msgpack's errors or
    TypeError out of a record that does not decode; CorruptLog names it, as a gap does."""
    from storage.errors import CorruptLog

    data = tmp_path / "data"
    make_data(data)
    poke(data, DAMAGE[damage])
    store = Store.open(str(data))
    try:
        read = []
        with pytest.raises(CorruptLog) as corrupt:
            read.extend(e.lsn for e in store.read_events())
        assert (corrupt.value.lsn, read) == (BAD_LSN, list(range(1, BAD_LSN)))
    finally:
        store.close()


# ---------------------------------------------------------------- damaged projection rows
# A projection row's value cut short or garbage (the log is sound). Found by a review
# (2026-12-05): the reads let struct.error (a short `inbox_head` or `msg` row) or msgpack's
# errors (an `inbox` entry, a `conv` row) out: a request ended its session, a hello or a
# delivery every session of the user, with nothing said.

ROW_EXPECTED = ("request_failed", "delivery_read_failed", "hello_failed")
ROWS = {
    # name: (table, key, value)
    "short inbox_head": ("inbox_head", b"alice", b"\x00\x05"),
    "short msg row": ("msg", DM.encode() + b"\0" + pack_u64(BAD_SEQ), b"\x06"),
    "garbage inbox entry": ("inbox", inbox_key("alice", BAD_SEQ), b"\xc1\xc1"),
    "garbage conv row": ("conv", DM.encode(), b"\xc1"),
    # An entry that decodes, with a field of the wrong type or an unknown kind (added
    # 2026-12-05: a seq as text went out in a deliver frame, a conv as a number blamed the log).
    "inbox entry, seq as text": ("inbox", inbox_key("alice", BAD_SEQ),
                                 _body(["msg", DM, "3", BAD_LSN])),
    "inbox entry, conv as a number": ("inbox", inbox_key("alice", BAD_SEQ),
                                      _body(["msg", 7, BAD_SEQ, BAD_LSN])),
    "inbox entry, unknown kind": ("inbox", inbox_key("alice", BAD_SEQ),
                                  _body(["gone", DM, BAD_SEQ, BAD_LSN])),
    "inbox entry, lsn as a float": ("inbox", inbox_key("alice", BAD_SEQ),
                                    _body(["msg", DM, BAD_SEQ, 6.0])),
}


def _damage_row(data: Path, name: str) -> str:
    """Put ROWS[name] behind homing's back; the start of the reason a read of it must give."""
    table, key, value = ROWS[name]
    poke(data, lambda txn, db: txn.put(key, value, db=db(table)))
    return f"projection corrupt in {table} at key {key!r}: "


async def _said_until_closed(h, user: str) -> list:
    """Every frame the broker says to a hello of `user`, until it closes the connection."""
    raw = await RawClient.connect(h.server)
    try:
        await raw.send(wire.Hello(versions=(1,), token=h.token(user), device="raw", id=0))
        return await _frames_until_closed(raw)
    finally:
        await raw.aclose()


async def _others_served(h) -> None:
    async with h.client("dave") as dave, h.client("carol") as carol:
        page = await dave.history("dm:carol:dave", order="oldest")
        assert [m.body for m in page.messages] == ["yo 0", "yo 1"]
        assert [c.conv for c in (await carol.conversations()).convs] == ["dm:carol:dave"]
        assert (await carol.send("yo 2", to="dave")).seq == 3


def _reasons(h, event: str) -> list[str]:
    return [e["reason"] for e in h.logs if e["event"] == event]


async def test_a_short_inbox_head_refuses_the_hello_unavailable(tmp_path):
    """The hello reads the user's inbox head: a short one is `unavailable` (hello_failed), not
    a session closed with nothing said (struct.error, connection_failed)."""
    data = tmp_path / "data"
    make_data(data)
    reason = _damage_row(data, "short inbox_head")
    async with running_broker(data, expected_errors=ROW_EXPECTED) as h:
        said = await _said_until_closed(h, "alice")
        assert len(said) == 1 and isinstance(said[0], wire.Error), said
        assert said[0].name == "unavailable", said
        assert [r for r in _reasons(h, "hello_failed") if r.startswith(reason)], h.logs
        await _others_served(h)


@pytest.mark.parametrize("damage", sorted(name for name in ROWS if "inbox entry" in name))
async def test_a_garbage_inbox_entry_is_delivered_up_to_then_told(tmp_path, damage):
    """Deliveries before the garbage entry go out, then the session closes `unavailable`
    (delivery_read_failed naming the row); msgpack's error closed it with nothing said. So
    does an entry that decodes with a field of the wrong type or an unknown kind."""
    data = tmp_path / "data"
    make_data(data)
    reason = _damage_row(data, damage)
    async with running_broker(data, expected_errors=ROW_EXPECTED) as h:
        said = await _said_until_closed(h, "alice")
        assert isinstance(said[0], wire.Welcome), said
        assert [f.seq for f in said if isinstance(f, wire.Deliver)] == [1, 2], said
        assert (said[-1].name, said[-1].close) == ("unavailable", True), said
        assert [r for r in _reasons(h, "delivery_read_failed") if r.startswith(reason)], h.logs
        await _others_served(h)


ROW_REQUESTS = {
    "short msg row": (lambda alice: alice.history(DM, order="oldest"),
                      lambda alice: alice.receipts(DM, BAD_SEQ)),
    "garbage conv row": (lambda alice: alice.conversations(),
                         lambda alice: alice.members(DM)),
}


@pytest.mark.parametrize("damage", sorted(ROW_REQUESTS))
async def test_requests_reading_a_damaged_row_are_unavailable_and_the_rest_served(
        tmp_path, damage):
    """Each request that reads the row is answered `unavailable` (request_failed naming the
    table and key); the session goes on, and so does everyone else."""
    data = tmp_path / "data"
    make_data(data)
    reason = _damage_row(data, damage)
    async with running_broker(data, expected_errors=ROW_EXPECTED, window=2) as h:
        async with h.client("alice", reconnect_timeout=2) as alice:
            for ask in ROW_REQUESTS[damage]:
                with trio.fail_after(10), pytest.raises(ClientError) as refused:
                    await ask(alice)
                assert refused.value.name == "unavailable"
            assert (await alice.send("still here", to="erin")).seq == 1
        failed = _reasons(h, "request_failed")
        assert len(failed) == 2 and all(r.startswith(reason) for r in failed), failed
        await _others_served(h)


@pytest.mark.parametrize("damage", sorted(ROWS))
def test_the_projection_check_names_each_damaged_row(tmp_path, damage):
    """What `audit verify` and `rebuild --check` run: the first difference is the damaged row,
    its stored bytes against the replay's (the row the broker's reads name)."""
    from storage import audit

    data = tmp_path / "data"
    make_data(data)
    _damage_row(data, damage)
    table, key, value = ROWS[damage]
    store = Store.open(str(data), readonly=True)
    try:
        diff, _events = audit.check_projections(store)
        assert (diff.table, diff.key, diff.stored) == (table, key, value), diff
        assert store.check_projections()[:3] == (table, key, value)
    finally:
        store.close()


async def test_a_batch_meeting_a_damaged_row_fails_typed_and_the_broker_serves_on(tmp_path):
    """A send to alice, whose inbox head is cut short, reads that row in its batch: the batch
    fails with CorruptProjection (`batch_failed` naming the row, since 2026-12-05 by its table
    and key; its commands answered `unavailable`), and the broker serves on."""
    data = tmp_path / "data"
    make_data(data)
    _damage_row(data, "short inbox_head")
    async with running_broker(data, expected_errors=(*ROW_EXPECTED, "batch_failed")) as h:
        async with h.client("bob", reconnect_timeout=2) as bob:
            with trio.fail_after(10), pytest.raises(ClientError) as refused:
                await bob.send("to a damaged inbox", to="alice")
            assert refused.value.name == "unavailable"
        errors = [e["error"] for e in h.logs if e["event"] == "batch_failed"]
        assert errors and all(r.startswith("projection corrupt in inbox_head at key b'alice': "
                                           "undecodable row: struct.error: ")
                              for r in errors), errors
        assert not [e for e in h.logs if e["event"] == "batch_internal_error"]
        await _others_served(h)


async def test_a_batch_meeting_a_damaged_row_fails_only_the_command_that_reads_it(tmp_path):
    """bob's send to alice (her inbox head cut short) shares a batch with gina's and erin's
    sends: bob's alone is answered `unavailable`; gina's and erin's are answered as ever and
    durable (`batch_split`: the committer ran the batch again in halves). Until 2026-12-05 the
    whole batch failed, and gina and erin were answered `unavailable` too."""
    data = tmp_path / "data"
    make_data(data)
    _damage_row(data, "short inbox_head")
    async with running_broker(data, expected_errors=(*ROW_EXPECTED, "batch_split")) as h:
        committer, gate, said = h.broker.committer, threading.Event(), {}
        async with h.client("bob", reconnect_timeout=2) as bob, h.client("gina") as gina, \
                h.client("erin") as erin:

            async def send(name, client, to) -> None:
                try:
                    said[name] = await client.send(f"from {name}", to=to)
                except ClientError as exc:
                    said[name] = exc

            with trio.fail_after(20):
                # The worker thread runs one call at a time: held, it keeps a first batch
                # (dave's send) waiting, while the three sends queue for the next one.
                committer._thread.submit(gate.wait, 15)
                committer.enqueue(SendMessage("dave", "d", "user", "v0", "held", to="ivan"))
                async with trio.open_nursery() as nursery:
                    while committer.queued:
                        await trio.sleep(0.001)
                    for name, client, to in (("bob", bob, "alice"), ("gina", gina, "hank"),
                                             ("erin", erin, "frank")):
                        nursery.start_soon(send, name, client, to)
                    try:
                        while committer.queued < 3:
                            await trio.sleep(0.001)
                    finally:
                        gate.set()
        assert isinstance(said["bob"], ClientError) and said["bob"].name == "unavailable"
        assert (said["gina"].conv, said["gina"].seq) == ("dm:gina:hank", 1)
        assert (said["erin"].conv, said["erin"].seq) == ("dm:erin:frank", 1)
        split = [e for e in h.logs if e["event"] == "batch_split"]
        assert [(e["commands"], e["failed"]) for e in split] == [(3, 1)], split
        assert split[0]["error"].startswith("projection corrupt in inbox_head at key b'alice'")
        assert not [e for e in h.logs if e["event"] == "batch_failed"]
        async with h.client("frank") as frank:
            page = await frank.history("dm:erin:frank", order="oldest")
            assert [m.body for m in page.messages] == ["from erin"]
        await _others_served(h)


async def test_a_command_meeting_a_bug_is_internal_logged_with_its_traceback(tmp_path,
                                                                              monkeypatch):
    """A create whose rule raises KeyError (a bug: the data is sound) fails alone as
    `internal`, logged once with its context and traceback (`command_internal_error`), never
    as a corrupt projection (it was `batch_failed`, "projection corrupt: a row this batch read
    does not decode", with no traceback: an operator would rebuild sound projections; then,
    until 2026-12-05, `batch_internal_error`, failing the commands committed with it); the
    broker serves on. One rule is replaced (monkeypatch): no data makes a correct rule raise;
    the broker, committer and store run as they are."""
    from storage import rules
    from storage.commands import CreateConv

    def buggy(tables, cmd, now_us, limits):
        return {}["kind"]

    data = tmp_path / "data"
    make_data(data)
    monkeypatch.setitem(rules._DECIDE, CreateConv, buggy)
    async with running_broker(data, expected_errors=("command_internal_error",)) as h:
        async with h.client("alice") as alice:
            with trio.fail_after(10), pytest.raises(ClientError) as refused:
                await alice.create("group", name="g", cid="mk1")
            assert refused.value.name == "internal"
            monkeypatch.undo()
            assert (await alice.create("group", name="g", cid="mk1")).startswith("grp:")
        logged = [e for e in h.logs if e["event"] == "command_internal_error"]
        assert [(e["command"], e["user"], e["device"], e["conv"], e["cid"], e["error"])
                for e in logged] == [("CreateConv", "alice", logged[0]["device"], None, "mk1",
                                      "KeyError: 'kind'")], logged
        cause = logged[0]["exc_info"]
        assert isinstance(cause, KeyError) and "buggy" in [
            f.name for f in traceback.extract_tb(cause.__traceback__)]
        assert not [e for e in h.logs if e["event"] in (
            "batch_failed", "batch_internal_error", "command_failed")]
        await _others_served(h)
