"""`homing audit rebuild` (and the rebuild `serve` runs on a layout change) gives a chained
record of a kind homing never writes `audit verify`'s verdict, and every reader words a body
that holds no event's six fields alike. Until 2026-12-07 rebuild applied a record whose actor
is a number as it was, and ended one whose data is null with "a record the replay cannot
apply: AttributeError(...)"; verify and `log` said "Event.__init__() missing 1 required
positional argument" of a body of five fields where `trace` said "not the fields of an event".
Real LMDB in tmp dirs, the real `homing` command (in-process `main`, and `serve` as a child)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker.cli import main
from storage.errors import CorruptLog
from storage.projections import APPLIED_LSN
from storage.records import MAX_TS_US, chain, lsn_key, pack_u64
from storage.store import LAYOUT, LAYOUT_KEY, Store
from tests.audit.test_damaged import assert_one_json_error, make_data, poke
from tests.audit.test_fields_fault import CONV, MARK, TS, _put_at, _said
from tests.procs import homing_cmd

MESSAGE = {"conv": CONV, "cid": "x", "body": "hi"}
WRONG_KINDS = pytest.mark.parametrize(("event", "reason"), [
    ((TS, "read.marked", "alice", "d", None), "type str, user str, device str, data NoneType"),
    ((TS, "read.marked", 5, "d", MARK), "type str, user int, device str, data dict"),
    ((TS, "read.marked", "alice", 7, MARK), "type str, user str, device int, data dict"),
    ((TS, "delivery.acked", 5, "d", {"upto": 1}), "type str, user int, device str, data dict"),
    ((TS, "message.accepted", "bob", "d", None), "type str, user str, device str, data NoneType"),
    ((TS, "message.accepted", 5, "d", MESSAGE), "type str, user int, device str, data dict"),
    ((TS, "message.accepted", "bob", 7.5, MESSAGE),
     "type str, user str, device float, data dict"),
    ((TS, 5, "alice", "d", MARK), "type int, user str, device str, data dict"),
    ((TS, "read.marked", "alice", "d", [1]), "type str, user str, device str, data list"),
], ids=["mark-null-data", "mark-user-int", "mark-device-int", "ack-user-int",
        "message-null-data", "message-user-int", "message-device-float", "type-int",
        "data-list"])


REPLAYS = (["verify"], ["rebuild"], ["rebuild", "--check"],
           ["inbox", "--json", "--user", "alice"])


def _all_refuse(capsys, data: Path, want: str, actions: tuple = REPLAYS) -> None:
    """Each of `actions` (`homing audit ACTION`) says `want` of `data` and exits 1, leaving
    its projection rows and layout byte for byte as they were."""
    before = _dump(data)
    for args in actions:
        assert _said(capsys, *args, "--data", str(data)) == (1, want), args
    assert _dump(data) == before


def _dump(path: Path) -> tuple[dict, bytes | None]:
    """Every projection row of the data directory, and its stored layout."""
    store = Store.open(str(path), readonly=True)
    try:
        return store.dump_projections(), store.stored_layout()
    finally:
        store.close()


@WRONG_KINDS
def test_rebuild_refuses_a_field_of_the_wrong_kind_as_verify_does(tmp_path, capsys, event,
                                                                    reason):
    """verify fails such a record at its LSN, `a field of the wrong kind: ...`; rebuild applied
    one whose actor is a number (exit 0, its rows written) and ended one whose data is null
    with an AttributeError. It now refuses each with verify's words, `corrupt_log` exit 1,
    changing nothing (one write transaction: the rows and layout as they were); so do
    `rebuild --check` and `inbox`, which replay the same way."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_at(data, lsn, event)
    _all_refuse(capsys, data, f"log corrupt at lsn {lsn}: a field of the wrong kind: {reason}")


def test_rebuild_names_data_the_replay_cannot_apply_as_verify_does(tmp_path, capsys):
    """A `read.marked` without `upto`: rebuild said "a record the replay cannot apply:
    KeyError('upto')", verify `read.marked data without 'upto'`; rebuild now says verify's."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_at(data, lsn, (TS, "read.marked", "alice", "d", {"conv": CONV}))
    want = f"log corrupt at lsn {lsn}: read.marked data without 'upto'"
    for args in (["verify"], ["rebuild"], ["rebuild", "--check"]):
        assert _said(capsys, *args, "--data", str(data)) == (1, want), args


@pytest.mark.parametrize(("event", "reason"), [
    ((TS, "read.marked", 5, "d", MARK),
     "a field of the wrong kind: type str, user int, device str, data dict"),
    ((MAX_TS_US + 1, "message.accepted", "bob", "d", MESSAGE),
     f"a time of {MAX_TS_US + 1} us, which no date holds"),
], ids=["actor-number", "time-past-max"])
def test_serve_refuses_to_rebuild_a_log_holding_a_number_for_an_actor(tmp_path, event, reason):
    """The rebuild a layout change runs when `serve` starts applied a `read.marked` whose user
    is a number (and, until later that day, a message whose time is past the last a date
    holds) and served; it now ends the start with `data_dir` (exit 2) naming the LSN and
    verify's fault, the projections and their older layout left as they were."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_at(data, lsn, event)
    poke(data, lambda txn, db: txn.put(LAYOUT_KEY, b"6", db=db("layout")))
    before = _dump(data)
    proc = subprocess.run([*homing_cmd(), "serve", "--data", str(data), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert_one_json_error(proc, 2, "data_dir")
    assert json.loads(proc.stderr.strip().splitlines()[-1])["message"] == (
        f"cannot use {data}: log corrupt at lsn {lsn}: {reason}")
    assert _dump(data) == before and before[1] == b"6" != LAYOUT


def _put_body(data: Path, lsn: int, fields: Any) -> None:
    """Chain a record whose body is msgpack of `fields` as record `lsn`, behind homing's back."""
    _put_raw(data, lsn, msgpack.packb(fields, use_bin_type=True))


def _put_raw(data: Path, lsn: int, body: bytes) -> None:
    """Chain a record whose body is `body` as record `lsn`, behind homing's back."""

    def put(txn, db):
        prev = txn.get(lsn_key(lsn - 1), db=db("log"))[:32]
        txn.put(lsn_key(lsn), chain(prev, body) + body, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(lsn), db=db("meta"))

    poke(data, put)


@pytest.mark.parametrize("fields", [
    [5, TS, "read.marked", "alice", MARK],
    [5, TS, "read.marked", "alice", "d", MARK, 0],
    [5, TS, "message.accepted", "bob", "d"],
    [5, TS, "message.accepted", "bob", "d", MESSAGE, 0],
    "abcdef",
    {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6},
    5,
], ids=["five", "seven", "message-five", "message-seven", "text-of-six", "map-of-six",
        "number"])
def test_every_reader_words_a_body_of_no_event_alike(tmp_path, capsys, fields):
    """A chained body of five fields: verify, `log`, `export` and `stats` said
    "undecodable body: Event.__init__() missing 1 required positional argument: 'data'",
    `trace` "undecodable body: not the fields of an event", rebuild "a record the replay
    cannot apply: IndexError(...)"; text of six characters or a map of six keys, "body says
    lsn 'a'" or "a time of 'b' us"; a message of seven fields, rebuild applied (`"ok": true`,
    in the compiled and the Python replay alike, until 2026-12-07). Each now says `not the
    fields of an event`, at its LSN."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_body(data, lsn, fields)
    want = f"log corrupt at lsn {lsn}: undecodable body: not the fields of an event"
    for args in (["verify"], ["log", "--json"], ["log"], ["export"], ["stats"],
                 ["trace", "--json", "--conv", CONV, "--seq", "1"], ["rebuild"],
                 ["rebuild", "--check"], ["inbox", "--user", "alice"]):
        assert _said(capsys, *args, "--data", str(data)) == (1, want), args


@pytest.mark.parametrize("first", ["5", 5.0, None, 7], ids=["text", "float", "null", "seven"])
def test_verify_export_names_a_record_whose_lsn_is_not_its_own_as_verify_does(
        tmp_path, capsys, first):
    """A record whose body holds an lsn of text (or a float, null, another number): `export`
    writes its line as it is (`"lsn":"5"`), and `verify-export` refused the line before
    walking the chain, "not an export line: no lsn of type int (exported by a homing before
    2026-12-06?)" (or, of another number, "lsn 7 where lsn 5 belongs: lines missing before
    it"), where verify names the record: `body says lsn '5'`. It now names it in verify's
    words at the line and LSN it holds, as of a record's other fields; on a file's first
    line (`export --from-lsn`), whose LSN is not known, at the line alone (that a number
    there is the file's first LSN, nothing in the file can deny)."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_body(data, lsn, [first, TS, "read.marked", "alice", "d", MARK])
    said = f"its record is none homing wrote: body says lsn {first!r}"
    for start, want in (([], f"line {lsn} (lsn {lsn}): {said}"),
                        (["--from-lsn", str(lsn)], f"line 1: {said}")):
        if first == 7 and start:
            continue
        capsys.readouterr()
        assert main(["audit", "export", "--data", str(data), *start]) == 0
        exported = tmp_path / "export.jsonl"
        exported.write_text(capsys.readouterr().out)
        assert _said(capsys, "verify-export", str(exported)) == (1, want)


WRONG_LSNS = pytest.mark.parametrize(("said", "event"), [
    (7, (TS, "message.accepted", "bob", "d", MESSAGE)),
    (3, (TS, "message.accepted", "bob", "d", MESSAGE)),
    (True, (TS, "message.accepted", "bob", "d", MESSAGE)),
    (9, (TS, "read.marked", "alice", "d", MARK)),
    (2, (TS, "read.marked", "alice", "d", MARK)),
    (5.0, (TS, "read.marked", "alice", "d", MARK)),
    (5.0, (TS, "message.accepted", "bob", "d", MESSAGE)),
], ids=["message-7", "message-3", "message-true", "mark-9", "mark-2", "mark-float",
        "message-float"])


@WRONG_LSNS
def test_rebuild_refuses_a_record_whose_body_names_another_lsn(tmp_path, capsys, said, event):
    """A record chained at lsn 5 whose body says lsn 7 (or 3, true, 5.0): verify fails it,
    `body says lsn 7`; the replay took the body's lsn as the record's, so `rebuild` answered
    `"ok": true` and stored applied_lsn 7 (3, 1) for a log of 5 records (`rebuild --check`
    then blamed the projections, `inbox` printed `"lsn": 7`), and of 5.0 ended all three with
    `struct.error: required argument is not an integer` and a traceback. Each now refuses the
    record in verify's words, in the compiled and the Python replay alike, changing nothing."""
    data = tmp_path / "data"
    lsn = make_data(data, 4) + 1
    _put_body(data, lsn, [said, *event])
    _refused_compiled_and_pure(capsys, data, f"log corrupt at lsn {lsn}: body says lsn {said!r}")


def _refused_compiled_and_pure(capsys, data: Path, want: str) -> None:
    """`_all_refuse`, and `homing audit rebuild` with `HOMING_PURE_PYTHON=1` (a child) says
    `want` too, `corrupt_log` exit 1, changing nothing."""
    _all_refuse(capsys, data, want)
    before = _dump(data)
    proc = subprocess.run([*homing_cmd(), "audit", "rebuild", "--data", str(data)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOMING_PURE_PYTHON": "1"})
    assert_one_json_error(proc, 1, "corrupt_log")
    assert json.loads(proc.stderr.strip().splitlines()[-1])["message"].startswith(want)
    assert _dump(data) == before


def test_catch_up_refuses_a_record_whose_body_names_another_lsn(tmp_path):
    """Opening a store folds the records its projections lack (one write transaction); a
    record there whose body named another lsn was applied as that lsn, and only a last record
    naming another was refused (`no event of lsn ...`). Now the record itself is refused at
    its LSN in verify's words, and nothing of the catch-up is written."""
    data = tmp_path / "data"
    lsn = make_data(data, 4) + 1
    _put_body(data, lsn, [lsn + 2, TS, "message.accepted", "bob", "d", MESSAGE])
    _put_body(data, lsn + 1, [lsn + 1, TS, "read.marked", "alice", "d", MARK])
    poke(data, lambda txn, db: txn.put(APPLIED_LSN, pack_u64(lsn - 1), db=db("meta")))
    before = _dump(data)
    with pytest.raises(CorruptLog) as caught:
        Store.open(str(data)).close()
    assert (caught.value.lsn, caught.value.reason) == (lsn, f"body says lsn {lsn + 2}")
    assert _dump(data) == before


def _deep(depth: int) -> bytes:
    """A read mark whose data holds a value nested `depth` lists deep, packed by hand (msgpack
    packs no deeper than 512 from Python objects)."""
    head = msgpack.packb([5, TS, "read.marked", "alice", "d", {**MARK, "x": None}])
    return head[:-1] + b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize(("body", "said"), [
    (b"\xa2\xff\xfe\x01", "undecodable body: 'utf-8' codec can't decode byte 0xff in position "
     "0: invalid start byte"),
    (None, "undecodable body: nested deeper than msgpack unpacks (1,024 levels)"),
], ids=["bad-utf8-then-more", "nested-5000"])
def test_every_reader_words_a_body_msgpack_cannot_read_as_verify_does(tmp_path, capsys, body,
                                                                       said):
    """A chained body msgpack cannot read: text of bytes no UTF-8 holds followed by more
    bytes, verify `'utf-8' codec can't decode ...`, `rebuild` (which reads text as bytes)
    `unpack(b) received extra data.`; a value nested past msgpack's 1,024 levels, every
    reader `undecodable body: ` and nothing after it (msgpack's StackError has no words).
    Each is now one reason, verify's, to every reader."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    body = body if body is not None else _deep(5000).replace(b"\x05", bytes([lsn]), 1)

    def put(txn, db):
        prev = txn.get(lsn_key(lsn - 1), db=db("log"))[:32]
        txn.put(lsn_key(lsn), chain(prev, body) + body, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(lsn), db=db("meta"))

    poke(data, put)
    _all_refuse(capsys, data, f"log corrupt at lsn {lsn}: {said}",
                (*REPLAYS, ["log", "--json"], ["export"], ["stats"]))


@pytest.mark.parametrize("changed", ["7", True, 99], ids=["text", "true", "another-number"])
def test_verify_export_blames_a_first_line_whose_lsn_was_changed_not_its_record(
        tmp_path, capsys, changed):
    """A record homing would pass, packed otherwise (its lsn in eight bytes), is exported with
    `record_b64`; the first line of `export --from-lsn` of it with its `lsn` changed by hand
    was blamed on the record, `line 1: its record is none homing wrote: body says lsn 7`
    (`line 1 (lsn 99): ...` of another number), which verify passes. The record's own lsn
    places such a line, and the line is named as changed, as one further down is."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    body = b"\x96\xcf" + lsn.to_bytes(8, "big") + msgpack.packb(
        [TS, "read.marked", "alice", "d", MARK])[1:]

    def put(txn, db):
        prev = txn.get(lsn_key(lsn - 1), db=db("log"))[:32]
        txn.put(lsn_key(lsn), chain(prev, body) + body, db=db("log"))

    poke(data, put)
    capsys.readouterr()
    assert main(["audit", "export", "--data", str(data), "--from-lsn", str(lsn)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert "record_b64" in line and line["lsn"] == lsn
    exported = tmp_path / "export.jsonl"
    exported.write_text(json.dumps({**line, "lsn": changed}, ensure_ascii=False,
                                   separators=(",", ":")) + "\n")
    status, said = _said(capsys, "verify-export", str(exported))
    assert status == 1 and said.startswith(f"line 1 (lsn {lsn}): the line is not its "
                                           "record's own from byte 7 on"), said


BAD_UTF8 = ("undecodable body: 'utf-8' codec can't decode byte 0xff in position 0: invalid "
            "start byte")
KINDS_APPLIED = pytest.mark.parametrize(("event", "reason"), [
    ((-1, "message.accepted", "bob", "d", MESSAGE), "a time of -1 us, which no date holds"),
    ((MAX_TS_US + 1, "message.accepted", "bob", "d", MESSAGE),
     f"a time of {MAX_TS_US + 1} us, which no date holds"),
    ((1.5, "read.marked", "alice", "d", MARK), "a time of 1.5 us, which no date holds"),
    ((True, "message.accepted", "bob", "d", MESSAGE), "a time of True us, which no date holds"),
    ((TS, "message.accepted", "bob", "d", {**MESSAGE, "body": 5}),
     "message.accepted data.body of the wrong kind: 5"),
    ((TS, "message.accepted", "bob", "d", {"conv": CONV, "cid": "x"}),
     "message.accepted data without 'body'"),
    ((TS, "message.accepted", "bob", "d", {**MESSAGE, "conv": CONV.encode()}),
     f"message.accepted data.conv of the wrong kind: {CONV.encode()!r}"),
    ((TS, "message.accepted", b"bob", "d", MESSAGE),
     "a field of the wrong kind: type str, user bytes, device str, data dict"),
    ((TS, "message.accepted", "bob", "d", {**MESSAGE, "body": "BAD"}), BAD_UTF8),
    ((TS, "mute.set", "alice", "d", {"conv": CONV, "muted": 1}),
     "mute.set data.muted of the wrong kind: 1"),
], ids=["message-time-negative", "message-time-past-max", "mark-time-float", "message-time-true",
        "message-body-int", "message-no-body", "message-conv-bin", "message-user-bin",
        "message-body-not-utf8", "mute-int"])


@KINDS_APPLIED
def test_rebuild_refuses_a_time_or_data_of_the_wrong_kind_as_verify_does(tmp_path, capsys,
                                                                         event, reason):
    """A chained record whose time no date holds (negative, past MAX_TS_US, a float, true),
    or whose message body, conv or actor is of a kind homing never writes (a number, none,
    bytes, text of bytes no UTF-8 holds), or a mute of 1 for true: verify fails it at its
    LSN, and `rebuild` applied it (`"ok": true`, its rows written), in the compiled and the
    Python replay alike, as did `rebuild --check` and `inbox`. Each now refuses it with
    verify's words, `corrupt_log` exit 1, changing nothing."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    # (text `BAD` packed as bytes no UTF-8 holds)
    _put_raw(data, lsn, msgpack.packb([lsn, *event], use_bin_type=True).replace(
        b"\xa3BAD", b"\xa3\xff\xfe\x01"))
    _refused_compiled_and_pure(capsys, data, f"log corrupt at lsn {lsn}: {reason}")
