"""`homing audit log`, `export`, `verify-export` and `verify` on records holding values JSON
cannot hold (bytes other than a body, a map with a key that is not text, msgpack extension
types, floats JSON has no number for), which homing never writes but a record chained on by
hand may: each is shown faithfully as a one-key object (docs/OPERATIONS.md, "Auditing",
"Values JSON cannot hold"), never a traceback. Real LMDB in tmp dirs, the real `homing`
command (in-process `main`, and a child process where the traceback is the point)."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.audit_cli import room_for_nesting
from broker.cli import main
from storage import audit, export
from storage.errors import ExportFault
from storage.log import seal
from storage.records import GENESIS
from tests.audit.test_damaged import assert_one_json_error, make_data, run
from tests.audit.test_export_verify import _forge

CONV = "dm:alice:bob"
TS = 1_800_000_000_000_000
# A mark's data with every kind of value JSON cannot hold, and what `log --json` shows of it.
ODD_DATA = {"\x1b[2J": 0, "conv": CONV, "upto": 1, "att": b"\x00\xffraw",
            "nest": [1, [b"\x01"], {"k": b"\x02"}], "keys": {b"k": 1, "t": 2},
            "ext": msgpack.ExtType(5, b"\x03\x04"), "when": msgpack.Timestamp(1, 2),
            "nan": float("nan"), "inf": float("-inf"),
            "fake": {"$b64": "AAAA"}}
ODD_JSON = {"\x1b[2J": 0, "conv": CONV, "upto": 1, "att": {"$b64": "AP9yYXc="},
            "nest": [1, [{"$b64": "AQ=="}], {"k": {"$b64": "Ag=="}}],
            "keys": {"$map": [[{"$b64": "aw=="}, 1], ["t", 2]]}, "ext": {"$ext": [5, "AwQ="]},
            "when": {"$timestamp": [1, 2]}, "nan": {"$float": "NaN"},
            "inf": {"$float": "-Infinity"}, "fake": {"$map": [["$b64", "AAAA"]]}}


def _odd_records(first: int) -> list[tuple[bytes, dict[str, Any]]]:
    """Bodies `verify` passes (chained, of the right kinds) and the `data` `log --json` shows:
    the mark above; a binary message whose data holds a `body_b64` of its own (which would
    read as its body); a mark whose data has a key that is not text."""
    events = [(TS, "read.marked", "alice", "d", ODD_DATA),
              (TS, "message.accepted", "bob", "d",
               {"conv": CONV, "cid": "odd", "body": b"hi", "body_b64": "aGk="}),
              (TS, "read.marked", "alice", "d", {"conv": CONV, "upto": 1, b"x": 1})]
    shown = [ODD_JSON,
             {"$map": [["conv", CONV], ["cid", "odd"], ["body", {"$b64": "aGk="}],
                       ["body_b64", "aGk="]]},
             {"$map": [["conv", CONV], ["upto", 1], [{"$b64": "eA=="}, 1]]}]
    sealed, _ = seal(events, first, GENESIS)
    return [(value[32:], data) for (_, value, _), data in zip(sealed, shown, strict=True)]


def _homing(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def odd_data(tmp_path) -> tuple[Path, int]:
    """A data directory of homing's records with `_odd_records` chained on; their first LSN."""
    data = tmp_path / "data"
    first = make_data(data) + 1
    _forge(data, [body for body, _ in _odd_records(first)])
    return data, first


def test_log_json_shows_each_value_json_cannot_hold_as_a_one_key_object(odd_data, capsys):
    """`audit log --json` prints every record, the odd ones as documented, strict JSON (no
    NaN), and the text table prints them too; `audit verify` passes their chain."""
    data, first = odd_data
    status, out, err = _homing(capsys, "audit", "log", "--json", "--data", str(data))
    assert status == 0, err
    rows = [json.loads(r, parse_constant=pytest.fail) for r in out.splitlines()]
    assert [r["lsn"] for r in rows] == list(range(1, first + 3))
    assert [r["data"] for r in rows[first - 1:]] == [d for _, d in _odd_records(first)]
    status, out, err = _homing(capsys, "audit", "log", "--data", str(data))
    assert status == 0, err
    table = out.splitlines()
    assert len(table) == first + 3, out
    assert '"\\u001b[2J"=0 conv=dm:alice:bob upto=1 att={"$b64":"AP9y' in table[first]
    assert "\x1b" not in out, out
    mapped = '$map=[["conv","dm:alice:bob"],["upto",1],[{"$b64":"eA=="},1…'
    assert table[first + 2].endswith(mapped), table[first + 2]
    verify = run("audit", "verify", "--data", str(data))
    assert json.loads(verify.stdout)["log"] == {"ok": True}, verify.stdout


def test_export_of_such_records_verifies_and_every_changed_byte_is_caught(odd_data, capsys):
    """`audit export` writes the odd records' lines as `log --json` shows them, with their bytes
    as `record_b64` (JSON does not make them again); `verify-export` passes the file, and a
    change of any one byte of such a line fails at that line."""
    data, first = odd_data
    status, out, err = _homing(capsys, "audit", "export", "--data", str(data))
    assert status == 0, err
    rows = out.splitlines(keepends=True)
    for row, (body, shown) in zip(rows[first - 1:], _odd_records(first), strict=True):
        obj = json.loads(row, parse_constant=pytest.fail)
        assert obj["data"] == shown and obj["record_b64"], obj
        assert export._body(obj) == body
    assert not any("record_b64" in r for r in rows[:first - 1])
    f = data.parent / "export.jsonl"
    f.write_text(out)
    status, report, err = _homing(capsys, "audit", "verify-export", str(f))
    assert status == 0 and json.loads(report)["ok"], (report, err)
    raw = [r.encode() for r in rows]
    for k in range(first - 1, len(raw)):
        for at in range(len(raw[k]) - 1):
            changed = raw[k][:at] + bytes([raw[k][at] ^ 1]) + raw[k][at + 1:]
            with pytest.raises(ExportFault) as caught:
                export.check_lines([*raw[:k], changed, *raw[k + 1:]])
            assert caught.value.line == k + 1, (k, at, caught.value)


def test_filters_and_the_table_on_records_verify_calls_corrupt(tmp_path, capsys):
    """A record whose type or actor is binary, or whose data is no map (`verify` fails it at its
    LSN), is shown all the same by `audit log`, filtered by --type, --conv and --user as any
    other, and its table row escapes it; no traceback."""
    data = tmp_path / "data"
    first = make_data(data, 1) + 1
    odd = [(TS, b"read.marked", "alice", "d", {"conv": CONV, "upto": 1}),
           (TS, "read.marked", b"\x1b[31m", "d", [1, b"x"])]
    sealed, _ = seal(odd, first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    status, out, err = _homing(capsys, "audit", "log", "--json", "--data", str(data),
                               "--from-lsn", str(first))
    assert status == 0, err
    assert [(r["type"], r["actor"], r["data"]) for r in map(json.loads, out.splitlines())] == [
        ({"$b64": "cmVhZC5tYXJrZWQ="}, "alice", {"conv": CONV, "upto": 1}),
        ("read.marked", {"$b64": "G1szMW0="}, [1, {"$b64": "eA=="}])]
    for flags in (["--type", "read"], ["--conv", CONV], ["--user", "alice"]):
        status, out, err = _homing(capsys, "audit", "log", "--json", "--data", str(data),
                                   "--from-lsn", str(first), *flags)
        assert status == 0, (flags, err)
    status, out, err = _homing(capsys, "audit", "log", "--data", str(data), "--from-lsn",
                               str(first))
    assert status == 0 and "\x1b" not in out, (out, err)
    assert '{"$b64":"G1szMW0="}/d' in out and '[1,{"$b64":"eA=="}]' in out, out
    verify = run("audit", "verify", "--data", str(data))
    assert_one_json_error(verify, 1, "corrupt_log")
    assert json.loads(verify.stdout)["log"]["lsn"] == first


def test_verify_names_a_difference_holding_bytes(tmp_path):
    """`audit verify` whose first projection difference holds bytes (a conversation created by
    hand with a binary name) prints it as `json_value` shows it: `projection_mismatch`, exit
    1, not a TypeError traceback."""
    data = tmp_path / "data"
    first = make_data(data, 1) + 1
    sealed, _ = seal([(TS, "conv.created", "alice", "d",
                       {"conv": "grp:odd", "kind": "group", "name": b"\xff", "open": False})],
                     first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    verify = run("audit", "verify", "--data", str(data))
    assert_one_json_error(verify, 1, "projection_mismatch")
    diff = json.loads(verify.stdout)["projections"]["difference"]
    assert diff["table"] == "conv" and diff["stored"] is None, diff
    assert diff["replayed"]["name"] == {"$b64": "/w=="}, diff


# ---------------------------------------------------------------- any value


def _from_json(value: Any) -> Any:
    """The value `audit.json_value` showed as `value`: the documented forms read back."""
    if type(value) is list:
        return [_from_json(v) for v in value]
    if type(value) is not dict:
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$b64":
            return base64.b64decode(inner)
        if tag == "$ext":
            return msgpack.ExtType(inner[0], _from_json({"$b64": inner[1]}))
        if tag == "$timestamp":
            return msgpack.Timestamp(*inner)
        if tag == "$float":
            return float(inner.lower().replace("infinity", "inf"))
        if tag == "$map":
            return {_from_json(k): _from_json(v) for k, v in inner}
    return {k: _from_json(v) for k, v in value.items()}


def _same(a: Any, b: Any) -> bool:
    """`a == b`, with a NaN equal to a NaN (JSON shows any NaN as one)."""
    if type(a) is float and type(b) is float and math.isnan(a):
        return math.isnan(b)
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    if type(a) is dict and type(b) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


KEYS = st.one_of(st.text(max_size=6), st.binary(max_size=4),
                 st.sampled_from(sorted(audit.JSON_TAGS)))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=8), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(-(2**63), 2**63 - 1), st.integers(0, 999_999_999)))
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(KEYS, kids, max_size=3)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(KEYS.filter(lambda k: k not in ("conv", "upto", "body")), VALUES,
                             max_size=4),
       byte=st.integers(0, 255), draw=st.data())
def test_any_value_of_a_hand_chained_record_shows_faithfully_and_its_line_verifies(
        extra, byte, draw):
    """A record chained on by hand whose data holds any values msgpack decodes (beside the
    fields `verify` needs) has a strict JSON line that reads back as its data, the export's
    line verifies, and a change of any one byte of it fails at that line."""
    data = {"conv": CONV, "upto": 1, **extra}
    (first, second), _ = seal([(TS, "read.marked", "alice", "d", {"conv": CONV, "upto": 1}),
                               (TS, "read.marked", "alice", "d", data)], 1, GENESIS)
    ev = audit.decode_event(2, second[1])
    shown = json.loads(json.dumps(audit.event_record(ev), allow_nan=False))
    assert _same(_from_json(shown["data"]), ev.data), shown
    rows = [export.line(1, first[1], GENESIS).encode(), export.line(2, second[1]).encode()]
    assert json.loads(rows[1], parse_constant=pytest.fail)["data"] == shown["data"]
    walk = export.check_lines(rows)
    assert (walk.lines, walk.head) == (2, second[1][:32])
    at = draw.draw(st.integers(0, 2**16), label="byte") % (len(rows[1]) - 1)
    if rows[1][at] == byte:
        byte ^= 1
    with pytest.raises(ExportFault) as caught:
        export.check_lines([rows[0], rows[1][:at] + bytes([byte]) + rows[1][at + 1:]])
    assert caught.value.line == 2, caught.value


def _nested(depth: int, key: bytes | None) -> Any:
    """1 inside `depth` lists, or maps of the one binary `key` (shown in their "$map" form)."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if key is None else {key: value}
    return value


def test_values_as_deep_as_msgpack_decodes_are_shown_and_exported(tmp_path, capsys):
    """A record holds values nested as deep as msgpack decodes (1,024 containers, the record's
    list and its data's map among them: `verify` passes it), a list and a map keyed by bytes:
    `log --json`, the table and `export` show them, and the export verifies. Within Python's
    default recursion limit they ended in a RecursionError (`room_for_nesting`)."""
    data = tmp_path / "data"
    first = make_data(data) + 1
    deepest = 1024 - 2  # below the record's list and its data's map
    events = [(TS, "read.marked", "alice", "d", {"conv": CONV, "upto": 1, "deep": value})
              for value in (_nested(deepest, None), _nested(deepest, b"k"))]
    sealed, _ = seal(events, first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    with pytest.raises(msgpack.StackError):  # (one container more: no record holds it)
        msgpack.unpackb(b"\x91" * 1025 + b"\x01")
    status, out, err = _homing(capsys, "audit", "log", "--json", "--from-lsn", str(first),
                               "--data", str(data))
    assert status == 0, err
    with room_for_nesting():
        rows = [json.loads(r) for r in out.splitlines()]
    shown = rows[0]["data"]["deep"]
    for _ in range(deepest):
        assert type(shown) is list and len(shown) == 1
        shown = shown[0]
    assert shown == 1
    shown = rows[1]["data"]["deep"]
    for _ in range(deepest):
        assert list(shown) == ["$map"] and shown["$map"][0][0] == {"$b64": "aw=="}
        shown = shown["$map"][0][1]
    assert shown == 1
    status, out, err = _homing(capsys, "audit", "log", "--data", str(data))
    assert status == 0 and out.count("deep=") == 2, err
    status, out, err = _homing(capsys, "audit", "export", "--data", str(data))
    assert status == 0, err
    f = tmp_path / "export.jsonl"
    f.write_text(out)
    status, report, err = _homing(capsys, "audit", "verify-export", str(f))
    assert status == 0 and json.loads(report)["ok"], (report, err)
    verify = run("audit", "verify", "--data", str(data))
    assert json.loads(verify.stdout)["log"] == {"ok": True}, verify.stdout


def test_every_audit_action_names_a_record_whose_read_field_is_nested_deep(tmp_path):
    """Records verify fails, each holding a value nested as deep as msgpack decodes in a field
    the replay reads (a mark's conv and upto, a message's cid and body, a member's user):
    `verify`, `trace`, `inbox` and `rebuild --check` end in the documented `corrupt_log` at
    the first one, `log` (filtered, and its table), `stats` and `export` print them. Without
    `room_for_nesting`, `verify` and `trace` ended in a `RecursionError` traceback (the
    fault's text is the value's repr), and `log` and `export` too. Real `homing` children."""
    data = tmp_path / "data"
    first = make_data(data) + 1
    deep, keyed = _nested(1024 - 2, None), _nested(1024 - 2, b"k")
    events = [(TS, "read.marked", "alice", "d", {"conv": deep, "upto": 1}),
              (TS, "message.accepted", "bob", "d", {"conv": CONV, "cid": deep, "body": "x"}),
              (TS, "message.accepted", "bob", "d", {"conv": CONV, "cid": "c", "body": keyed}),
              (TS, "member.added", "bob", "d", {"conv": CONV, "user": deep, "role": "member"}),
              (TS, "read.marked", "alice", "d", {"conv": CONV, "upto": keyed})]
    sealed, _ = seal(events, first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    at = f"log corrupt at lsn {first}: "
    for args in (["verify"], ["trace", "--conv", CONV, "--seq", "1"], ["inbox", "--user", "bob"],
                 ["rebuild", "--check"]):
        proc = run("audit", *args, "--data", str(data))
        assert_one_json_error(proc, 1, "corrupt_log")
        assert at in proc.stderr, (args, proc.stderr)
    for args in (["log"], ["log", "--json", "--conv", CONV], ["log", "--user", "alice"],
                 ["log", "--type", "message.accepted"], ["stats"], ["export"]):
        proc = run("audit", *args, "--data", str(data))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    out = run("audit", "log", "--json", "--from-lsn", str(first), "--data", str(data)).stdout
    with room_for_nesting():
        shown = [json.loads(line) for line in out.splitlines()]
    assert len(shown) == len(events) and [r["lsn"] for r in shown] == list(
        range(first, first + len(events))), shown


def _export_shaped(data: str) -> str:
    """A first export line of lsn 1 (no record's: its digest is zeros) whose data is `data`."""
    zeros = "0" * 64
    return (f'{{"lsn":1,"ts":"2027-01-15T08:00:00.000000Z","ts_us":{TS},"type":"read.marked",'
            f'"actor":"alice","device":"d","data":{data},"prev":"{zeros}","digest":"{zeros}"}}\n')


@pytest.mark.parametrize(("text", "reason"), [
    ("[" * 100_000 + "]" * 100_000 + "\n", "not a JSON line: nested deeper than"),
    ("[" * 100_000 + "\n", "not a JSON line: nested deeper than"),
    (_export_shaped('{"x":' + "[" * 100_000 + "]" * 100_000 + "}"),
     "not a JSON line: nested deeper than"),
    (_export_shaped('{"x":' + "[" * 4_000 + "]" * 4_000 + "}"),
     "a value nested deeper than msgpack packs"),
])
def test_verify_export_of_a_hand_written_line_nested_past_any_record(tmp_path, text, reason):
    """A file no export wrote, one line of JSON nested 100,000 deep (or an export line's data
    nested so), ends `verify-export` with the documented `corrupt_export` error (exit 1, the
    report naming line 1), as any line that is no export line does: it ended in a Python
    `RecursionError` traceback (json's decoder, within the room `room_for_nesting` gives). A
    line JSON reads whose value is nested deeper than any record holds is told so, not as "no
    base64, a number past 64 bits". A child process: a crash of the C stack shows only there."""
    f = tmp_path / "hand.jsonl"
    f.write_text(text)
    proc = run("audit", "verify-export", str(f))
    assert_one_json_error(proc, 1, "corrupt_export")
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["file"]["ok"] is False, report
    assert report["file"]["line"] == 1 and reason in report["file"]["reason"], report


# ---------------------------------------------------------------- stats, trace, inbox


def test_stats_counts_a_record_verify_passes_whose_data_has_a_user_that_is_no_text(tmp_path):
    """A mark with a `user` of its own in its data (which the replay does not read: `verify`
    passes its log) that is a map, a list or binary: `audit stats` ended in a TypeError
    traceback (unhashable); a user is text, so the others are not users, and the log counts."""
    data = tmp_path / "data"
    first = make_data(data, 1) + 1
    odd = [(TS, "read.marked", "alice", "d", {"conv": CONV, "upto": 1, "user": user})
           for user in ({"a": 1}, [1], b"carol", "dave")]
    sealed, _ = seal(odd, first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    verify = run("audit", "verify", "--data", str(data))
    assert json.loads(verify.stdout)["log"] == {"ok": True}, verify.stdout
    stats = run("audit", "stats", "--json", "--data", str(data))
    assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr[-2000:]
    result = json.loads(stats.stdout)
    assert (result["events"], result["users"]) == (first + 3, 3), result  # bob, alice, dave


@pytest.mark.parametrize(("kind", "user", "device", "data", "refused_by"), [
    (b"read.marked", "alice", "d", {"conv": CONV, "upto": 1}, "stats trace"),
    (["read.marked"], "alice", "d", {"conv": CONV, "upto": 1}, "stats trace"),
    ("read.marked", "alice", "d", [CONV, 1], "stats trace"),
    ("read.marked", "alice", "d", None, "stats trace"),
    ("message.accepted", b"bob", "d", {"conv": CONV, "cid": "odd", "body": "hi"}, "stats trace"),
    ("read.marked", "alice", "d", {"conv": CONV, "upto": "all"}, "trace"),
    ("message.accepted", "bob", "d", {"conv": CONV.encode(), "cid": "odd", "body": "hi"},
     "trace"),
    ("member.added", "alice", "d", {"conv": CONV, "user": ["carol"], "role": "member"}, "trace"),
    ("conv.created", "alice", "d", {"conv": ["grp:1"], "kind": "group"}, "stats"),
], ids=["binary-type", "list-type", "list-data", "no-data", "binary-sender", "text-upto",
        "binary-conv", "list-member", "list-conv"])
def test_stats_and_trace_name_a_record_verify_fails_at_its_lsn(tmp_path, kind, user, device,
                                                                 data, refused_by):
    """A record chained on by hand whose type, actor or data is not of its kind (`verify` fails
    it at its LSN): `audit stats` and `audit trace` ended in a Python traceback (or `trace`
    in `not_found` naming a missing key). Each ends with `corrupt_log` at its LSN, exit 1, as
    for a record that does not decode, where it counts or reads the field at fault (`stats`
    the type, actor, data and a created conversation; `trace` those and the data of messages,
    membership changes, acks and read marks), and otherwise goes on."""
    data_dir = tmp_path / "data"
    first = make_data(data_dir, 1) + 1
    sealed, _ = seal([(TS, kind, user, device, data)], first, GENESIS)
    _forge(data_dir, [value[32:] for _, value, _ in sealed])
    verify = run("audit", "verify", "--data", str(data_dir))
    assert_one_json_error(verify, 1, "corrupt_log")
    assert json.loads(verify.stdout)["log"]["lsn"] == first
    for args in (["stats"], ["stats", "--json"], ["trace", "--json", "--conv", CONV, "--seq", "1"],
                 ["trace", "--conv", CONV, "--seq", "2"],
                 ["trace", "--json", "--cid", "odd", "--from", "bob"]):
        proc = run("audit", *args, "--data", str(data_dir))
        if args[0] not in refused_by.split():
            assert "Traceback" not in proc.stderr and proc.returncode in (0, 1), proc.stderr
            continue
        assert_one_json_error(proc, 1, "corrupt_log")
        assert f"lsn {first}:" in proc.stderr.strip().splitlines()[-1], (args, proc.stderr)


@pytest.mark.parametrize("body_lsn", ["x", 9], ids=["text", "another"])
def test_trace_names_a_message_by_the_lsn_of_its_key(tmp_path, capsys, body_lsn):
    """A message chained on by hand whose body holds an lsn of text or another number than
    its key's (`verify` fails it: "body says lsn 'x'"): `audit trace` ended in a TypeError
    traceback (the text compared with an inbox entry's lsn), or printed the body's lsn and
    found no recipient's inbox entry. It reads the lsn of the record's key, as `stats` and
    the replay do."""
    data = tmp_path / "data"
    first = make_data(data, 1) + 1
    body = msgpack.packb([body_lsn, TS, "message.accepted", "bob", "d",
                          {"conv": CONV, "cid": "odd", "body": "hi"}])
    _forge(data, [body])
    for args in (["--conv", CONV, "--seq", "2"], ["--cid", "odd", "--from", "bob"]):
        status, out, err = _homing(capsys, "audit", "trace", "--json", *args, "--data", str(data))
        assert status == 0, err
        result = json.loads(out)
        assert (result["lsn"], result["seq"], list(result["recipients"])) == (
            first, 2, ["alice"]), result


def test_inbox_refuses_a_binary_cid_as_verify_does(tmp_path):
    """A message chained on by hand whose cid is binary (`verify` fails it): `audit inbox
    --json` ended in a TypeError traceback, then (the replay, which read ids as bytes, applied
    it into alice's inbox) showed the cid as `json_value` does; the replay now refuses it,
    so `inbox` ends with `corrupt_log` at its LSN in verify's words, no traceback."""
    data = tmp_path / "data"
    first = make_data(data, 1) + 1
    sealed, _ = seal([(TS, "message.accepted", "bob", "d",
                       {"conv": CONV, "cid": b"\xffodd", "body": "hi"})], first, GENESIS)
    _forge(data, [value[32:] for _, value, _ in sealed])
    inbox = run("audit", "inbox", "--json", "--user", "alice", "--data", str(data))
    assert_one_json_error(inbox, 1, "corrupt_log")
    assert json.loads(inbox.stderr.strip().splitlines()[-1])["message"].startswith(
        f"log corrupt at lsn {first}: message.accepted data.cid of the wrong kind: b'\\xffodd'")
