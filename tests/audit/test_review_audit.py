"""Defects a review of the audit tools found (2026-12-05). Real LMDB, real `homing` child
processes where a crash would take the process down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.audit.test_damaged import assert_one_json_error, make_data, run


@pytest.mark.parametrize("action", [("verify",), ("rebuild", "--check"), ("log",), ("stats",),
                                    ("rebuild",)])
def test_a_truncated_data_file_is_a_json_error_not_a_bus_error(tmp_path, action):
    """A data.mdb cut short (a copy that stopped, a full disk on a copy) still opens: LMDB
    reads its two meta pages, which name pages past the end of the file, and the first read of
    one of them kills the process with SIGBUS (exit 135, nothing on stdout or stderr)."""
    data = tmp_path / "data"
    make_data(data, 200)
    mdb = data / "data.mdb"
    os.truncate(mdb, (mdb.stat().st_size // 2) & ~4095)
    proc = run("audit", *action, "--data", str(data))
    assert proc.returncode != -7 and proc.returncode != 135, f"killed by SIGBUS: {action}"
    assert_one_json_error(proc, 2, "no_data")
    assert "truncated" in json.loads(proc.stderr.strip().splitlines()[-1])["message"]


def _without_a_mute(tmp_path: Path) -> tuple[Path, int]:
    """Alice and bob talk; bob mutes the DM and unmutes it; then the record of the mute is
    deleted behind homing's back. The projections end as the log without it would leave
    them. Returns the directory and the deleted LSN."""
    from storage.commands import SendMessage, SetMute
    from storage.records import lsn_key
    from storage.store import Store
    from tests.audit.test_damaged import poke

    data = tmp_path / "data"
    store = Store.open(str(data))
    try:
        store.execute([SendMessage("alice", "p", "user", "c1", "hi", to="bob")])
        store.execute([SetMute("bob", "b", "user", "dm:alice:bob", True)])
        gone = store.last_lsn()
        store.execute([SetMute("bob", "b", "user", "dm:alice:bob", False)])
        store.execute([SendMessage("bob", "b", "user", "c2", "yo", to="alice")])
    finally:
        store.close()
    poke(data, lambda txn, db: txn.delete(lsn_key(gone), db=db("log")))
    return data, gone


@pytest.mark.parametrize("action", [("rebuild", "--check"), ("inbox", "--user", "bob"),
                                    ("inbox", "--user", "bob", "--at-lsn", "6"),
                                    ("export",), ("log", "--json")])
def test_a_record_missing_mid_log_fails_every_reader_as_rebuild_does(tmp_path, action):
    """`audit rebuild` refuses a log with a record missing in the middle (corrupt_log), and
    verify fails it at that LSN; yet `rebuild --check` said {"ok": true, "replayed": N}, and
    `inbox --at-lsn`, `export` and `log` answered from a log with a hole, without a word (the
    reads skipped the missing LSN)."""
    data, gone = _without_a_mute(tmp_path)
    rebuild = run("audit", "rebuild", "--data", str(data))
    assert_one_json_error(rebuild, 1, "corrupt_log")
    proc = run("audit", *action, "--data", str(data))
    assert_one_json_error(proc, 1, "corrupt_log")
    assert f"lsn {gone}" in json.loads(proc.stderr.strip().splitlines()[-1])["message"]
    verify = run("audit", "verify", "--data", str(data))
    assert json.loads(verify.stdout)["log"]["lsn"] == gone


def _with_a_time_past_year_9999(tmp_path: Path) -> tuple[Path, int]:
    """Bob writes to alice; then a record with a time no clock gives (2**62 us, year
    146,140) is chained onto the log as LSN last+1, and applied_lsn moved with it, as one
    who computes the chain would. Returns the directory and that LSN."""
    from storage.log import seal
    from storage.projections import APPLIED_LSN
    from storage.records import lsn_key, pack_u64
    from tests.audit.test_damaged import poke

    data = tmp_path / "data"
    last = make_data(data, 3)

    def forge(txn, db):
        tail = txn.get(lsn_key(last), db=db("log"))[:32]
        ((lsn, value, _),), _ = seal([(1 << 62, "mute.set", "alice", "d", {
            "conv": "dm:alice:bob", "muted": False})], last + 1, tail)
        txn.put(lsn_key(lsn), value, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(lsn), db=db("meta"))

    poke(data, forge)
    return data, last + 1


@pytest.mark.parametrize("action", [("log", "--json"), ("log",), ("export",), ("stats",),
                                    ("inbox", "--user", "alice")])
def test_a_time_no_date_holds_is_a_corrupt_log_not_a_traceback(tmp_path, action):
    """A record whose ts_us is past year 9999 (a flipped byte of the time, or a chained record
    no homing wrote) made `log`, `export`, `stats` and `inbox` die with Python's OverflowError
    ('date value out of range'), and `verify` passed it when chained."""
    data, bad = _with_a_time_past_year_9999(tmp_path)
    verify = run("audit", "verify", "--data", str(data))
    assert json.loads(verify.stdout)["log"]["lsn"] == bad, verify.stdout
    proc = run("audit", *action, "--data", str(data))
    assert_one_json_error(proc, 1, "corrupt_log")
    assert f"lsn {bad}" in json.loads(proc.stderr.strip().splitlines()[-1])["message"]


ODD_DATA = {
    "message without conv": ("message.accepted", {"cid": "c9", "body": "x"}),
    "message with an int cid": ("message.accepted", {"conv": "dm:alice:bob", "cid": 5,
                                                     "body": "x"}),
    "member without role": ("member.added", {"conv": "dm:alice:bob", "user": "zed"}),
    "read mark of text": ("read.marked", {"conv": "dm:alice:bob", "upto": "x"}),
    "ack with a list of convs": ("delivery.acked", {"upto": 1, "convs": [1]}),
    "create with an int cid": ("conv.created", {"conv": "grp:00000000000000aa", "kind": "group",
                                                "cid": 7}),
    # No LMDB key holds it (user \0 cid past 511 bytes): `rebuild` died with a traceback,
    # lmdb.BadValsizeError, and verify passed it.
    "create with a cid no key holds": ("conv.created", {"conv": "grp:00000000000000aa",
                                                        "kind": "group", "cid": "x" * 600}),
    # The same for a message's cid (cid \0 sender), a member's user id (conv \0 user) and a
    # conversation id (conv \0 seq): `rebuild` died with lmdb.BadValsizeError, and verify
    # passed them (the compiled replay took the message too).
    "message with a cid no key holds": ("message.accepted", {"conv": "dm:alice:bob",
                                                             "cid": "x" * 600, "body": "x"}),
    "message with a cid of 4-byte characters no key holds": (
        "message.accepted", {"conv": "dm:alice:bob", "cid": "\U0001f600" * 127, "body": "x"}),
    "member with a user id no key holds": ("member.added", {"conv": "dm:alice:bob",
                                                            "user": "u" * 600, "role": "member"}),
    "create of a conv id no key holds": ("conv.created", {"conv": "grp:" + "a" * 600,
                                                          "kind": "group"}),
    "ack naming a conv no key holds": ("delivery.acked", {"upto": 1, "convs": {"c" * 600: 1}}),
    "revocation of a user id no key holds": ("tokens.revoked", {"user": "u" * 600, "before": 1}),
}


def _with_chained_data(tmp_path: Path, type_: str, data: dict) -> tuple[Path, int]:
    """make_data, then a record of `type_` with `data` chained on as LSN last+1 (applied_lsn
    moved with it). Returns the directory and that LSN."""
    from storage.log import seal
    from storage.projections import APPLIED_LSN
    from storage.records import lsn_key, pack_u64
    from tests.audit.test_damaged import poke

    path = tmp_path / "data"
    last = make_data(path, 3)

    def forge(txn, db):
        tail = txn.get(lsn_key(last), db=db("log"))[:32]
        ((lsn, value, _),), _ = seal([(1_800_000_000_000_000, type_, "alice", "d", data)],
                                     last + 1, tail)
        txn.put(lsn_key(lsn), value, db=db("log"))
        txn.put(APPLIED_LSN, pack_u64(lsn), db=db("meta"))

    poke(path, forge)
    return path, last + 1


@pytest.mark.parametrize("odd", sorted(ODD_DATA))
def test_verify_fails_a_chained_record_whose_data_replay_cannot_apply(tmp_path, odd):
    """docs/OPERATIONS.md: a chained record whose data is of the wrong kind fails `log` at its
    LSN. One whose data lacks a field the replay reads, or holds one of the wrong type, passed
    the chain walk, and the projection check then died with Python's KeyError or TypeError
    (no report on stdout); `rebuild --check`, `inbox` and `rebuild` died the same way."""
    data, bad = _with_chained_data(tmp_path, *ODD_DATA[odd])
    verify = run("audit", "verify", "--data", str(data))
    assert "Traceback" not in verify.stderr, verify.stderr[-600:]
    report = json.loads(verify.stdout)
    assert (report["log"]["ok"], report["log"]["lsn"]) == (False, bad), report
    for action in (("rebuild", "--check"), ("inbox", "--user", "alice"), ("rebuild",)):
        proc = run("audit", *action, "--data", str(data))
        assert_one_json_error(proc, 1, "corrupt_log")
        assert f"lsn {bad}" in json.loads(proc.stderr.strip().splitlines()[-1])["message"]


def test_verify_and_the_replay_agree_on_a_create_with_a_nil_cid(tmp_path):
    """A create's `cid` is optional, and nil is none (PROTOCOL.md §3.3): the replay applies a
    conv.created with `cid: null` as one without, and so does verify now. Verify failed the log
    there ("data.cid of the wrong kind: None") while `rebuild` and `rebuild --check` took it."""
    data, _ = _with_chained_data(tmp_path, "conv.created", {
        "conv": "grp:00000000000000aa", "kind": "group", "name": "g", "open": False, "cid": None})
    rebuild = run("audit", "rebuild", "--data", str(data))  # the forged record's projections
    assert rebuild.returncode == 0, rebuild.stderr[-600:]
    verify = run("audit", "verify", "--data", str(data))
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True, verify.stdout
    check = run("audit", "rebuild", "--check", "--data", str(data))
    assert check.returncode == 0 and json.loads(check.stdout)["ok"] is True, check.stdout


def test_verify_passes_a_log_with_acks_from_before_they_carried_convs(tmp_path):
    """An ack written before acks carried `convs` makes the replay read the inbox, which the
    check's digested tables do not hold (RowsDropped: the check then compares row by row). The
    fold's turning of errors into corrupt_log must leave that one alone."""
    from storage.store import Store

    data = tmp_path / "data"
    store = Store.open(str(data))
    try:
        dm = {"conv": "dm:alice:bob"}
        store.log.append([
            (1, "conv.created", "alice", "p", dm | {"kind": "direct", "name": None,
                                                    "open": False}),
            (1, "member.added", "alice", "p", dm | {"user": "alice", "role": "member"}),
            (1, "member.added", "alice", "p", dm | {"user": "bob", "role": "member"}),
            (2, "message.accepted", "alice", "p", dm | {"cid": "c1", "body": "hi"}),
            (3, "delivery.acked", "bob", "b", {"upto": 1}),
        ])
        store.rebuild()
    finally:
        store.close()
    for action in (("verify",), ("rebuild", "--check")):
        proc = run("audit", *action, "--data", str(data))
        assert proc.returncode == 0, proc.stderr[-600:]
        assert json.loads(proc.stdout)["ok"] is True
