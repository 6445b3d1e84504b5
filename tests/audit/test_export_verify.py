"""`homing audit export` files checked offline by `homing audit verify-export`.

An export line carries its record's digest (and the first line the digest before it), so an
auditor handed the file alone can tell a line changed, removed, inserted or moved, or a file
cut short (docs/OPERATIONS.md, "Auditing", "Verifying an export"). Real stores in tmp dirs,
the real `homing` command where the command is the point.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import tempfile
from pathlib import Path

import msgpack
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.cli import main
from storage import export
from storage.commands import SendMessage
from storage.errors import ExportFault
from storage.projections import APPLIED_LSN
from storage.records import GENESIS, chain, lsn_key, pack_u64
from storage.store import Store
from tests.audit.test_damaged import assert_one_json_error, poke
from tests.audit.test_streaming import random_store
from tests.procs import homing, homing_cmd, lines

OLD_KEYS = ["lsn", "ts", "ts_us", "type", "actor", "device", "data"]


def _data(path: Path, seed: int = 1, commands: int = 200) -> Path:
    """A data directory whose log the rules wrote (every event type, text and binary bodies)."""
    random_store(seed, str(path), commands).close()
    return path


def _export(data: Path, *flags: str) -> str:
    return homing("audit", "export", "--data", str(data), *flags).stdout


def _check(capsys, text: str | bytes, tmp_path: Path, *flags: str) -> tuple[int, dict, str]:
    """`homing audit verify-export` of a file holding `text`, in-process."""
    f = tmp_path / "export.jsonl"
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    capsys.readouterr()
    status = main(["audit", "verify-export", str(f), *flags])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else {}), err


def _fault(capsys, text: str, tmp_path: Path, *flags: str) -> dict:
    """The report of a file that must fail, exit 1 with `corrupt_export`."""
    status, report, err = _check(capsys, text, tmp_path, *flags)
    assert status == 1, (status, report, err)
    assert json.loads(err.strip().splitlines()[-1])["error"] == "corrupt_export", err
    assert report["ok"] is False and report["file"]["ok"] is False and "head" not in report
    return report


def _line_digest(line: str) -> str:
    return json.loads(line)["digest"]


def test_an_export_verifies_offline_and_ends_at_verifys_head(tmp_path):
    """A whole export, as the real commands write it, checks out with the head `audit verify`
    printed as anchor, read from a file and from stdin; its objects are `log --json`'s with
    `prev` (first line only) and `digest` added after the keys they had."""
    data = _data(tmp_path / "data")
    text = _export(data)
    head = json.loads(homing("audit", "verify", "--data", str(data)).stdout)["head"]
    f = tmp_path / "out.jsonl"
    f.write_text(text)
    anchor = f"{head['lsn']}:{head['digest']}"
    report = json.loads(homing("audit", "verify-export", str(f), "--anchor", anchor).stdout)
    assert report == {"ok": True, "lines": head["lsn"], "first_lsn": 1, "last_lsn": head["lsn"],
                      "prev": {"lsn": 0, "digest": GENESIS.hex(), "pinned": True},
                      "file": {"ok": True},
                      "head": head, "anchors": [{**head, "ok": True}]}
    piped = homing("audit", "verify-export", "-", input=text)
    assert json.loads(piped.stdout)["head"] == head
    objs = [json.loads(line) for line in text.splitlines()]
    logged = lines(homing("audit", "log", "--json", "--data", str(data)))
    assert [{k: o[k] for k in OLD_KEYS} for o in objs] == logged
    assert list(objs[0]) == [*OLD_KEYS, "prev", "digest"]
    assert all(list(o) == [*OLD_KEYS, "digest"] for o in objs[1:])
    assert any("body_b64" in o["data"] for o in objs)  # binary bodies are in it


def _put(rows: list[str], k: int, *new: str) -> list[str]:
    """`rows` with row `k` replaced by `new` (none: removed)."""
    return [*rows[:k], *new, *rows[k + 1:]]


def _swap(rows: list[str], k: int) -> list[str]:
    return _put(_put(rows, k, rows[k + 1]), k + 1, rows[k])


def _retimed(row: str) -> str:
    obj = json.loads(row)
    obj["ts"] = obj["ts"].replace(":", "-", 1)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _rebodied(row: str) -> str:
    obj = json.loads(row)
    obj["data"]["body"] = "changed after the export"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _capitals(row: str) -> str:
    return row.replace(_line_digest(row), _line_digest(row).upper())


# Each: (how the file's rows change around row K, the line reported (from K), words of its
# reason). Row K is a text message (the 21st), so that its body can be changed.
TAMPERINGS = {
    "a changed field": (lambda r, k: _put(r, k, _rebodied(r[k])), 0, "its digest is not"),
    "a changed ts": (lambda r, k: _put(r, k, _retimed(r[k])), 0, "not its record's own"),
    "a digest in capitals": (lambda r, k: _put(r, k, _capitals(r[k])), 0,
                             "not its record's own"),
    "a removed line": (lambda r, k: _put(r, k), 0, "missing before it"),
    "an inserted line": (lambda r, k: _put(r, k, r[k - 5], r[k]), 0, "inserted"),
    "a reordered pair": (_swap, 0, "moved up"),
    "the first line removed": (lambda r, k: r[1:], None, "carries no prev"),
    "the file cut inside a line": (lambda r, k: [*r[:k], r[k][:40]], 0, "cut short"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_each_tampering_is_reported_at_its_line(tmp_path, capsys, tampering):
    """A changed field, a changed `ts`, a digest respelt, a removed, inserted or moved line, a
    first line gone and a file cut inside a line: each fails at the line it touched, exit 1,
    with the lines before it counted sound."""
    data = _data(tmp_path / "data")
    rows = _export(data).splitlines()
    k = [i for i, r in enumerate(rows) if '"body":"' in r][20]
    change, offset, words = TAMPERINGS[tampering]
    text = "\n".join(change(rows, k)) + ("" if tampering.startswith("the file cut") else "\n")
    report = _fault(capsys, text, tmp_path)
    line = 1 if offset is None else k + offset + 1
    assert (report["file"]["line"], report["lines"]) == (line, line - 1), report
    assert words in report["file"]["reason"], report


def test_a_file_cut_at_a_line_end_or_rechained_fails_only_against_an_anchor(tmp_path, capsys):
    """Lines removed from the end, or a line changed and every digest after it computed again,
    leave a file that chains: only a head kept apart shows it, at the line after the end or at
    the anchor's line."""
    data = _data(tmp_path / "data")
    rows = _export(data).splitlines(keepends=True)
    last = json.loads(rows[-1])
    anchor = f"{last['lsn']}:{last['digest']}"
    cut = "".join(rows[:-3])
    status, report, _ = _check(capsys, cut, tmp_path)
    assert status == 0 and report["ok"] and report["last_lsn"] == last["lsn"] - 3
    report = _fault(capsys, cut, tmp_path, "--anchor", anchor)
    assert report["file"] == {"ok": False, "line": len(rows) - 2, "lsn": last["lsn"] - 2,
                              "reason": f"the file ends at lsn {last['lsn'] - 3}, before the "
                              f"anchor's lsn {last['lsn']}: 3 lines are missing from its end"}
    k = [i for i, r in enumerate(rows) if '"body":"' in r][5]
    forged = _rechain(rows, k)
    status, report, _ = _check(capsys, forged, tmp_path)
    assert status == 0 and report["ok"], report  # the chain alone cannot tell
    report = _fault(capsys, forged, tmp_path, "--anchor", anchor)
    assert report["file"]["line"] == len(rows) and "not the anchor's" in report["file"]["reason"]
    assert report["anchors"] == [{"lsn": last["lsn"], "digest": last["digest"], "ok": False}]
    wrong = f"{last['lsn'] - 10}:{last['digest']}"  # a digest that is not that record's
    report = _fault(capsys, "".join(rows), tmp_path, "--anchor", wrong)
    assert report["file"]["line"] == len(rows) - 10 and report["lines"] == len(rows) - 11


def _rechain(rows: list[str], k: int, body: str | None = "forged",
             prev: bytes | None = None) -> str:
    """The lines with line `k`'s body changed (`body`) and every digest from there computed
    again, as someone who read storage/records.py could; from `prev` if given."""
    out = rows[:k]
    prev = prev or bytes.fromhex(_line_digest(rows[k - 1]))
    for row in rows[k:]:
        obj = json.loads(row)
        if len(out) == k and body is not None:
            obj["data"]["body"] = body
        if "prev" in obj:
            obj["prev"] = prev.hex()
        prev = chain(prev, export.remake(obj))
        obj["digest"] = prev.hex()
        out.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    return "".join(out)


def test_an_export_from_an_lsn_is_checked_from_the_digest_before_it(tmp_path, capsys):
    """`export --from-lsn N`'s first line carries `prev`, record N-1's digest: the file checks
    out from it, an anchor at N-1 (the head of the export before) pins its start, one before
    that cannot be checked by this file (usage, exit 2), and a wrong one fails line 1."""
    data = _data(tmp_path / "data")
    whole = _export(data).splitlines(keepends=True)
    part = _export(data, "--from-lsn", "40")
    assert part.splitlines(keepends=True)[1:] == whole[40:]
    before = _line_digest(whole[38])
    f = tmp_path / "part.jsonl"
    f.write_text(part)
    report = json.loads(homing("audit", "verify-export", str(f), "--anchor",
                               f"39:{before}").stdout)
    assert report["ok"] and report["first_lsn"] == 40 and report["lines"] == len(whole) - 39
    assert report["prev"] == {"lsn": 39, "digest": before, "pinned": True}
    assert report["anchors"] == [{"lsn": 39, "digest": before, "ok": True}]
    early = homing("audit", "verify-export", str(f), "--anchor", f"10:{before}", check=False)
    assert_one_json_error(early, 2, "usage")
    assert json.loads(early.stdout)["anchors"][0]["ok"] is None
    wrong = homing("audit", "verify-export", str(f), "--anchor",
                   f"39:{_line_digest(whole[37])}", check=False)
    assert_one_json_error(wrong, 1, "corrupt_export")
    assert json.loads(wrong.stdout)["file"]["line"] == 1
    report = _fault(capsys, "".join(whole[39:]), tmp_path)  # no prev: a whole export's lines
    assert report["file"]["line"] == 1 and "no prev" in report["file"]["reason"]
    fake = _rechain(whole, 0, None, bytes(range(32)))  # lsn 1 chained from another start
    report = _fault(capsys, fake, tmp_path)
    assert report["file"]["line"] == 1 and "follows no record" in report["file"]["reason"]
    assert _export(data, "--from-lsn", str(len(whole) + 1)) == ""
    status, report, _ = _check(capsys, "", tmp_path)
    assert status == 0 and report["lines"] == 0 and report["head"]["lsn"] == 0


def test_a_line_longer_than_the_bound_and_unreadable_files(tmp_path, capsys):
    """--max-line-bytes bounds the line read (a longer one is not read: `usage` at its line,
    `file.ok` null); a file that cannot be read is `no_data`, a bound under 1,024 and `-` with
    stdin closed `usage`, all exit 2."""
    data = _data(tmp_path / "data", commands=20)
    rows = _export(data).splitlines(keepends=True)
    assert _check(capsys, "".join(rows), tmp_path, "--max-line-bytes", "1024")[0] == 0
    long = rows[0] + " " * 2000 + rows[1]
    status, report, err = _check(capsys, long, tmp_path, "--max-line-bytes", "1024")
    assert status == 2 and json.loads(err.strip().splitlines()[-1])["error"] == "usage", err
    assert report["file"]["ok"] is None and report["file"]["line"] == 2, report
    assert "longer than 1,024 bytes" in report["file"]["reason"]
    assert_one_json_error(homing("audit", "verify-export", str(tmp_path / "none"), check=False),
                          2, "no_data")
    assert_one_json_error(homing("audit", "verify-export", "-", "--max-line-bytes", "10",
                                 input="", check=False), 2, "usage")
    closed = subprocess.run([*homing_cmd(), "audit", "verify-export", "-"], stdin=None,
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: os.close(0))
    assert_one_json_error(closed, 2, "usage")


def _forge(path: Path, bodies: list[bytes]) -> None:
    """Chain record bodies onto the log behind homing's back (the projections' applied_lsn
    moved with them)."""
    last = _last_lsn(path)

    def put(txn, db):
        prev = txn.get(lsn_key(last), db=db("log"))[:32]
        for lsn, body in enumerate(bodies, last + 1):
            prev = chain(prev, body)
            txn.put(lsn_key(lsn), prev + body, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(last + len(bodies)), db=db("meta"))

    poke(path, put)


def _odd_bodies(first: int) -> list[bytes]:
    """Records that decode into events `verify` passes, but that their JSON fields do not make
    again: a message whose body is not its data's last field, a mark whose `upto` is packed in
    9 bytes where 1 do, a NaN with a payload JSON drops; and one that they do (a float)."""
    ts = 1_800_000_000_000_000
    head = [b"\x96" + msgpack.packb(lsn) + msgpack.packb(ts) for lsn in range(first, first + 4)]
    conv = "dm:alice:bob"
    nan = b"\xcb" + struct.pack(">Q", 0x7FF8000000000001)
    return [
        msgpack.packb([first, ts, "message.accepted", "bob", "d",
                       {"body": "first", "conv": conv, "cid": "odd1"}]),
        head[1] + msgpack.packb("read.marked") + msgpack.packb("alice") + msgpack.packb("d")
        + b"\x82" + msgpack.packb("conv") + msgpack.packb(conv) + msgpack.packb("upto")
        + b"\xcf" + struct.pack(">Q", 1),
        head[2] + msgpack.packb("read.marked") + msgpack.packb("alice") + msgpack.packb("d")
        + b"\x83" + msgpack.packb("conv") + msgpack.packb(conv) + msgpack.packb("upto")
        + b"\x01" + msgpack.packb("x") + nan,
        msgpack.packb([first + 3, ts, "read.marked", "alice", "d",
                       {"conv": conv, "upto": 1, "x": 1.5}]),
    ]


def test_records_their_fields_do_not_make_again_carry_their_bytes(tmp_path, capsys):
    """A record chained on by hand that JSON cannot make again byte for byte (a body not last,
    an integer packed long, a NaN's payload) is exported with `record_b64`, and verifies; a
    changed field of such a line, or `record_b64` dropped or added, is caught."""
    data = _data(tmp_path / "data", commands=20)
    first = _last_lsn(data) + 1
    _forge(data, _odd_bodies(first))
    verify = homing("audit", "verify", "--data", str(data), check=False)
    assert json.loads(verify.stdout)["log"] == {"ok": True}, verify.stdout  # chained, read
    rows = _export(data).splitlines(keepends=True)
    carried = [i for i, r in enumerate(rows) if "record_b64" in r]
    assert carried == [first - 1, first, first + 1], carried
    assert json.loads(rows[first - 1])["data"]["body"] == "first"
    status, report, err = _check(capsys, "".join(rows), tmp_path)
    assert status == 0 and report["ok"], (report, err)
    obj = json.loads(rows[first])
    for change in ({"data": {**obj["data"], "upto": 2}}, {"record_b64": None}):
        edited = {k: v for k, v in {**obj, **change}.items() if v is not None}
        bad = _put(rows, first, json.dumps(edited, separators=(",", ":")) + "\n")
        report = _fault(capsys, "".join(bad), tmp_path)
        assert report["file"]["line"] == first + 1, report
    plain = json.loads(rows[first + 2])
    plain["record_b64"] = "AA=="
    bad = _put(rows, first + 2, json.dumps(plain, separators=(",", ":")) + "\n")
    assert _fault(capsys, "".join(bad), tmp_path)["file"]["line"] == first + 3


def _last_lsn(data: Path) -> int:
    store = Store.open(str(data), readonly=True)
    try:
        return store.last_lsn()
    finally:
        store.close()


@pytest.fixture(scope="module", autouse=True)
def _quiet_storage():
    """Storage's lifecycle logs off (each Hypothesis example opens a store)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), commands=st.integers(1, 80),
       bodies=st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), max_size=4),
       byte=st.integers(0, 255), draw=st.data())
def test_any_log_exports_then_verifies_and_any_changed_byte_is_caught(
        seed, commands, bodies, byte, draw):
    """On random logs the rules wrote (tests/audit/test_streaming.py's mix) and messages of
    any text or bytes, an export from any LSN verifies with no `record_b64`, and a change of any
    one byte of a line's content (its line break aside) fails at that line."""
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(seed, tmp, commands)
        try:
            for i, body in enumerate(bodies):
                store.execute([SendMessage("ann", "d1", "user", f"h{i}", body, to="bob")])
            # Drawn with bounds of their own, then fitted: the log's length, and its lines',
            # can differ from one run of an example to the next (the times in its events, ids
            # made at random), and Hypothesis wants each draw to be as it was.
            from_lsn = 1 + draw.draw(st.integers(0, 2**16), label="from_lsn") % store.last_lsn()
            rows = [r.encode() for r in export.lines(store, from_lsn)]
        finally:
            store.close()
    walk = export.check_lines(rows)
    assert (walk.first_lsn, walk.lines) == (from_lsn, len(rows))
    assert not any("record_b64" in json.loads(r) for r in rows)
    k = draw.draw(st.integers(0, 2**16), label="line") % len(rows)
    at = draw.draw(st.integers(0, 2**16), label="byte") % (len(rows[k]) - 1)  # not its break
    if rows[k][at] == byte:
        byte ^= 1
    changed = [*rows[:k], rows[k][:at] + bytes([byte]) + rows[k][at + 1:], *rows[k + 1:]]
    with pytest.raises(ExportFault) as caught:
        export.check_lines(b"".join(changed).splitlines(keepends=True))
    assert caught.value.line == k + 1, caught.value


def test_an_export_cut_at_its_start_says_nothing_pins_where_it_starts(tmp_path, capsys):
    """A whole export with its first lines cut and the digest before the first left copied in
    as its `prev` (the cut lines' own `digest`) is, byte for byte, `export --from-lsn`'s file:
    `verify-export` passed it, `"ok": true`, as it passes the whole one, where the first
    line's missing `prev` is what shows a cut (OPERATIONS.md). It still passes (its lines are
    sound), and `prev.pinned` now says whether anything pins its start: true of a file from
    lsn 1 (64 zeros) or one an anchor at or after its `prev` holds for, false without."""
    data = _data(tmp_path / "data")
    whole = _export(data).splitlines(keepends=True)
    first = json.loads(whole[4])
    first |= {"prev": _line_digest(whole[3]), "digest": first.pop("digest")}
    part = "".join([json.dumps(first, ensure_ascii=False, separators=(",", ":")) + "\n",
                    *whole[5:]])
    assert part == _export(data, "--from-lsn", "5")
    status, report, _ = _check(capsys, part, tmp_path)
    assert status == 0 and report["ok"] and report["first_lsn"] == 5
    assert report["prev"] == {"lsn": 4, "digest": _line_digest(whole[3]), "pinned": False}
    for at in (4, 5, len(whole)):
        status, report, _ = _check(capsys, part, tmp_path, "--anchor",
                                   f"{at}:{_line_digest(whole[at - 1])}")
        assert status == 0 and report["prev"]["pinned"] is True, at
    status, report, _ = _check(capsys, "".join(whole), tmp_path)
    assert status == 0 and report["prev"]["pinned"] is True
