"""`homing audit rebuild` (and the rebuild `serve` runs on a layout change) gives a chained
record of a kind homing never writes `audit verify`'s verdict, and every reader words a body
that holds no event's six fields alike. Until 2026-12-07 rebuild applied a record whose actor
is a number as it was, and ended one whose data is null with "a record the replay cannot
apply: AttributeError(...)"; verify and `log` said "Event.__init__() missing 1 required
positional argument" of a body of five fields where `trace` said "not the fields of an event".
Real LMDB in tmp dirs, the real `homing` command (in-process `main`, and `serve` as a child)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker.cli import main
from storage.projections import APPLIED_LSN
from storage.records import chain, lsn_key, pack_u64
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
    before = _dump(data)
    want = f"log corrupt at lsn {lsn}: a field of the wrong kind: {reason}"
    for args in (["verify"], ["rebuild"], ["rebuild", "--check"],
                 ["inbox", "--json", "--user", "alice"]):
        assert _said(capsys, *args, "--data", str(data)) == (1, want), args
    assert _dump(data) == before


def test_rebuild_names_data_the_replay_cannot_apply_as_verify_does(tmp_path, capsys):
    """A `read.marked` without `upto`: rebuild said "a record the replay cannot apply:
    KeyError('upto')", verify `read.marked data without 'upto'`; rebuild now says verify's."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_at(data, lsn, (TS, "read.marked", "alice", "d", {"conv": CONV}))
    want = f"log corrupt at lsn {lsn}: read.marked data without 'upto'"
    for args in (["verify"], ["rebuild"], ["rebuild", "--check"]):
        assert _said(capsys, *args, "--data", str(data)) == (1, want), args


def test_serve_refuses_to_rebuild_a_log_holding_a_number_for_an_actor(tmp_path):
    """The rebuild a layout change runs when `serve` starts applied a `read.marked` whose user
    is a number and served; it now ends the start with `data_dir` (exit 2) naming the LSN and
    verify's fault, the projections and their older layout left as they were."""
    data = tmp_path / "data"
    lsn = make_data(data, 1) + 1
    _put_at(data, lsn, (TS, "read.marked", 5, "d", MARK))
    poke(data, lambda txn, db: txn.put(LAYOUT_KEY, b"6", db=db("layout")))
    before = _dump(data)
    proc = subprocess.run([*homing_cmd(), "serve", "--data", str(data), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert_one_json_error(proc, 2, "data_dir")
    assert json.loads(proc.stderr.strip().splitlines()[-1])["message"] == (
        f"cannot use {data}: log corrupt at lsn {lsn}: a field of the wrong kind: type str, "
        "user int, device str, data dict")
    assert _dump(data) == before and before[1] == b"6" != LAYOUT


def _put_body(data: Path, lsn: int, fields: Any) -> None:
    """Chain a record whose body is msgpack of `fields` as record `lsn`, behind homing's back."""
    body = msgpack.packb(fields, use_bin_type=True)

    def put(txn, db):
        prev = txn.get(lsn_key(lsn - 1), db=db("log"))[:32]
        txn.put(lsn_key(lsn), chain(prev, body) + body, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(lsn), db=db("meta"))

    poke(data, put)


@pytest.mark.parametrize("fields", [
    [5, TS, "read.marked", "alice", MARK],
    [5, TS, "read.marked", "alice", "d", MARK, 0],
    [5, TS, "message.accepted", "bob", "d"],
    "abcdef",
    {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6},
    5,
], ids=["five", "seven", "message-five", "text-of-six", "map-of-six", "number"])
def test_every_reader_words_a_body_of_no_event_alike(tmp_path, capsys, fields):
    """A chained body of five fields: verify, `log`, `export` and `stats` said
    "undecodable body: Event.__init__() missing 1 required positional argument: 'data'",
    `trace` "undecodable body: not the fields of an event", rebuild "a record the replay
    cannot apply: IndexError(...)"; text of six characters or a map of six keys, "body says
    lsn 'a'" or "a time of 'b' us". Each now says `not the fields of an event`, at its LSN."""
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
